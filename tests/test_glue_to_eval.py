"""tools/glue_to_eval.py: glue references become {eval} expressions that show the same text, or nothing changes."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat

from tools import glue_to_eval

md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell


def _write(path: Path, cells: list) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = cells
    path.write_text(nbformat.writes(nb) + "\n")
    return path


IMPORTS = "import math\nfrom myst_nb import glue\nfrom os import (\n    sep,\n)"


def test_a_chapter_converts_to_eval_expressions_that_show_what_glue_showed(tmp_path: Path) -> None:
    cells = [
        code(IMPORTS),
        code('r = 2 / 3\nglue("ratio", r, display=False)\nfor i in range(2):\n    glue("count", i, display=False)'),
        md("The ratio is {glue:text}`ratio:.2f` ({glue:text}`ratio:.1%`), the count {glue:text}`count`."),
        code('glue("big", math.pi * 1e6, display=False)  # a comment stays'),
        md("Large: {glue}`big:,.0f`."),
    ]
    path = _write(tmp_path / "ch.ipynb", cells)
    result = glue_to_eval.convert(path)
    assert result.problems == [] and result.references == 4
    nb = nbformat.read(path, 4)
    sources = [c.source for c in nb.cells]
    assert "glued = SimpleNamespace()" in sources[0] and "from myst_nb" not in sources[0]
    assert "glued.count = i" in sources[1] and "glued.big = math.pi * 1e6  # a comment stays" in sources[3]
    assert "{glue:" not in sources[2] + sources[4] and "{glue}" not in sources[4]
    # Run the converted code, then evaluate each {eval} expression as jupyterlab-myst and myst-nb would.
    namespace: dict = {}
    for cell in nb.cells:
        if cell.cell_type == "code":
            exec(cell.source, namespace)
    shown = [
        str(eval(expr, namespace))
        for c in nb.cells
        if c.cell_type == "markdown"
        for expr in re.findall(r"\{eval\}`([^`]+)`", c.source)
    ]
    pi = 3.141592653589793e6
    assert shown == [format(2 / 3, ".2f"), format(2 / 3, ".1%"), "1", format(pi, ",.0f")]


def test_a_chapter_that_needs_a_hand_is_left_unchanged(tmp_path: Path) -> None:
    cases = {
        "before": [code(IMPORTS), md("Soon: {glue:text}`x`."), code('glue("x", 1, display=False)')],
        "computed key": [
            code(IMPORTS),
            code('for k in "ab":\n    glue(f"x_{k}", 1, display=False)'),
            md("{glue:text}`x_a`"),
        ],
        "displayed": [code(IMPORTS), code('glue("x", 1)'), md("{glue:text}`x`")],
        "unparsable": [code(IMPORTS), code('%time glue("x", 1, display=False)'), md("{glue:text}`x`")],
    }
    expected = {
        "before": "comes before cell 2 computes it",
        "computed key": "glue with a computed key",
        "displayed": "also displays its value",
        "unparsable": "does not parse",
    }
    for name, cells in cases.items():
        path = _write(tmp_path / f"{name.replace(' ', '_')}.ipynb", cells)
        before = path.read_text()
        result = glue_to_eval.convert(path)
        assert any(expected[name] in p for p in result.problems), (name, result.problems)
        assert path.read_text() == before, f"{name}: a notebook that needs a hand must not be half converted"


def test_check_reports_every_chapter_and_exits_1_when_one_needs_a_hand(tmp_path: Path, capsys) -> None:
    good = _write(tmp_path / "good.ipynb", [code(IMPORTS + '\nglue("x", 1, display=False)'), md("{glue:text}`x`")])
    bad = _write(tmp_path / "bad.ipynb", [code(IMPORTS), md("{glue:text}`x`")])
    assert glue_to_eval.main(["check", str(good)]) == 0
    assert glue_to_eval.main(["check", str(good), str(bad)]) == 1
    out = capsys.readouterr().out
    assert "good.ipynb: 1 references, converts" in out and "bad.ipynb: 1 references, needs a hand" in out
    assert "{glue:text}" in good.read_text(), "check writes nothing"
