"""Measure the two roofline ceilings of the machine running the code: a streaming read and a matmul sweep.

The roofline's ceilings (Williams et al. 2009, section 2) are *attainable* peaks, found with micro-benchmarks:
the memory ceiling with a stream over arrays much larger than the caches, the compute ceiling with the fastest
dense matmul. Conventions, stated once:

* bytes are counted as :mod:`refimpl.roofline.ops` counts them for every operator: each input read once,
  each output written once (:func:`read_stream` is such an operator, so a ceiling and the operators under it
  are in the same units);
* the memory ceiling is measured the way the memory-bound operators of an LLM use memory, by *reading*: a
  GEMV, decode attention and a norm read far more than they write. A copy (:func:`stream_bandwidth`, STREAM's
  "Copy") also pays for write-allocate traffic that its byte count leaves out, so it understates the
  bandwidth such operators reach;
* an ``n x n @ n x n`` matmul costs ``2 n^3`` FLOPs (one multiply and one add per term).

Every timing is the minimum over ``repeats`` runs after ``warmup`` runs, and a ceiling is the best over
several sizes: the ceiling is the best the machine does, and the minimum is the estimate least disturbed by
other processes sharing the cores. :func:`measure_operators` times operators in the same rounds as the read
stream, so that on a shared machine a ceiling and the points under it see the same load.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from refimpl._checks import check_choice, check_int, check_positive_int, check_tensor
from refimpl.roofline.dtypes import normalize_dtype
from refimpl.roofline.ops import Operator

__all__ = [
    "READ_KERNELS",
    "decode_layer_time",
    "matmul_flops",
    "matvec_time",
    "measure_operators",
    "read_bandwidth",
    "read_stream",
    "stream_bandwidth",
    "time_fn",
    "time_interleaved",
]

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


#: Read-dominated streaming kernels of :func:`read_stream`.
READ_KERNELS = ("sum", "matvec")
_ROW = 4096  # row length of the matvec stream, in fp32 numbers


def read_stream(nbytes: int, kernel: str = "sum") -> tuple[Operator, Callable[[], Any]]:
    """A read-dominated streaming kernel over an fp32 array ``x`` of ``nbytes`` bytes (``n = nbytes / 4``).

    ``kernel="sum"``: ``x.sum()``; ``kernel="matvec"``: ``x`` viewed as ``(n / 4096, 4096)`` times a vector of
    4096 (the access pattern of a GEMV). Returns the kernel as an :class:`~refimpl.roofline.ops.Operator`, its
    bytes counted by the operators' convention (inputs read once, output written once), and the function that
    runs it. Raises ``ValueError`` for ``nbytes`` below 16 KiB (one row) or an unknown ``kernel``.
    """
    nbytes = check_int("nbytes", nbytes, min_value=4 * _ROW)
    check_choice("kernel", kernel, READ_KERNELS)
    n = nbytes // (4 * _ROW) * _ROW  # a whole number of rows
    x = torch.ones(n, dtype=torch.float32)  # (n,), touched so its pages exist before timing
    if kernel == "sum":
        out = torch.empty((), dtype=torch.float32)
        op = Operator("read stream (sum)", flops=n - 1, bytes_read=4 * n, bytes_written=4, kind="memory")
        return op, lambda: torch.sum(x, dim=0, out=out)
    rows = x.view(n // _ROW, _ROW)  # (n / 4096, 4096)
    vec = torch.ones(_ROW, dtype=torch.float32)  # (4096,)
    res = torch.empty(n // _ROW, dtype=torch.float32)  # (n / 4096,)
    op = Operator(
        "read stream (matvec)", flops=2 * n, bytes_read=4 * (n + _ROW), bytes_written=4 * (n // _ROW), kind="memory"
    )
    return op, lambda: torch.mv(rows, vec, out=res)


def read_bandwidth(
    sizes: Sequence[int] = (64 * 2**20, 128 * 2**20),
    *,
    kernels: Sequence[str] = READ_KERNELS,
    repeats: int = 5,
    warmup: int = 1,
) -> float:
    """Memory ceiling in bytes/s for read-mostly operators: the best :func:`read_stream` over ``sizes`` (bytes)
    and ``kernels``, each timed ``repeats`` times (minimum).

    The sizes should exceed the last-level cache (the defaults do on common CPUs) and match the working sets of
    the operators to be placed under the ceiling. Two kernels, because on a shared machine one of them may be
    held back (a multithreaded sum waits for its slowest thread) while the memory could deliver more.
    Raises ``ValueError`` for an empty ``sizes`` or ``kernels``, or a size below 16 KiB.
    """
    if not sizes or not kernels:
        raise ValueError(f"sizes and kernels must each name at least one, got {list(sizes)} and {list(kernels)}")
    best = 0.0
    for nbytes in sizes:
        for kernel in kernels:
            op, fn = read_stream(nbytes, kernel)
            best = max(best, op.bytes / time_fn(fn, repeats=repeats, warmup=warmup))
    return best


def matvec_time(weights: Sequence[Tensor], *, repeats: int = 5, warmup: int = 1) -> float:
    """Seconds for one vector-matrix product ``x @ W`` with each ``W: (in, out)`` of ``weights``, in order.

    The weight reads of one decode step at batch 1, without anything else the step does: the minimum over
    ``repeats`` passes over all of ``weights``. ``x: (1, in)`` is in each matrix's dtype and device.
    Raises ``ValueError`` for an empty ``weights`` or a tensor that is not 2-D floating point.
    """
    if not weights:
        raise ValueError("weights must hold at least one (in, out) matrix, got an empty sequence")
    for i, w in enumerate(weights):
        check_tensor(f"weights[{i}]", w, ndim=2, floating=True)
    xs = [torch.ones(1, w.shape[0], dtype=w.dtype, device=w.device) for w in weights]  # (1, in) each

    def run() -> None:
        for x, w in zip(xs, weights):
            torch.matmul(x, w)  # (1, out)
        _sync(weights[0].device)

    with torch.inference_mode():
        return time_fn(run, repeats=repeats, warmup=warmup)


def measure_operators(
    kernels: Mapping[str, tuple[Operator, Callable[[], Any]]],
    bandwidth: float,
    *,
    read_sizes: Sequence[int] = (64 * 2**20,),
    repeats: int = 5,
    warmup: int = 1,
) -> tuple[float, dict[str, tuple[float, float]]]:
    """Time each ``name: (operator, fn)`` of ``kernels`` right after every :func:`read_stream` of ``read_sizes``.

    In each of ``repeats`` rounds, every kernel runs once, each run preceded and followed by two runs of every
    read stream, so the memory ceiling is sampled next to every operator, under the same load, and more often
    than any one operator (a ceiling is the best the machine does; on a shared machine the best needs many
    samples).
    Returns the memory ceiling ``bandwidth`` (B/s, e.g. a :class:`~refimpl.roofline.Hardware`'s) raised to the
    best read stream seen here if that is higher, and ``{name: (intensity, achieved FLOP/s)}`` with achieved =
    ``op.flops / min time``.
    """
    if not kernels:
        raise ValueError("kernels must name at least one (operator, function) pair, got an empty mapping")
    repeats = check_positive_int("repeats", repeats)
    warmup = check_int("warmup", warmup, min_value=0)
    streams = [read_stream(n, k) for n in read_sizes for k in READ_KERNELS]
    best = dict.fromkeys(kernels, float("inf"))
    for _ in range(warmup):
        for _, fn in [*kernels.values(), *streams]:
            fn()

    def sample_ceiling() -> float:
        return max(op.bytes / time_fn(stream, repeats=2, warmup=0) for op, stream in streams)

    for _ in range(repeats):
        for name, (_, fn) in kernels.items():
            bandwidth = max(bandwidth, sample_ceiling())
            best[name] = min(best[name], time_fn(fn, repeats=1, warmup=0))
            bandwidth = max(bandwidth, sample_ceiling())
    points = {name: (op.intensity, op.flops / best[name]) for name, (op, _) in kernels.items()}
    return bandwidth, points


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
    it with ``analyze(model, hardware, Workload(stage="decode", ...)).layer_time``. Dense models only.
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
