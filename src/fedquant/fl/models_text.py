"""A small decoder-only transformer for byte-level next-character prediction.

Architecture (GPT-2 style, pre-LayerNorm)::

    tok_emb(256 -> d) + pos_emb(context -> d)
    n_layers x [ x + attn(ln1(x)),  x + mlp(ln2(x)) ]     attn: causal, n_heads heads
    ln_f -> logits = x @ tok_emb.weight^T                 (head tied to the embedding)

``attn`` is one ``qkv`` projection ``d -> 3d`` and an output projection
``proj`` ``d -> d``; ``mlp`` is ``fc`` ``d -> d_ff``, GELU, ``out`` ``d_ff -> d``.
The head reuses the token embedding (weight tying, Press & Wolf 2017) through
:func:`torch.nn.functional.linear`, so the state dict holds that matrix once
and a quantized upload carries it once.

Its state dict has the tensor kinds that behave differently under
quantization from convolution weights: embeddings (``tok_emb.weight``,
``pos_emb.weight``; 2-D, quantized by default), attention and MLP projections
(2-D, quantized by default), and LayerNorm gains and biases plus linear biases
(1-D: float32 unless a ``rules`` pattern quantizes them, e.g. ``*ln*=8``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedquant.errors import ConfigError


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention (one fused ``qkv`` projection)."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).unbind(2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, d_ff)
        self.out = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharTransformer(nn.Module):
    """A decoder-only transformer over bytes (see the module docstring).

    Parameters
    ----------
    vocab_size : int, default 256
    context : int, default 32
        The longest input sequence (the number of learned positions).
    d_model : int, default 48
    n_layers : int, default 2
    n_heads : int, default 4
        Must divide ``d_model``.
    d_ff : int, default 4 * d_model

    Raises
    ------
    ConfigError
        If a size is not positive or ``n_heads`` does not divide ``d_model``.

    Notes
    -----
    ``forward(x)`` takes ``int64`` byte ids ``(B, T)``, ``T <= context``, and
    returns logits ``(B, T, vocab_size)``: position ``t`` predicts byte
    ``t + 1``. Initialization follows GPT-2: normal(0, 0.02) weights, zero
    biases, and the projections back into the residual stream (``proj``,
    ``out``) scaled by ``1 / sqrt(2 n_layers)``.
    """

    def __init__(
        self,
        vocab_size: int = 256,
        context: int = 32,
        d_model: int = 48,
        n_layers: int = 2,
        n_heads: int = 4,
        d_ff: int | None = None,
    ) -> None:
        super().__init__()
        d_ff = 4 * d_model if d_ff is None else d_ff
        sizes = {
            "vocab_size": vocab_size,
            "context": context,
            "d_model": d_model,
            "n_layers": n_layers,
            "n_heads": n_heads,
            "d_ff": d_ff,
        }
        bad = {
            k: v for k, v in sizes.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1
        }
        if bad:
            raise ConfigError(
                "model", f"CharTransformer sizes {bad} are invalid; expected integers >= 1"
            )
        if d_model % n_heads:
            raise ConfigError(
                "model", f"CharTransformer: n_heads={n_heads} does not divide d_model={d_model}"
            )
        self.context = context
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_ff) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                std = (
                    0.02 / (2 * n_layers) ** 0.5
                    if name.endswith(("proj.weight", "out.weight"))
                    else 0.02
                )
                nn.init.normal_(p, 0.0, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[-1]
        if t > self.context:
            raise ConfigError(
                "model", f"CharTransformer: input of length {t} exceeds its context {self.context}"
            )
        h = self.tok_emb(x) + self.pos_emb.weight[:t]
        for block in self.blocks:
            h = block(h)
        return F.linear(self.ln_f(h), self.tok_emb.weight)
