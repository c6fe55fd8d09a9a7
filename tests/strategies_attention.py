"""Hypothesis strategies and random inputs shared by the attention tests (``tests/test_attention*.py``)."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from refimpl.attention import AttentionTiling

F64 = torch.float64


@st.composite
def attention_tilings(draw: st.DrawFn, min_len: int = 0) -> AttentionTiling:
    """Small tiled attention calls: batch and KV heads 1-2, groups of 1-4 query heads (grouped-query attention),
    lengths ``min_len``-45, head dims 1-16, blocks of 1-50 rows (so most tiles are ragged), causal or not."""
    heads_kv = draw(st.integers(1, 2))
    return AttentionTiling(
        batch=draw(st.integers(1, 2)),
        heads_q=heads_kv * draw(st.sampled_from([1, 2, 3, 4])),
        heads_kv=heads_kv,
        n_q=draw(st.integers(min_len, 45)),
        n_k=draw(st.integers(min_len, 45)),
        d=draw(st.sampled_from([1, 3, 4, 8, 16])),
        block_q=draw(st.integers(1, 50)),
        block_k=draw(st.integers(1, 50)),
        causal=draw(st.booleans()),
    )


def make_qkv(
    b: int, h_q: int, h_kv: int, n_q: int, n_k: int, d: int, dtype: torch.dtype = F64, seed: int = 0, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standard normal ``q: (b, h_q, n_q, d)``, ``k, v: (b, h_kv, n_k, d)``, drawn in float64 and cast to ``dtype``;
    ``scale`` multiplies ``q`` and ``k`` (large logits)."""
    g = torch.Generator().manual_seed(seed)
    q = (scale * torch.randn(b, h_q, n_q, d, generator=g, dtype=F64)).to(dtype)
    k = (scale * torch.randn(b, h_kv, n_k, d, generator=g, dtype=F64)).to(dtype)
    v = torch.randn(b, h_kv, n_k, d, generator=g, dtype=F64).to(dtype)
    return q, k, v


def tiling_qkv(t: AttentionTiling, dtype: torch.dtype = F64, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``q, k, v`` of the sizes of ``t`` (see :func:`make_qkv`)."""
    return make_qkv(t.batch, t.heads_q, t.heads_kv, t.n_q, t.n_k, t.d, dtype=dtype, seed=seed)
