"""What every benchmark shares: its command line, its output format, the CUDA check of the GPU benchmarks, progress
on a terminal.

A benchmark prints ``# comment`` lines and ``name: value`` lines to stdout, one number format for all of them
(:func:`report`). Progress bars (:func:`progress`, tqdm) go to stderr and only when stderr is a terminal, so the
output a test or a notebook parses stays exactly those lines. The benchmarks import this module as ``_common``:
``python benchmarks/bench_x.py`` puts this folder on ``sys.path`` (the tests' loader does the same).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator, Mapping
from numbers import Integral, Real
from typing import Any, TypeVar

T = TypeVar("T")


def argument_parser(
    doc: str, quick: str = "tiny sizes (for tests)", *, threads: bool = False
) -> argparse.ArgumentParser:
    """The command line every benchmark starts from: its module docstring ``doc`` as the help text and ``--quick``
    (``quick`` says what it shrinks); with ``threads``, also ``--threads`` (torch intra-op threads, default 1)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick)
    if threads:
        parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    return parser


def format_value(value: Any) -> str:
    """The one number format: integers (and bools) as integers, other reals to 6 significant digits."""
    if isinstance(value, Integral):
        return str(int(value))
    if isinstance(value, Real):
        return f"{float(value):.6g}"
    return str(value)


def report(values: Mapping[str, Any], header: str | None = None) -> list[str]:
    """Print ``# header`` (if given), then one ``name: value`` line per entry; return those lines."""
    if header is not None:
        print(f"# {header}")
    lines = [f"{name}: {format_value(value)}" for name, value in values.items()]
    for line in lines:
        print(line, flush=True)
    return lines


def require_cuda(script: str, measures: str, cpu_benchmark: str) -> None:
    """Exit with status 2 and a message on stderr when no CUDA device is available.

    ``script`` names the benchmark, ``measures`` says what it measures, ``cpu_benchmark`` what to run instead.
    """
    import torch

    if not torch.cuda.is_available():
        print(
            f"{script}: no CUDA device is available; this benchmark measures {measures} and cannot run on a CPU "
            f"(the CPU benchmark is {cpu_benchmark})",
            file=sys.stderr,
        )
        raise SystemExit(2)


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """``iterable`` with a progress bar on stderr when stderr is a terminal (tqdm), silent otherwise."""
    from tqdm import tqdm

    # disable=None: tqdm turns itself off when its file is not a terminal (a pipe, a test's capture, a notebook).
    return iter(tqdm(iterable, desc=desc, total=total, file=sys.stderr, disable=None, leave=False, dynamic_ncols=True))
