"""refimpl.display.progress: the items pass through unchanged; no bar without a terminal or in the book build."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from refimpl.display import PROGRESS_ENV, progress

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("setting", ["0", "1"])
def test_progress_yields_every_item_and_prints_nothing_without_a_terminal(monkeypatch, capsys, setting) -> None:
    monkeypatch.setenv(PROGRESS_ENV, setting)
    assert list(progress(range(5), "steps")) == [0, 1, 2, 3, 4]
    assert list(progress((x for x in "ab"), "letters", total=2)) == ["a", "b"]
    out, err = capsys.readouterr()
    assert out == err == ""


def test_the_book_build_turns_progress_off_for_its_kernels() -> None:
    """_ext/book_budget.py sets the variable in the Sphinx process, which the executing kernels inherit."""
    code = (
        f"import os, sys; sys.path.insert(0, {str(ROOT / '_ext')!r}); import book_budget\n"
        "class C: nb_execution_timeout = 0\n"
        "book_budget._install(None, C())\n"
        "print(os.environ['REFIMPL_PROGRESS'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0"
