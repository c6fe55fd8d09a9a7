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
        code(
            'glue("big", math.pi * 1e6, display=False)  # a comment stays\n'
            'glue(\n    "word",\n    "yes"\n    if r > 0\n    else "no",\n    display=False,\n)'
        ),
        md("Large: {glue}`big:,.0f`, {glue:text}`word`."),
    ]
    path = _write(tmp_path / "ch.ipynb", cells)
    result = glue_to_eval.convert(path)
    assert result.problems == [] and result.references == 5
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
    assert shown == [format(2 / 3, ".2f"), format(2 / 3, ".1%"), "1", format(pi, ",.0f"), "yes"]


def test_a_chapter_that_needs_a_hand_is_left_unchanged(tmp_path: Path) -> None:
    cases = {
        "before, prose between": [
            code(IMPORTS),
            md("Soon: {glue:text}`x`."),
            md("More prose."),
            code('glue("x", 1, display=False)'),
        ],
        "never glued": [code(IMPORTS), md("{glue:text}`y`")],
        "displayed": [code(IMPORTS), code('glue("x", 1)'), md("{glue:text}`x`")],
        "unparsable": [code(IMPORTS), code('%time glue("x", 1, display=False)'), md("{glue:text}`x`")],
    }
    expected = {
        "before, prose between": "comes before cell 3 computes it, and markdown cell 2 lies between",
        "never glued": "has no glue('y', ..., display=False)",
        "displayed": "also displays its value",
        "unparsable": "does not parse",
    }
    for name, cells in cases.items():
        path = _write(tmp_path / f"{name.replace(' ', '_').replace(',', '')}.ipynb", cells)
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


def _run_in_order(nb) -> list[str]:
    """Execute the code cells and evaluate each markdown cell's {eval} expressions where the cell stands, as
    JupyterLab's Run All and the book's inline execution do; returns what the prose shows."""
    namespace: dict = {}
    shown = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            exec(cell.source, namespace)
        else:
            shown += [str(eval(e, namespace)) for e in re.findall(r"\{eval\}`([^`]+)`", cell.source)]
    return shown


def test_prose_before_the_cell_that_computes_its_numbers_moves_after_it(tmp_path: Path) -> None:
    fence = "```{note}\nA note with {glue:text}`late` and\n\na blank line inside.\n```"
    cells = [
        code(IMPORTS + '\nglue("early", 1.5, display=False)'),
        md(f"## Section\n\nEarly {{glue:text}}`early:.1f`.\n\nLate {{glue:text}}`late:.0%` here.\n\n{fence}"),
        code("show = 'a cell that only shows code'"),
        code('for k in "ab":\n    glue(f"x_{k}", len(k) / 4, display=False)\nglue("late", 0.25, display=False)'),
        md("Computed keys: {glue:text}`x_a:.2f`."),
    ]
    path = _write(tmp_path / "ch.ipynb", cells)
    result = glue_to_eval.convert(path)
    assert result.problems == [] and list(result.moves) == [1] and result.moves[1][2] == 3
    nb = nbformat.read(path, 4)
    assert [c.cell_type for c in nb.cells] == ["code", "markdown", "code", "code", "markdown", "markdown"]
    assert nb.cells[1].source == '## Section\n\nEarly {eval}`f"{glued.early:.1f}"`.'
    assert nb.cells[4].source.startswith('Late {eval}`f"{glued.late:.0%}"` here.') and "a blank line inside" in (
        nb.cells[4].source
    ), "the paragraphs after the first late one move with it, a fenced block whole"
    assert 'setattr(glued, f"x_{k}", len(k) / 4)' in nb.cells[3].source
    assert _run_in_order(nb) == ["1.5", "25%", "0.25", "0.25"]
    again = path.read_text()
    assert glue_to_eval.convert(path).references == 0 and path.read_text() == again, "a second run changes nothing"


def test_converted_prose_has_no_typed_numbers(tmp_path: Path) -> None:
    from tools.book_policy import typed_numbers_in

    path = _write(
        tmp_path / "ch.ipynb", [code(IMPORTS + '\nglue("r", 0.5, display=False)'), md("R is {glue:text}`r:.2f`.")]
    )
    glue_to_eval.convert(path)
    prose = nbformat.read(path, 4).cells[1].source
    assert "{eval}" in prose and typed_numbers_in(prose) == []
