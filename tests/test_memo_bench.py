"""The MEMO benchmarks run: the CPU one prints its ratios as numbers; the GPU one exits clearly without CUDA."""

from __future__ import annotations

import pytest
import torch


def test_bench_memo_quick_prints_both_ratios(run_benchmark):
    result, lines = run_benchmark("bench_memo", ["--quick"])
    for name in ("memo_peak_memory_ratio", "memo_step_time_ratio", "memo_alpha"):
        assert float(lines[name]) == pytest.approx(result[name], rel=1e-3)
    # The memory ratio is exact (a ledger), so its ordering can be asserted; times are only reported.
    assert result["offload_peak_memory_ratio"] <= result["memo_peak_memory_ratio"] <= 1.0
    assert 0.0 <= result["memo_alpha"] <= 1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without CUDA")
def test_bench_memo_gpu_exits_clearly_without_cuda(capsys, load_benchmark):
    with pytest.raises(SystemExit) as exit_info:
        load_benchmark("bench_memo_gpu").main(["--quick"])
    assert exit_info.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err
