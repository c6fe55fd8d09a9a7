"""FlashAttention: tiled exact attention with online softmax and recomputation, in PyTorch and Triton.

Chapter: ``chapters/flash_attention.ipynb``. Papers: Dao et al. 2022 (FlashAttention), Dao 2023
(FlashAttention-2), Milakov & Gimelshein 2018 (online softmax).

=================================  ==========================================================================
``naive_attention``                standard attention, materialises the ``N x N`` scores (the reference)
``flash_attention``                tiled, differentiable (``FlashAttentionFunction``), FA2 loop order
``flash_attention_forward``        the tiled forward, returns ``(O, L)``; FA2 or FA1 loop order, counted IO
``flash_attention_backward``       the tiled backward by recomputation, returns ``(dQ, dK, dV)``
``online_softmax``                 softmax of a row read block by block
``llm_attention``                  ``attn_fn(q, k, v)`` for the book's LLM (causal, tiled)
``IOCounter`` and ``*_io``         HBM<->SRAM traffic, counted and in closed form for an ``AttentionTiling``
``peak_memory``                    peak extra CPU memory of a call (``memory``)
``triton_flash_attention``         the same algorithm as a Triton kernel (``triton_kernels``, imported lazily)
=================================  ==========================================================================

``import refimpl.attention`` does not import Triton; ``refimpl.attention.triton_kernels`` (or the name
``triton_flash_attention``) does, on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from refimpl.attention.common import SUPPORTED_DTYPES, accumulation_dtype, causal_visible, check_attention_inputs
from refimpl.attention.io_count import (
    AttentionTiling,
    IOCount,
    IOCounter,
    TileVisit,
    block_sizes_for_sram,
    flash1_forward_io,
    flash2_backward_io,
    flash2_forward_io,
    sram_footprint,
    standard_attention_io,
)
from refimpl.attention.llm import llm_attention
from refimpl.attention.memory import peak_memory
from refimpl.attention.naive import naive_attention
from refimpl.attention.tiled import (
    FlashAttentionFunction,
    flash_attention,
    flash_attention_backward,
    flash_attention_forward,
    online_softmax,
)

_LAZY = {"triton_flash_attention": "refimpl.attention.triton_kernels", "triton_kernels": None}

__all__ = [
    "SUPPORTED_DTYPES",
    "AttentionTiling",
    "FlashAttentionFunction",
    "IOCount",
    "IOCounter",
    "TileVisit",
    "accumulation_dtype",
    "block_sizes_for_sram",
    "causal_visible",
    "check_attention_inputs",
    "flash1_forward_io",
    "flash2_backward_io",
    "flash2_forward_io",
    "flash_attention",
    "flash_attention_backward",
    "flash_attention_forward",
    "llm_attention",
    "naive_attention",
    "online_softmax",
    "peak_memory",
    "sram_footprint",
    "standard_attention_io",
]  # triton_flash_attention is left out so that a star import does not pull in Triton


def __getattr__(name: str) -> Any:
    """Import the Triton module only when it is asked for (PEP 562): Triton is optional and heavy."""
    if name == "triton_kernels":
        return importlib.import_module("refimpl.attention.triton_kernels")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'refimpl.attention' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
