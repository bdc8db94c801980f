"""The byte-level transformer: shapes, causality, tying, its state dict, errors."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from fedquant.errors import ConfigError
from fedquant.fl.models_text import Block, CharTransformer
from fedquant.quant.spec import QuantSpec


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Small models train ~10x faster on one thread than on two busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(**kw: int) -> CharTransformer:
    torch.manual_seed(0)
    return CharTransformer(**{"context": 16, "d_model": 32, "n_layers": 2, "n_heads": 4, **kw})


def test_logits_shape_and_shorter_inputs() -> None:
    m = _model()
    x = torch.randint(0, 256, (3, 16))
    assert m(x).shape == (3, 16, 256)
    assert m(x[:, :5]).shape == (3, 5, 256)


def test_attention_is_causal() -> None:
    """Changing byte t changes no logit before position t."""
    m = _model().eval()
    x = torch.randint(0, 256, (2, 16))
    y = x.clone()
    y[:, 9] = (y[:, 9] + 1) % 256
    a, b = m(x), m(y)
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_head_is_tied_to_the_embedding_and_stored_once() -> None:
    m = _model()
    sd = m.state_dict()
    assert "tok_emb.weight" in sd and not any(k.startswith("head") for k in sd)
    x = torch.randint(0, 256, (1, 4))
    h = m.tok_emb(x) + m.pos_emb.weight[:4]
    for block in m.blocks:
        h = block(h)
    assert torch.allclose(m(x), m.ln_f(h) @ m.tok_emb.weight.T, atol=1e-6)


def test_state_dict_kinds_for_quantization() -> None:
    """Embeddings and projections are quantizable (>= 2-D); LayerNorms and biases are 1-D."""
    m = _model()
    sd = m.state_dict()
    quantizable = {k for k, v in sd.items() if v.dim() >= 2}
    assert quantizable == {
        "tok_emb.weight",
        "pos_emb.weight",
        *(
            f"blocks.{i}.{n}.weight"
            for i in range(2)
            for n in ("attn.qkv", "attn.proj", "fc", "out")
        ),
    }
    assert {k for k in sd if ".ln" in k or k.startswith("ln_f")} == {
        *(
            f"blocks.{i}.{ln}.{p}"
            for i in range(2)
            for ln in ("ln1", "ln2")
            for p in ("weight", "bias")
        ),
        "ln_f.weight",
        "ln_f.bias",
    }
    plans = QuantSpec.from_strings(bits="4").resolve(
        {k: (tuple(v.shape), True) for k, v in sd.items()}
    )
    assert {k for k, p in plans.items() if p.quantized} == quantizable


def test_gpt2_initialization() -> None:
    m = _model(n_layers=4, d_model=64)
    block = m.blocks[0]
    assert isinstance(block, Block)
    assert float(block.attn.qkv.bias.detach().abs().max()) == 0.0
    assert m.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)  # 16k draws: ~1 % sd
    # residual projections scaled by 1/sqrt(2 * n_layers) = 1/sqrt(8)
    assert block.out.weight.std().item() == pytest.approx(0.02 / 8**0.5, rel=0.05)
    assert float(m.ln_f.weight.detach().min()) == 1.0


def test_learns_a_repeating_pattern(one_thread: None) -> None:
    """A few Adam steps on a period-3 byte pattern drive the loss near zero."""
    m = _model()
    seq = torch.tensor([10, 20, 30] * 6)
    x, y = seq[:16].unsqueeze(0), seq[1:17].unsqueeze(0)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    first = float(F.cross_entropy(m(x).flatten(0, 1), y.flatten()).detach())
    for _ in range(60):
        loss = F.cross_entropy(m(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 5.0  # ~ln 256 at initialization
    assert float(loss) < 0.1


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"n_heads": 3}, "n_heads=3 does not divide d_model=32"),
        ({"d_model": 0}, r"sizes \{'d_model': 0, 'd_ff': 0\} are invalid; expected integers >= 1"),
    ],
)
def test_bad_sizes(kw: dict[str, int], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _model(**kw)


def test_input_longer_than_context() -> None:
    with pytest.raises(ConfigError, match="length 17 exceeds its context 16"):
        _model()(torch.zeros(1, 17, dtype=torch.int64))
