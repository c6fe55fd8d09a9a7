"""Standard attention, the reference: materialise the ``N_q x N_k`` scores, softmax them, multiply by V.

This is Algorithm 0 of FlashAttention (Dao et al. 2022, sec. 2.2): ``S = scale Q K^T``, ``P = softmax(S)``,
``O = P V``, each pass reading its inputs from memory and writing its output. It is the ground truth every
tiled implementation is tested against (in float64), and the baseline for memory and time. It computes in the
input dtype, like a plain PyTorch implementation would, so in float16 its scores can overflow.
"""

from __future__ import annotations

import torch
from torch import Tensor

from refimpl._dtypes import accumulation_dtype
from refimpl.attention.common import causal_visible, check_attention_inputs
from refimpl.attention.io_count import IOCounter

__all__ = ["naive_attention"]


def naive_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = False,
    scale: float | None = None,
    *,
    return_lse: bool = False,
    io: IOCounter | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Standard softmax attention ``softmax(scale Q K^T + mask) V`` (Dao et al. 2022, Algorithm 0).

    Shapes: ``q: (B, H_q, N_q, d)``, ``k, v: (B, H_kv, N_k, d)`` with ``H_kv`` dividing ``H_q``; returns
    ``O: (B, H_q, N_q, d)`` and, with ``return_lse=True``, also ``L: (B, H_q, N_q)``, the log-sum-exp of each
    score row. ``causal`` masks bottom-right aligned; a fully masked row gives ``O = 0`` and ``L = +inf`` (see
    :mod:`refimpl.attention.common`). Differentiable by autograd, which keeps ``P`` (``N_q x N_k``) for the
    backward pass. ``io`` (optional) counts the memory traffic of each pass (see :mod:`.io_count`).

    Raises ``TypeError``/``ValueError`` on bad shapes, dtypes, devices or ``scale``.
    """
    scale, g = check_attention_inputs(q, k, v, scale)
    b, h_q, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    qg = q.unflatten(1, (h_kv, g))  # (B, H_kv, G, N_q, d): the G query heads that share one KV head
    kg, vg = k.unsqueeze(2), v.unsqueeze(2)  # (B, H_kv, 1, N_k, d), broadcast over the group

    # Pass 1: S = scale Q K^T, written to memory.                                   (B, H_kv, G, N_q, N_k)
    s = torch.matmul(qg, kg.transpose(-1, -2)) * scale
    # Pass 2: P = softmax(S) row by row; the mask is applied in the same pass.
    dead = None  # rows that see no key at all
    if causal:
        visible = causal_visible(torch.arange(n_q, device=q.device), torch.arange(n_k, device=q.device), n_k - n_q)
        s = s.masked_fill(~visible, float("-inf"))
        dead = ~visible.any(dim=-1, keepdim=True)  # (N_q, 1)
    elif n_k == 0:
        dead = torch.ones(n_q, 1, dtype=torch.bool, device=q.device)
    if dead is not None:
        # An all -inf row has no softmax; give it finite scores so neither softmax nor its gradient makes NaN,
        # then zero its probabilities: O = 0 there, as in the FlashAttention kernels.
        s = s.masked_fill(dead, 0.0)
    p = torch.softmax(s, dim=-1)
    if dead is not None:
        p = p.masked_fill(dead, 0.0)
    # Pass 3: O = P V.                                                                (B, H_kv, G, N_q, d)
    o = torch.matmul(p, vg).flatten(1, 2)
    if io is not None:
        scores = s.numel()
        io.reads.update({"Q": q.numel(), "K": k.numel() * g, "S": scores, "P": scores, "V": v.numel() * g})
        io.writes.update({"S": scores, "P": scores, "O": o.numel()})
    if not return_lse:
        return o
    lse = torch.logsumexp(s.to(accumulation_dtype(q.dtype)), dim=-1)
    if dead is not None:
        lse = lse.masked_fill(dead.squeeze(-1), float("inf"))
    if io is not None:
        io.reads["S"] += s.numel()
        io.writes["L"] += lse.numel()
    return o, lse.flatten(1, 2)
