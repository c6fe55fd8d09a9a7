"""Shared pytest configuration: the repository root on sys.path for ``tools/`` imports; OpenMP wait policy; the
``one_thread`` and ``run_benchmark`` fixtures."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

# Idle OpenMP threads spin briefly, then sleep (see the Makefile and refimpl.llm.matvec); set before anything
# imports torch. The Makefile exports the same for notebooks and benchmarks.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
BENCHMARKS = ROOT / "benchmarks"


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Run a test module single-threaded, restoring torch's thread count afterwards.

    The tests issue many small operations (tiled loops, batch-1 decoding, tiny tensors); on a busy 2-core
    machine OpenMP's fork/join and barriers cost more than threads gain (10-100x slower measured under load).
    Use it with ``pytestmark = pytest.mark.usefixtures("one_thread")`` or as a test argument.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _load_benchmark(name: str) -> Any:
    """Import ``benchmarks/<name>.py`` as a module (with ``benchmarks/`` on ``sys.path`` for its ``_common``)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def load_benchmark() -> Callable[[str], Any]:
    """``load_benchmark(name)``: the module ``benchmarks/<name>.py``, imported (its ``main`` not run)."""
    return _load_benchmark


@pytest.fixture
def run_benchmark(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[Any, dict[str, str]]]:
    """``run_benchmark(name, argv, positive=())``: run ``benchmarks/<name>.py``'s ``main(argv)`` and return ``(its
    result, {name: value} of the lines it printed)``, having asserted that the line of every name in ``positive``
    was printed with a finite positive number; torch's thread count is restored afterwards (benchmarks set it)."""

    def run(name: str, argv: Sequence[str], positive: Sequence[str] = ()) -> tuple[Any, dict[str, str]]:
        import torch

        module = _load_benchmark(name)
        threads = torch.get_num_threads()
        try:
            result = module.main(list(argv))
        finally:
            torch.set_num_threads(threads)
        lines = dict(re.findall(r"^(\w+): (.+)$", capsys.readouterr().out, flags=re.M))
        for key in positive:
            assert key in lines, f"{name} printed no {key}: line"
            assert 0 < float(lines[key]) < math.inf, f"{name} printed {key}: {lines[key]}, not a positive number"
        return result, lines

    return run
