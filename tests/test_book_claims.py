"""The book's promise about numbers and claims: every number in the prose is computed, and each technique chapter
ends with a computed "the paper claims / measured here / holds here?" table.

`tools/book_policy.py numbers` finds typed numbers; these tests show it catches one and passes a glued one, and
hold every chapter of the table of contents to it (``NUMBERS_CLEAN``), so a new chapter is checked from the
moment it is listed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tools import book_policy
from tools.book_policy import typed_numbers_in

ROOT = Path(__file__).resolve().parent.parent
#: Every chapter in the table of contents: the introduction promises that no number in the prose is typed.
NUMBERS_CLEAN = [str(p.relative_to(ROOT)) for p in book_policy.toc_chapters()]
TECHNIQUE_CHAPTERS = ["roofline", "flash_attention", "memo", "kivi", "scissorhands", "moe"]


def test_a_typed_number_is_caught_and_a_glued_one_passes() -> None:
    typed = "Eviction keeps 819 tokens per sequence."
    glued = "Eviction keeps {glue:text}`keep` tokens per sequence."
    assert typed_numbers_in(typed) == ["'819' in '...Eviction keeps 819 tokens per sequence....'"]
    assert typed_numbers_in(glued) == []


@pytest.mark.parametrize(
    "text",
    [
        "KIVI reports 2.6x less peak memory {cite:p}`liu2024kivi`.",  # a paper's figure, cited in its sentence
        "Run `evaluate(ids, 256)` with $G = 32$ and $$x = 10^9$$.",  # code and maths
        "Llama-2-7B and SmolLM2-135M on an H100 in fp16 with 4-bit weights, as in 2024.",  # names and a year
        "Section 3, Figure 2, Exercise 4 and equation 7 explain it; the sum is 1 and 0 is the floor.",
        "## 12. On the roofline\n\n1. first item\n\n**2.** second step",  # headings and list markers
        "See [the chapter](roofline.ipynb#section-2) and <img width='640'>.",  # link targets, HTML
        "Quantize at {glue:text}`bits` bits. Then {glue:text}`r:.2f`% of {glue:text}`n` tokens.",
    ],
)
def test_what_is_not_a_typed_number(text: str) -> None:
    assert typed_numbers_in(text) == []


@pytest.mark.parametrize(
    ("text", "numbers"),
    [
        ("At batch 64 and context 4096 the cache does not fit.", ["64", "4096"]),
        ("It costs 31% ({glue:text}`x`) more. The paper says so {cite:p}`k`.", ["31%"]),  # cite covers its sentence
        ("a 49,152-token vocabulary, 2.5 times the FLOPs, 2.6x less", ["49,152", "2.5", "2.6x"]),
    ],
)
def test_what_is_a_typed_number(text: str, numbers: list[str]) -> None:
    assert [hit.split("'")[1] for hit in typed_numbers_in(text)] == numbers


def test_exercise_statements_are_exempt(tmp_path: Path) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("### Exercise 1\n\nHow large is the cache at batch 128?"),
        nbformat.v4.new_markdown_cell("The cache holds 300 tokens."),
    ]
    path = tmp_path / "ch.ipynb"
    nbformat.write(nb, path)
    assert book_policy.typed_number_problems(path) == [
        "ch.ipynb: cell 1: typed number '300' in '...The cache holds 300 tokens....'"
    ]


@pytest.mark.parametrize("page", NUMBERS_CLEAN)
def test_clean_chapters_have_no_typed_numbers(page: str) -> None:
    assert book_policy.typed_number_problems(ROOT / page) == []


def test_toc_chapters_lists_the_notebooks_and_the_introduction() -> None:
    assert len(NUMBERS_CLEAN) >= 12  # every chapter is held to the policy, not a chosen few
    names = [p.name for p in book_policy.toc_chapters()]
    assert (
        names[0] == "intro.md"
        and "kivi.ipynb" in names
        and all(p.startswith(("intro", "bib")) or p.endswith(".ipynb") for p in names)
    )


@pytest.mark.parametrize("chapter", TECHNIQUE_CHAPTERS)
def test_each_technique_chapter_ends_with_an_asserted_claims_table(chapter: str) -> None:
    cells = book_policy._cells(ROOT / "chapters" / f"{chapter}.ipynb")
    sources = [book_policy._source(c) for c in cells]
    at = [i for i, s in enumerate(sources) if "claims_table(" in s]
    assert len(at) == 1, f"{chapter}: one cell builds the claims table"
    src = sources[at[0]]
    assert cells[at[0]]["metadata"].get("tags") == ["hide-input"], f"{chapter}: the table shows, its code folds"
    assert "assert claims.verdicts == {" in src and src.rstrip().endswith("claims"), "verdicts asserted, table shown"
    nxt = sources[at[0] + 1] if at[0] + 1 < len(sources) else ""
    assert nxt.startswith(("## Summary", "## Exercises")), f"{chapter}: the claims table closes the chapter's text"
    bib = (ROOT / "references.bib").read_text()
    keys = re.findall(r'Claim\(\s*"[^"]*",\s*"[^"]*",\s*"([^"]+)"', src)
    assert keys and all(f"{{{k}," in bib for k in keys), f"{chapter}: every cited key is in references.bib"
