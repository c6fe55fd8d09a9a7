"""What every attention implementation in this package shares: input checks, the causal mask, dtypes.

Conventions (the same as the FlashAttention-2 kernels, ``flash_attn >= 2.1``):

* layout ``q: (B, H_q, N_q, d)``, ``k, v: (B, H_kv, N_k, d)``; grouped-query attention when ``H_kv < H_q``:
  query head ``h`` reads KV head ``h // G`` with ``G = H_q // H_kv`` (Ainslie et al. 2023);
* causal masking is aligned to the bottom-right corner of the ``N_q x N_k`` score matrix: query ``i`` sees
  key ``j`` iff ``j <= i + (N_k - N_q)``. With ``N_q == N_k`` this is the usual lower triangle; with a KV cache
  (``N_k > N_q``) the queries are the last ``N_q`` tokens. When ``N_q > N_k`` the first ``N_q - N_k`` queries
  see no key at all;
* a query that sees no key (a fully masked row) gets a zero output and log-sum-exp ``+inf``, so that the
  softmax recomputed in the backward pass, ``P = exp(S - L)``, is exactly zero there (no NaN anywhere);
* scores are accumulated in float32 for float32/float16/bfloat16 inputs and in float64 for float64 inputs;
  the output has the input dtype, the log-sum-exp has the accumulation dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from refimpl._checks import check_float, check_same_device, check_tensor
from refimpl._dtypes import accumulation_dtype

__all__ = [
    "SUPPORTED_DTYPES",
    "accumulation_dtype",
    "causal_visible",
    "check_attention_inputs",
    "recomputing_function",
]

SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def check_attention_inputs(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> tuple[float, int]:
    """Validate ``q, k, v`` and ``scale`` at a public boundary; return ``(scale, G)``.

    ``scale`` defaults to ``1 / sqrt(d)`` (Vaswani et al. 2017, eq. 1); ``G = H_q // H_kv`` is the number of
    query heads sharing one KV head. Raises ``TypeError``/``ValueError`` naming the offending argument.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, dtypes=SUPPORTED_DTYPES)
    check_same_device(q=q, k=k, v=v)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must have one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape (B, H_kv, N_k, d), got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head dim d, got {q.shape[-1]} and {k.shape[-1]}")
    if q.shape[-1] == 0:
        raise ValueError(f"head dim d must be >= 1, got shape {tuple(q.shape)}")
    h_q, h_kv = q.shape[1], k.shape[1]
    if h_kv == 0 or h_q % h_kv != 0:
        raise ValueError(f"KV heads must divide query heads (grouped-query attention), got H_q={h_q}, H_kv={h_kv}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    else:
        scale = check_float("scale", scale, min_value=0.0, min_inclusive=False)
    return scale, h_q // h_kv


def causal_visible(q_pos: Tensor, k_pos: Tensor, offset: int) -> Tensor:
    """Boolean mask ``(len(q_pos), len(k_pos))``: True where query position ``i`` may see key position ``j``.

    Bottom-right aligned causal rule ``j <= i + offset`` with ``offset = N_k - N_q`` (see the module docstring).
    """
    return k_pos.unsqueeze(0) <= q_pos.unsqueeze(1) + offset


def recomputing_function(
    name: str,
    forward: Callable[..., tuple[Tensor, Tensor]],
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]],
    doc: str,
) -> type[torch.autograd.Function]:
    """An autograd Function for FlashAttention's recomputation: its forward runs ``forward(q, k, v, *config)``
    ``-> (O, L)`` and saves only ``Q, K, V, O, L`` (no ``N x N`` tensor); its backward runs
    ``backward(q, k, v, o, lse, do, *config) -> (dQ, dK, dV)``. ``config``: the non-tensor arguments. The class
    is called ``name``, documented by ``doc`` and belongs to the module of ``forward``."""

    class RecomputingFunction(torch.autograd.Function):
        @staticmethod
        def forward(
            ctx: torch.autograd.function.FunctionCtx, q: Tensor, k: Tensor, v: Tensor, *config: object
        ) -> Tensor:
            o, lse = forward(q, k, v, *config)
            ctx.save_for_backward(q, k, v, o, lse)
            ctx.config = config
            return o

        @staticmethod
        @once_differentiable
        def backward(ctx: torch.autograd.function.FunctionCtx, do: Tensor) -> tuple[Tensor | None, ...]:
            q, k, v, o, lse = ctx.saved_tensors
            dq, dk, dv = backward(q, k, v, o, lse, do, *ctx.config)
            return (dq, dk, dv) + (None,) * len(ctx.config)

    RecomputingFunction.__name__ = RecomputingFunction.__qualname__ = name
    RecomputingFunction.__doc__ = doc
    RecomputingFunction.__module__ = forward.__module__
    return RecomputingFunction
