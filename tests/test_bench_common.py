"""The benchmarks' shared helper (benchmarks/_common.py): one number format, the CUDA check, quiet progress."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import _common  # noqa: E402


def test_one_number_format():
    assert [_common.format_value(v) for v in (3, True, 0.5, 1 / 3, 2.5e-9, 1e20, "cpu")] == [
        "3",
        "1",
        "0.5",
        "0.333333",
        "2.5e-09",
        "1e+20",
        "cpu",
    ]
    assert _common.format_value(torch.tensor(7).item()) == "7"


def test_report_prints_name_value_lines_after_a_comment(capsys):
    lines = _common.report({"ratio": 2 / 3, "tokens": 128}, header="setup")
    assert lines == ["ratio: 0.666667", "tokens: 128"]
    assert capsys.readouterr().out == "# setup\nratio: 0.666667\ntokens: 128\n"


def test_progress_yields_everything_and_is_silent_off_a_terminal(capsys):
    assert not sys.stderr.isatty()  # pytest captures stderr
    assert list(_common.progress(iter(range(5)), desc="x", total=5)) == list(range(5))
    assert capsys.readouterr() == ("", "")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the exit without CUDA")
def test_require_cuda_exits_with_a_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _common.require_cuda("bench_x", "GPU kernels", "benchmarks/bench_y.py")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("bench_x: no CUDA device is available") and "benchmarks/bench_y.py" in err
