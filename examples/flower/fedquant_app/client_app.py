"""ClientApp: a plain Flower/PyTorch client; ``fedquant_mod`` does the quantization.

The train and evaluate functions below are what any Flower PyTorch app
does (load the global model, train on the local partition, reply with
``ArrayRecord(model.state_dict())`` and a MetricRecord with
``num-examples``). The mod decodes a quantized broadcast before they run and
encodes the reply after, following the server's instructions.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch.utils.data import TensorDataset

from fedquant.fl.client import evaluate as evaluate_model
from fedquant.fl.client import train_local
from fedquant.fl.models import PaperCNN
from fedquant.fl.seeding import Purpose, numpy_rng, torch_generator
from fedquant.fl.task import image_classification_task
from fedquant.flower import UplinkConfig, fedquant_mod
from fedquant_app.task import client_data, train_config

app = ClientApp(mods=[fedquant_mod])


def _node(context: Context) -> tuple[int, int, int]:
    """``(partition id, number of partitions, run seed)``."""
    try:
        pid = int(context.node_config["partition-id"])
        n = int(context.node_config["num-partitions"])
    except KeyError as e:
        raise ValueError(
            f"this SuperNode has no {e} in its node config; start it with "
            "--node-config 'partition-id=0 num-partitions=2'"
        ) from None
    return pid, n, int(context.run_config["seed"])


def _model(msg: Message) -> PaperCNN:
    model = PaperCNN()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


@app.train()
def train(msg: Message, context: Context) -> Message:
    pid, n, seed = _node(context)
    x, y, _, _ = client_data(pid, n, seed)
    model = _model(msg)
    config = msg.content["config"]
    server_round = int(config["server-round"])
    cfg = train_config(context.run_config)
    qat_spec = qat_rng = None
    if cfg.qat:  # train against the quantizer the upload will use
        instructions = UplinkConfig.from_config(config)
        qat_spec = instructions.spec if instructions is not None else None
        qat_rng = numpy_rng(seed, Purpose.QAT, server_round, pid)
    stats = train_local(
        model,
        TensorDataset(x, y),
        image_classification_task(),
        cfg,
        torch_generator(seed, Purpose.SHUFFLE, server_round, pid),
        qat_spec=qat_spec,
        qat_rng=qat_rng,
    )
    metrics = MetricRecord({"train-loss": stats.loss, "num-examples": stats.num_examples})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    pid, n, seed = _node(context)
    _, _, x_test, y_test = client_data(pid, n, seed)
    loss, acc = evaluate_model(_model(msg), x_test, y_test)
    metrics = MetricRecord({"eval-loss": loss, "eval-acc": acc, "num-examples": len(y_test)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
