"""Cost of the model's forward pass (FLOPs, bytes) and measured decode speed, for the roofline comparison.

A forward call over ``t`` new tokens multiplies each weight matrix once by ``t`` vectors: ``2 t`` FLOPs per
weight, while reading each weight once. At ``t = 1`` (batch-1 decode) that is 2 FLOPs per 4 bytes (float32):
far left of any CPU's ridge point, so decode time is ``bytes / bandwidth`` (Williams et al. 2009). As ``t``
grows the same bytes feed ``t`` times the FLOPs, and prefill becomes compute-bound.
"""

from __future__ import annotations

import time

import torch

from refimpl._checks import check_int, check_positive_int, check_tensor
from refimpl.llm.config import LlamaConfig
from refimpl.llm.matvec import matvec

__all__ = ["decode_bytes", "forward_flops", "time_decode", "time_matvecs", "weight_matrices"]


def forward_flops(config: LlamaConfig, t: int, context: int = 0, causal: bool = True) -> float:
    """FLOPs of one forward call over ``t`` new tokens after ``context`` cached ones (batch 1).

    Weight matrices and the output head: ``2 t`` FLOPs per weight. Attention: ``q k^T`` and ``p v`` cost
    ``2 * D`` each per (query head, visible key) pair; query ``i`` sees ``context + i + 1`` keys when
    ``causal`` (else all ``context + t``, the count of an implementation that computes masked scores too).
    Norms, RoPE and softmax (``O(t * d)``) are left out.
    """
    t = check_positive_int("t", t)
    context = check_int("context", context, min_value=0)
    c = config
    matrix = sum(v for k, v in c.layer_params().items() if not k.endswith("norm")) * c.n_layers
    head = c.vocab_size * c.d_model
    pairs = t * context + (t * (t + 1) / 2 if causal else t * t)  # (query, key) pairs scored
    return 2.0 * (matrix + head) * t + c.n_layers * c.n_heads * 4 * c.head_dim * pairs


def decode_bytes(config: LlamaConfig, context: int, weight_bits: float = 32, kv_bits: float = 32) -> float:
    """Bytes one batch-1 decode step reads: every weight once (:meth:`LlamaConfig.decode_weight_bytes`) plus
    the full KV cache of ``context`` tokens (:meth:`LlamaConfig.kv_bytes_per_token` each)."""
    context = check_int("context", context, min_value=0)
    return config.decode_weight_bytes(weight_bits) + context * config.kv_bytes_per_token(kv_bits)


def time_decode(model: torch.nn.Module, prompt: torch.Tensor, steps: int, repeats: int = 3) -> float:
    """Seconds of one greedy decode step after a prefill of ``prompt: (T,)`` (or ``(B, T)``: ``B`` sequences
    decoded together, one token each per step) through fresh full caches.

    Each of ``repeats`` runs prefills, then times ``steps`` decode steps one by one; the result is the
    fastest step: the one least disturbed by other processes (the convention of
    :mod:`refimpl.roofline.measure`, which times its ceilings the same way). Context grows by one token per
    step, so the steps differ only by ``steps`` tokens of KV cache.
    """
    steps = check_positive_int("steps", steps)
    repeats = check_positive_int("repeats", repeats)
    check_tensor("prompt", prompt, ndim=(1, 2), dtypes=[torch.int64, torch.int32])
    rows = prompt if prompt.dim() == 2 else prompt[None]  # (B, T)
    n = rows.shape[1]
    best = float("inf")
    for _ in range(repeats):
        caches = model.new_caches()
        nxt = model(rows, caches, 0)[:, -1:].argmax(-1)  # (B, 1)
        for i in range(steps):
            start = time.perf_counter()
            nxt = model(nxt, caches, n + i)[:, -1:].argmax(-1)
            best = min(best, time.perf_counter() - start)
    return best


def weight_matrices(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every weight matrix a decode step multiplies by, in ``(in, out)`` layout: the output head, then the 4 of
    each block (``wqkv``, ``wo``, ``w_gate_up``, ``w_down``)."""
    return [model.head] + [w for b in model.blocks for w in (b.wqkv, b.wo, b.w_gate_up, b.w_down)]


def time_matvecs(model: torch.nn.Module, repeats: int = 3) -> float:
    """Seconds for the matrix-vector products of one decode step alone: ``x @ W`` (:func:`matvec`, as the model
    computes it) for every weight matrix of the model once (the 4 per block and the output head), with a random
    ``x: (1, in)``; the fastest of ``repeats`` runs. Compared with :func:`time_decode` it splits a step into
    reading weights and the rest."""
    repeats = check_positive_int("repeats", repeats)
    mats = weight_matrices(model)
    xs = {w.shape[0]: torch.randn(1, w.shape[0]) for w in mats}
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            for w in mats:
                matvec(xs[w.shape[0]], w)
            best = min(best, time.perf_counter() - start)
    return best
