"""A ClientApp mod that makes a SuperNode misbehave, chosen by its node config ``hostile``.

The integration test copies this file into the app it builds from docs/flower.md
and puts the mod in front of ``fedquant_mod`` (mods run first-outermost, so this
one sees the reply fedquant_mod made):

* ``hostile="nan"``: the reply carries plain float arrays (as from a ClientApp
  without the mod) with a NaN in them;
* ``hostile="no-mse"``: the reply keeps its payload but loses the
  ``fedquant.mse.*`` metric entries.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable

from fedquant.flower import payload_from_record
from fedquant.quant import codec


def hostile_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    reply = call_next(msg, ctxt)
    mode = ctxt.node_config.get("hostile")
    if mode is None or reply.has_error() or not reply.content.array_records:
        return reply
    content = reply.content
    array_key, record = next(iter(content.array_records.items()))
    metric_key, metrics = next(iter(content.metric_records.items()))
    if mode == "nan":
        tensors = dict(codec.decode(payload_from_record(record)).tensors)
        first = next(iter(tensors))
        tensors[first] = np.full_like(tensors[first], np.nan)
        content[array_key] = ArrayRecord({k: Array(v) for k, v in tensors.items()})
    elif mode == "no-mse":
        content[metric_key] = MetricRecord(
            {k: v for k, v in metrics.items() if not k.startswith("fedquant.mse.")}
        )
    return reply
