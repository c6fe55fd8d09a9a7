"""The tiled attention as the attention function of the book's LLM (``refimpl.llm``)."""

from __future__ import annotations

from torch import Tensor

from refimpl.attention.tiled import flash_attention

__all__ = ["llm_attention"]


def llm_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``attn_fn`` for ``model.forward(ids, attn_fn=llm_attention)``: causal FlashAttention, scale ``1/sqrt(d)``.

    Shapes: ``q: (B, H_q, T, d)``, ``k, v: (B, H_kv, T, d)``; returns ``(B, H_q, T, d)``. Causal alignment is
    bottom-right, so it also serves a step whose keys include cached tokens (``T_k > T_q``).
    """
    return flash_attention(q, k, v, causal=True)
