"""benchmarks/bench_speculative.py runs and prints what the issue asks for (tiny sizes; the numbers are not
asserted beyond what holds by construction)."""

from __future__ import annotations

import pytest


@pytest.mark.model
def test_bench_speculative_quick(run_benchmark):
    out, lines = run_benchmark(
        "bench_speculative", ["--quick", "--new-tokens", "6", "--prompt-len", "32", "--gamma", "2"]
    )
    for key in (
        "spec_greedy_speedup",
        "spec_outputs_identical",
        "spec_tokens_per_target_forward",
        "spec_acceptance_rate",
    ):
        assert key in out
    assert out["spec_outputs_identical"] == 1.0
    assert 1.0 <= out["spec_tokens_per_target_forward"] <= 3.0  # gamma + 1 tokens at most per forward
    assert set(lines) == set(out)  # every value is printed as a name: number line
    assert all(float(value) == float(value) for value in lines.values())
