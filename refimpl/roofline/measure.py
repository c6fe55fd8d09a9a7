"""Measure the two roofline ceilings of the machine running the code: a streaming copy and a matmul sweep.

The roofline's ceilings (Williams et al. 2009, section 2) are *attainable* peaks, found with micro-benchmarks:
the memory ceiling with a STREAM-style copy of an array much larger than the caches, the compute ceiling with
the fastest dense matmul. Conventions, stated once:

* a copy of ``n`` bytes moves ``2 n`` bytes (read ``n``, write ``n``), as STREAM counts it (write-allocate
  traffic, if the hardware does it, is not counted);
* an ``n x n @ n x n`` matmul costs ``2 n^3`` FLOPs (one multiply and one add per term).

Every timing is the minimum over ``repeats`` runs after ``warmup`` runs: the ceiling is the best the machine
does, and the minimum is the estimate least disturbed by other processes sharing the cores.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from refimpl._checks import check_int, check_positive_int
from refimpl.roofline.dtypes import normalize_dtype

__all__ = ["decode_layer_time", "matmul_flops", "stream_bandwidth", "time_fn"]

_TORCH_DTYPES = {
    "fp64": torch.float64,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def _torch_dtype(dtype: Any) -> torch.dtype:
    name = normalize_dtype(dtype)
    if name not in _TORCH_DTYPES:
        raise ValueError(f"dtype must be one of {list(_TORCH_DTYPES)} for a measurement, got {name!r}")
    return _TORCH_DTYPES[name]


def time_fn(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1) -> float:
    """Seconds taken by one call of ``fn()``: the minimum over ``repeats`` calls after ``warmup`` calls.

    Raises ``ValueError`` if ``repeats < 1`` or ``warmup < 0``.
    """
    repeats = check_positive_int("repeats", repeats)
    warmup = check_int("warmup", warmup, min_value=0)
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def time_interleaved(fns: dict[str, Callable[[], Any]], *, repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Seconds per call of each function in ``fns``: the minimum over ``repeats`` rounds in which the functions
    alternate, after ``warmup`` rounds. Interleaving exposes every function to the same machine state, so the
    ratio of two results is what a benchmark should report on a noisy machine.
    """
    repeats = check_positive_int("repeats", repeats)
    warmup = check_int("warmup", warmup, min_value=0)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def stream_bandwidth(nbytes: int = 64 * 2**20, *, repeats: int = 5, warmup: int = 1) -> float:
    """Memory bandwidth in bytes/s from a streaming copy ``dst.copy_(src)`` of ``nbytes`` bytes (fp32 arrays).

    Counts ``2 * nbytes`` bytes per copy (STREAM "Copy" convention). ``nbytes`` should exceed the last-level
    cache several times over (the default, 64 MiB, does on common CPUs), otherwise this measures the cache.
    Raises ``ValueError`` if ``nbytes < 4`` or ``repeats < 1``.
    """
    nbytes = check_int("nbytes", nbytes, min_value=4)
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32)  # (n,), touched so its pages exist before timing
    dst = torch.zeros_like(src)  # (n,)
    seconds = time_fn(lambda: dst.copy_(src), repeats=repeats, warmup=warmup)
    return 2 * n * 4 / seconds


def matmul_flops(n: int = 512, dtype: Any = torch.float32, *, repeats: int = 5, warmup: int = 1) -> float:
    """Attained FLOP/s of an ``(n, n) @ (n, n)`` matmul in ``dtype``, counting ``2 n^3`` FLOPs.

    ``dtype`` is a ``torch.dtype`` or a name (``"fp32"``, ``"bf16"``, ...). Raises ``ValueError`` for
    ``n < 1``, ``repeats < 1`` or a dtype torch cannot multiply here.
    """
    n = check_positive_int("n", n)
    tdtype = _torch_dtype(dtype)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(tdtype)  # (n, n)
    b = torch.randn(n, n, generator=g).to(tdtype)  # (n, n)
    out = torch.empty(n, n, dtype=tdtype)  # (n, n), preallocated so allocation is not timed
    seconds = time_fn(lambda: torch.mm(a, b, out=out), repeats=repeats, warmup=warmup)
    return 2 * n**3 / seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_layer_time(
    model: Any,
    *,
    batch: int,
    context: int,
    dtype: Any = torch.float32,
    device: str | torch.device = "cpu",
    repeats: int = 5,
    warmup: int = 2,
) -> float:
    """Seconds for one decoder layer of a decode step, measured with random weights of ``model``'s shapes.

    One token per sequence (``x: (batch, 1, d)``) goes through RMSNorm, the fused QKV projection, a write of
    its K, V into a preallocated cache ``(batch, H_kv, context, D)``, attention over the ``context`` cached
    tokens (``scaled_dot_product_attention``, grouped-query), the output projection, RMSNorm and the SwiGLU
    MLP: the operators :func:`refimpl.roofline.analyze` counts per layer (RoPE, a few elementwise FLOPs, is
    left out). All layers of a model are alike, so ``n_layers`` times this is the step's layer time; compare
    it with ``analyze(..., stage="decode").layer_time``. Dense models only.
    """
    import torch.nn.functional as F

    from refimpl.roofline.models import resolve_model

    cfg = resolve_model(model)
    if cfg.is_moe:
        raise ValueError(f"model must be dense for decode_layer_time, got {cfg.n_experts} experts")
    batch = check_positive_int("batch", batch)
    context = check_positive_int("context", context)
    dev = torch.device(device)
    tdtype = _torch_dtype(dtype)
    torch.manual_seed(0)
    d, q_dim, kv_dim, ffn = cfg.d_model, cfg.q_dim, cfg.kv_dim, cfg.ffn_dim
    H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def weight(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=dev, dtype=tdtype) * d**-0.5

    w_qkv, w_o = weight(q_dim + 2 * kv_dim, d), weight(d, q_dim)  # F.linear layout (out, in)
    w_gate_up, w_down = weight(2 * ffn, d), weight(d, ffn)
    norm1 = torch.ones(d, device=dev, dtype=tdtype)
    norm2 = torch.ones(d, device=dev, dtype=tdtype)
    k_cache = weight(batch, Hkv, context, D)  # (B, H_kv, S, D)
    v_cache = weight(batch, Hkv, context, D)  # (B, H_kv, S, D)
    x = weight(batch, 1, d)  # (B, 1, d)

    def rms(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    def layer() -> torch.Tensor:
        q, k, v = F.linear(rms(x, norm1), w_qkv).split([q_dim, kv_dim, kv_dim], dim=-1)
        q = q.view(batch, 1, H, D).transpose(1, 2)  # (B, H, 1, D)
        k_cache[:, :, -1:] = k.view(batch, 1, Hkv, D).transpose(1, 2)  # the new token is the last position
        v_cache[:, :, -1:] = v.view(batch, 1, Hkv, D).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k_cache, v_cache, enable_gqa=H != Hkv)  # (B, H, 1, D)
        h = x + F.linear(o.transpose(1, 2).reshape(batch, 1, q_dim), w_o)
        gate, up = F.linear(rms(h, norm2), w_gate_up).chunk(2, dim=-1)  # (B, 1, F) each
        return h + F.linear(F.silu(gate) * up, w_down)

    def timed() -> None:
        layer()
        _sync(dev)

    with torch.inference_mode():
        return time_fn(timed, repeats=repeats, warmup=warmup)
