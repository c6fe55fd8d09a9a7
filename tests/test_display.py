"""refimpl.display (source display, book style) and refimpl._checks (boundary validation)."""

from __future__ import annotations

import matplotlib as mpl
import pytest
import torch

from refimpl import _checks
from refimpl.display import BOOK_STYLE, Claim, claims_table, references, show_source, source_of, use_book_style


def test_show_source_renders_the_real_source_as_highlighted_html() -> None:
    shown = show_source(_checks.check_int)
    html = shown._repr_html_()
    assert "refimpl._checks.check_int" in html
    assert "def" in html and "check_int" in html and "style=" in html  # inline Pygments styles
    assert repr(shown) == source_of(_checks.check_int)
    assert repr(shown).startswith("def check_int(")


def test_show_source_of_a_method_is_dedented() -> None:
    from refimpl.display import SourceCode

    code = source_of(SourceCode._repr_html_)
    assert code.startswith("def _repr_html_")


def test_source_code_highlights_c_with_the_c_lexer() -> None:
    from refimpl.display import SourceCode
    from refimpl.llm.matvec import kernel_source

    c = SourceCode(kernel_source(), title="matvec.c", language="c")._repr_html_()
    as_python = SourceCode(kernel_source(), title="matvec.c")._repr_html_()
    assert "matvec.c" in c and "omp_get_thread_num" in c
    assert c != as_python  # '#pragma' and '/* */' are tokens of C, not of Python


def test_show_source_rejects_objects_without_source() -> None:
    with pytest.raises(TypeError, match="obj must be a Python function"):
        show_source(len)


def test_use_book_style_sets_the_rcparams() -> None:
    with mpl.rc_context():
        use_book_style()
        for key, value in BOOK_STYLE.items():
            if key != "axes.prop_cycle":
                assert mpl.rcParams[key] == value or list(mpl.rcParams[key]) == list(value), key
        assert mpl.rcParams["font.size"] >= 10  # readable at the book's width


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: _checks.check_int("n", 1.5), TypeError, "n must be an int, got float 1.5"),
        (lambda: _checks.check_int("n", True), TypeError, "n must be an int"),
        (lambda: _checks.check_positive_int("block_size", 0), ValueError, "block_size must be >= 1, got 0"),
        (lambda: _checks.check_int("k", 9, max_value=8), ValueError, "k must be <= 8, got 9"),
        (lambda: _checks.check_float("alpha", 1.5, max_value=1.0), ValueError, "alpha must be <= 1.0, got 1.5"),
        (lambda: _checks.check_float("cf", 0.0, min_value=0.0, min_inclusive=False), ValueError, "cf must be > 0"),
        (lambda: _checks.check_float("x", float("nan")), ValueError, "x must be finite"),
        (lambda: _checks.check_choice("bits", 3, (2, 4, 8)), ValueError, "bits must be one of 2, 4, 8; got 3"),
        (lambda: _checks.check_tensor("q", [1, 2]), TypeError, "q must be a torch.Tensor, got list"),
        (lambda: _checks.check_tensor("q", torch.zeros(2, 3), ndim=4), ValueError, "q must have 4 dimensions"),
        (lambda: _checks.check_tensor("q", torch.zeros(2), floating=True, ndim=1), None, None),
        (lambda: _checks.check_tensor("i", torch.zeros(2, dtype=torch.long), floating=True), TypeError, "floating"),
    ],
)
def test_checks_name_the_argument_and_the_expectation(call, error, message) -> None:
    if error is None:
        call()
        return
    with pytest.raises(error, match=message):
        call()


def test_check_same_device_names_each_tensor() -> None:
    _checks.check_same_device(q=torch.zeros(1), k=torch.zeros(1))
    meta = torch.zeros(1, device="meta")
    with pytest.raises(ValueError, match="q on cpu, k on meta"):
        _checks.check_same_device(q=torch.zeros(1), k=meta)


def _claim(claim: str = "exact", holds: bool | None = True, why: str = "") -> Claim:
    return Claim(claim, "2.6x", "liu2024kivi", "abstract", "3.1x", holds, why)


def test_claims_table_computes_verdicts_and_renders_every_cell() -> None:
    rows = [_claim("a", True), _claim("b | c", False, "too small"), _claim("d", None, "needs a GPU")]
    table = claims_table(rows)
    assert table.verdicts == {"a": "yes", "b | c": "no", "d": "not testable here"}
    html = table._repr_html_()
    assert html.count("<tr>") == 4 and "needs a GPU" in html and "liu2024kivi" in html
    assert "<b style='color:#D55E00'>no</b>" in html
    md = table._repr_markdown_().splitlines()
    assert len(md) == 5 and md[0].startswith("| the paper claims |") and "b \\| c" in md[3]
    assert "not testable here" in repr(table)


def test_claims_table_accepts_a_numpy_comparison() -> None:
    import numpy as np

    row = _claim("x", np.float64(2.0) > 1.0)
    assert row.holds is True and row.verdict == "yes"


def test_claims_table_escapes_html() -> None:
    html = claims_table([_claim("<script>", True)])._repr_html_()
    assert "<script>" not in html and "&lt;script&gt;" in html


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: _claim("x", False), ValueError, "why must say why"),
        (lambda: _claim("x", None, "  "), ValueError, "why must say why"),
        (lambda: _claim("x", 1), TypeError, "holds must be True, False or None, got 1"),
        (lambda: Claim("x", "", "k", "abstract", "1", True), ValueError, "paper must be a non-empty string"),
        (lambda: claims_table([]), TypeError, "rows must be a non-empty list of Claim"),
        (lambda: claims_table([_claim("x"), _claim("x")]), ValueError, "rows must have distinct claims"),
    ],
)
def test_claims_table_rejects_bad_rows(make, error, message) -> None:
    with pytest.raises(error, match=message):
        make()


def test_references_lists_cited_works_in_order_of_first_citation(tmp_path) -> None:
    import json

    bib = tmp_path / "refs.bib"
    bib.write_text(
        "@article{a2020x, author = {Ann Smith and Bob Jones and Cy Lee}, title = {{Fast} Things},"
        " journal = {J. Fast}, year = {2020}}\n"
        "@misc{b2021y, author = {Dee Brown}, title = {Tool}, howpublished = {\\url{https://x.org}}, year = {2021}}\n"
    )
    cells = [
        {"cell_type": "markdown", "source": ["See {cite:p}`b2021y, a2020x` and {cite:t}`b2021y`.\n"]},
        {"cell_type": "code", "source": ["# {cite}`zzz` in code is not a citation\n"]},
        {"cell_type": "markdown", "source": "Again {cite}`a2020x`."},
    ]
    nb = tmp_path / "chapter.ipynb"
    nb.write_text(json.dumps({"cells": cells}))
    refs = references(nb, bib)
    assert [k for k, _ in refs.entries] == ["b2021y", "a2020x"]
    assert refs.entries[1][1] == "Smith et al. (2020). *Fast Things*. J. Fast."
    assert refs.entries[0][1] == "Brown (2021). *Tool*. https://x.org."
    assert refs._repr_markdown_().startswith("- `b2021y`: Brown (2021)")
    cells[0]["source"] = ["{cite}`missing2000`"]
    nb.write_text(json.dumps({"cells": cells}))
    with pytest.raises(KeyError, match="missing2000"):
        references(nb, bib)
    with pytest.raises(FileNotFoundError, match="bib must be an existing file"):
        references(nb, tmp_path / "none.bib")


def test_every_chapter_cites_only_known_works_and_lists_them_for_jupyterlab() -> None:
    """Each chapter notebook ends with a removed-in-the-book cell that shows its references in JupyterLab."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for nb in sorted((root / "chapters").glob("*.ipynb")):
        refs = references(nb)  # raises on a key missing from references.bib
        last = json.loads(nb.read_text())["cells"][-1]
        src = "".join(last["source"])
        if refs.entries:
            assert src.rstrip().endswith(f'references("{nb.name}")'), f"{nb.name}: the last cell lists the references"
            assert last["metadata"].get("tags") == ["remove-cell"], f"{nb.name}: the book renders its own"
