"""``x @ W`` for a few rows ``x``, at the speed of reading ``W`` once: the products of a decode step.

A decode step multiplies each weight matrix ``W: (in, out)`` by one row per sequence. That reads every weight
once for 2 FLOPs per row (Williams et al. 2009: far left of the ridge point), so the step can be no faster
than ``weight bytes / memory bandwidth`` and a good product runs at the bandwidth. On the book's 2-core AMD
CPU, MKL's ``x @ W`` (``torch.matmul``) does not: it reads ``(in, out)`` weights well below the STREAM
bandwidth with one row, and slower still with two to sixteen rows (`python benchmarks/bench_llm.py` prints
both). :func:`matvec` runs a short C loop instead (``kernels/matvec.c``): the rows of ``W`` are cut into two
halves, each summed in a pass of its own and the two added, so that two threads each stream one contiguous
half of ``W``, four rows at a time (on this VM a contiguous stream per thread read up to 1.3x faster than
threads taking turns within each row).

The C file is compiled on first use with the system's C compiler (``cc -O3 -march=native -fopenmp``) into
``$REFIMPL_CACHE`` (default ``~/.cache/refimpl``) and loaded with ``ctypes``; it shares torch's OpenMP runtime
and uses ``torch.get_num_threads()`` threads. Where there is no compiler, or for inputs it does not cover
(not float32 on the CPU, more than :data:`MAX_ROWS` rows, a graph to record), :func:`matvec` is ``x @ w``.
``REFIMPL_MATVEC=0`` turns the kernel off everywhere, and ``with blas_only():`` inside one block (a before/after
measurement in one run). Each output sums the same terms in the same order (first half, second half, then their
sum) whatever the batch or thread count, so a row's result depends neither on the rows beside it nor on the
threads.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from refimpl._checks import check_tensor

__all__ = ["MAX_ROWS", "blas_only", "kernel_available", "kernel_matvec", "kernel_source", "matvec"]

MAX_ROWS = 16
"""Rows up to which :func:`matvec` uses the kernel (and up to which a row's result does not depend on the batch).
With more rows the product is no longer bound by reading ``W`` and the BLAS's blocked matrix product catches up;
on the book's 2-core VM where it does moved from run to run, with where the host ran its two cores
(``python benchmarks/bench_llm.py`` prints ``matvec_time_vs_blas_rows_N`` for 1 to 64 rows). Up to 16 rows the
kernel was the faster in every run measured."""

_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")


def _cpu_key() -> str:
    """What the compiled file depends on besides the source: compiler flags and the CPU (``-march=native``)."""
    cpu = platform.processor() or platform.machine()
    try:
        flags = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")][:1]
        cpu += "".join(flags)
    except OSError:
        pass
    return " ".join(_FLAGS) + cpu


def kernel_source() -> str:
    """The C source of the kernel (``refimpl/llm/kernels/matvec.c``, shipped inside the package)."""
    return resources.files("refimpl.llm").joinpath("kernels/matvec.c").read_text()


@cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernel, built once per source, flags and CPU; ``None`` where it cannot be built."""
    if os.environ.get("REFIMPL_MATVEC", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None
    source = kernel_source().encode()
    digest = hashlib.sha256(source + _cpu_key().encode()).hexdigest()[:16]
    out_dir = Path(os.environ.get("REFIMPL_CACHE", Path.home() / ".cache" / "refimpl"))
    target = out_dir / f"matvec-{digest}.so"
    if not target.exists():
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
                src, built = Path(tmp) / "matvec.c", Path(tmp) / "matvec.so"
                src.write_bytes(source)
                subprocess.run([compiler, *_FLAGS, str(src), "-o", str(built)], check=True, capture_output=True)
                os.replace(built, target)  # atomic: a process running beside this one sees all of it or none
        except (OSError, subprocess.CalledProcessError):
            return None
    lib = ctypes.CDLL(str(target))
    p, n = ctypes.c_void_p, ctypes.c_long
    lib.matvec.argtypes = [p, p, p, p, n, n, n, ctypes.c_int]
    lib.matvec.restype = None
    return lib


def kernel_available() -> bool:
    """Whether :func:`matvec` runs the C kernel here (a C compiler with OpenMP, and ``REFIMPL_MATVEC`` not 0)."""
    return _library() is not None


_blas_only = False


@contextmanager
def blas_only() -> Iterator[None]:
    """Inside the block :func:`matvec` is ``x @ w`` (the BLAS), for measuring the kernel against it."""
    global _blas_only
    before, _blas_only = _blas_only, True
    try:
        yield
    finally:
        _blas_only = before


def _check(x: Tensor, w: Tensor) -> int:
    """Validate ``x: (..., in)`` against ``w: (in, out)``; return the number of rows of ``x``."""
    check_tensor("w", w, ndim=2)
    check_tensor("x", x)
    if x.dim() == 0 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"x must have shape (..., {w.shape[0]}) to multiply w {tuple(w.shape)}, got {tuple(x.shape)}")
    return x.numel() // w.shape[0] if w.shape[0] else 0


def matvec(x: Tensor, w: Tensor) -> Tensor:
    """``x @ w`` for ``x: (..., in)`` and ``w: (in, out)``; returns ``(..., out)``.

    Up to :data:`MAX_ROWS` rows of float32 on the CPU (outside autograd), through the C kernel
    (:func:`kernel_matvec`): the same products as ``x @ w``, summed in another order (within float32 rounding
    of it). Otherwise ``x @ w``.
    """
    rows = _check(x, w)
    lib = None if _blas_only else _library()
    fits = x.dtype == w.dtype == torch.float32 and x.is_cpu and w.is_cpu and w.is_contiguous()
    recording = torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
    if lib is None or not fits or recording or not 0 < rows <= MAX_ROWS or w.shape[1] == 0:
        return x @ w
    return _run(lib, x, w, rows)


def kernel_matvec(x: Tensor, w: Tensor) -> Tensor:
    """``x @ w`` through the C kernel for any number of rows (float32 on the CPU, ``w`` contiguous, no graph):
    what :func:`matvec` runs, for measuring the kernel beyond :data:`MAX_ROWS`. Raises ``RuntimeError`` where
    the kernel is not available and ``ValueError`` / ``TypeError`` for inputs it does not take."""
    rows = _check(x, w)
    lib = _library()
    if lib is None:
        raise RuntimeError("the matvec kernel is not available here (no C compiler with OpenMP, or REFIMPL_MATVEC=0)")
    check_tensor("x", x, dtypes=[torch.float32])
    check_tensor("w", w, dtypes=[torch.float32])
    if not (x.is_cpu and w.is_cpu and w.is_contiguous()):
        raise ValueError(f"x and w must be on the CPU and w contiguous, got {x.device}, {w.device}, {w.stride()}")
    return _run(lib, x, w, rows)


def _run(lib: ctypes.CDLL, x: Tensor, w: Tensor, rows: int) -> Tensor:
    """The kernel call itself, on inputs already checked: ``x: (..., in)`` with ``rows`` rows, ``w: (in, out)``.
    About 120 calls make a decode step, so this does only what the call needs (no copy, reshape or view of an
    ``x`` that is already contiguous: the kernel reads its ``rows`` rows of ``in`` floats from the pointer)."""
    n_in, n_out = w.shape
    x = x if x.is_contiguous() else x.contiguous()
    y = torch.empty(*x.shape[:-1], n_out, dtype=torch.float32)  # (..., out): W's first half of rows, then all
    partial = torch.empty_like(y)  # (..., out): the second half
    if rows and n_out:
        lib.matvec(
            x.data_ptr(), w.data_ptr(), y.data_ptr(), partial.data_ptr(), rows, n_in, n_out, torch.get_num_threads()
        )
    return y
