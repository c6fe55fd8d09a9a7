"""The interactive path: a chapter run with "Run All" in JupyterLab (with jupyterlab-myst, as ``make lab`` sets it up)
in headless Chromium shows computed numbers in the prose, no error, and widgets that respond (tools/check_lab.py).

A mini notebook with each defect (raw glue markup, a widget whose output ignores its control, a failing cell, a
citation whose work no cell lists) must fail the same check, and its clean twin pass.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from tools.check_lab import check_notebooks

ROOT = Path(__file__).resolve().parent.parent
md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell
GLUED = "from types import SimpleNamespace\nglued = SimpleNamespace()\nglued.ratio = 2 / 3\nglued.n = 5"
WIDGET = (
    "import ipywidgets as widgets\nfrom refimpl.interact import interactive\n\n"
    "def f(n):\n    print({})\n\ninteractive(f, n=widgets.IntSlider(1, 0, 9))"
)


def _notebook(path: Path, cells: list) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = cells
    nbformat.write(nb, path)
    return path


@pytest.mark.slow
def test_a_notebook_with_eval_prose_and_a_widget_passes_and_each_defect_fails(tmp_path: Path) -> None:
    good_cells = [
        md("# A chapter"),
        code(GLUED),
        md('Ratio {eval}`f"{glued.ratio:.1%}"`, count {eval}`glued.n`, see {cite:p}`williams2009roofline`.'),
        code(WIDGET.format("'n is', n")),
        code('from refimpl.display import references\n\nreferences("good.ipynb")'),
    ]
    # The bad notebook is the good one with a defect in place of cells 2-4 and one more cell after them; each defect
    # with what the check must say about it.
    defects = [
        (
            2,
            md("Ratio {glue:text}`ratio:.1%`, count {eval}`glued.n`, see {cite:p}`williams2009roofline`."),
            ["raw markup in the prose", "{glue:text}"],
        ),
        (3, code(WIDGET.format("'always the same'")), ["widget 0: its output did not change"]),
        (
            4,  # in place of the cell that lists the cited works
            code("raise ValueError('a failing cell')"),
            [
                "error/stderr output in a cell",
                "a failing cell",
                "does not list the cited works ['williams2009roofline']",
            ],
        ),
        (5, md("After the failure: {eval}`glued.n + 1`."), ["shows no value: glued.n + 1"]),
    ]
    bad_cells = list(good_cells)
    for i, cell, _ in defects:
        bad_cells[i : i + 1] = [cell]  # replaces cell i, or appends at the end
    good = _notebook(tmp_path / "good.ipynb", good_cells)
    bad = _notebook(tmp_path / "bad.ipynb", bad_cells)
    reports = check_notebooks([good, bad], timeout_s=90)  # one JupyterLab for both
    report = reports["good.ipynb"]
    assert report["problems"] == [] and report["evals"] == 2 and report["widgets"] == 1, report
    problems = "\n".join(reports["bad.ipynb"]["problems"])
    for _, _, messages in defects:
        for message in messages:
            assert message in problems, (message, problems)


@pytest.mark.slow
def test_the_flash_attention_chapter_runs_in_jupyterlab() -> None:
    report = check_notebooks([ROOT / "chapters" / "flash_attention.ipynb"])["flash_attention.ipynb"]
    assert report["problems"] == [], report
    assert report["evals"] > 30 and report["widgets"] >= 1, report
