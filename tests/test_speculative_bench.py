"""benchmarks/bench_speculative.py runs and prints what the issue asks for (tiny sizes; the numbers are not
asserted beyond what holds by construction)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.model
def test_bench_speculative_quick(capsys):
    spec = importlib.util.spec_from_file_location("bench_speculative", ROOT / "benchmarks" / "bench_speculative.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--quick", "--new-tokens", "6", "--prompt-len", "32", "--gamma", "2"])
    for key in (
        "spec_greedy_speedup",
        "spec_outputs_identical",
        "spec_tokens_per_target_forward",
        "spec_acceptance_rate",
    ):
        assert key in out
    assert out["spec_outputs_identical"] == 1.0
    assert 1.0 <= out["spec_tokens_per_target_forward"] <= 3.0  # gamma + 1 tokens at most per forward
    lines = [ln for ln in capsys.readouterr().out.splitlines() if not ln.startswith("#")]
    assert all(": " in ln and float(ln.split(": ")[1]) == float(ln.split(": ")[1]) for ln in lines)
