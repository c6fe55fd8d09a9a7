"""The MEMO benchmarks run: the CPU one prints its ratios as numbers; the GPU one exits clearly without CUDA."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_bench_memo_quick_prints_both_ratios(capsys):
    threads = torch.get_num_threads()
    try:
        result = _load("bench_memo").main(["--quick"])
    finally:
        torch.set_num_threads(threads)
    lines = dict(re.findall(r"^(\w+): (\S+)$", capsys.readouterr().out, flags=re.M))
    for name in ("memo_peak_memory_ratio", "memo_step_time_ratio", "memo_alpha"):
        assert float(lines[name]) == pytest.approx(result[name], rel=1e-3)
    # The memory ratio is exact (a ledger), so its ordering can be asserted; times are only reported.
    assert result["offload_peak_memory_ratio"] <= result["memo_peak_memory_ratio"] <= 1.0
    assert 0.0 <= result["memo_alpha"] <= 1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without CUDA")
def test_bench_memo_gpu_exits_clearly_without_cuda(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _load("bench_memo_gpu").main(["--quick"])
    assert exit_info.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err
