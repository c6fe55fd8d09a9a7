"""Book policy checks shared by the Makefile and the tests.

- :func:`toc_notebooks` lists the notebooks in ``_toc.yml`` (what nbval executes);
- :func:`output_problems` finds executed outputs in a notebook (notebooks are committed without outputs);
- :func:`exercise_problems` checks the exercise convention of a chapter notebook: a ``## Exercises`` section,
  each ``### Exercise N`` followed by a code cell tagged ``hide-cell`` whose first line is
  ``# Solution to exercise N`` and which asserts its answer (so a wrong solution fails CI).

``python tools/book_policy.py notebooks`` prints the notebooks in the table of contents, one per line;
``python tools/book_policy.py check`` runs the output and exercise checks over them and exits 1 on a problem.
``python tools/book_policy.py numbers`` lists the typed numbers in the chapters' prose (:func:`typed_numbers_in`)
and exits 1 if there is one.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def toc_files(toc: Path = ROOT / "_toc.yml") -> list[str]:
    """Every ``file:`` entry (and the root) of a Jupyter Book ``_toc.yml``, in order, without suffix."""
    data = yaml.safe_load(toc.read_text())
    files = [data["root"]]

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "file" in node:
                files.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk({k: v for k, v in data.items() if k != "root"})
    return files


def toc_notebooks(root: Path = ROOT) -> list[Path]:
    """The ``.ipynb`` files that ``_toc.yml`` includes."""
    out = []
    for entry in toc_files(root / "_toc.yml"):
        path = root / f"{entry}.ipynb"
        if path.exists():
            out.append(path)
    return out


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def output_problems(path: Path) -> list[str]:
    """Cells of ``path`` that carry outputs or execution counts (must be empty in a committed notebook)."""
    problems = []
    for i, cell in enumerate(_cells(path)):
        if cell.get("cell_type") != "code":
            continue
        if cell.get("outputs"):
            problems.append(f"{path.name}: cell {i} has outputs")
        if cell.get("execution_count") is not None:
            problems.append(f"{path.name}: cell {i} has an execution count")
    return problems


def exercise_problems(path: Path) -> list[str]:
    """Violations of the exercise convention in chapter notebook ``path`` (empty list if it follows it)."""
    cells = _cells(path)
    problems = []
    if not any(c["cell_type"] == "markdown" and re.search(r"^## Exercises", _source(c), re.M) for c in cells):
        problems.append(f"{path.name}: no '## Exercises' section")
    count = 0
    for i, cell in enumerate(cells):
        match = cell["cell_type"] == "markdown" and re.search(r"^### Exercise (\d+)", _source(cell), re.M)
        if not match:
            continue
        count += 1
        n = match.group(1)
        nxt = cells[i + 1] if i + 1 < len(cells) else None
        if nxt is None or nxt["cell_type"] != "code":
            problems.append(f"{path.name}: exercise {n} is not followed by a solution code cell")
            continue
        src = _source(nxt)
        tags = nxt.get("metadata", {}).get("tags", [])
        if "hide-cell" not in tags:
            problems.append(f"{path.name}: solution to exercise {n} is not tagged hide-cell")
        if not src.startswith(f"# Solution to exercise {n}"):
            problems.append(f"{path.name}: solution to exercise {n} must start with '# Solution to exercise {n}'")
        if "assert" not in src:
            problems.append(f"{path.name}: solution to exercise {n} checks nothing (no assert)")
    if count == 0:
        problems.append(f"{path.name}: no exercises ('### Exercise N')")
    return problems


# --- Typed numbers in the prose -------------------------------------------------------------------------------
# The book promises that every number in its prose is computed: an {eval} expression (or {glue:text}), read from
# data, or a paper's figure inside a sentence that cites it. `typed_numbers` finds the digits in a markdown cell
# that are none of these. What it ignores, and why:
_IGNORED = [
    r"```.*?```",  # fenced code
    r"\$\$.*?\$\$",  # display maths: equations are notation, not measurements
    r"(?<!\\)\$[^$\n]+?(?<!\\)\$",  # inline maths ($G = 32$, $10^9$): notation
    r"\{[\w:-]+\}`[^`]*`",  # MyST roles: {eval}`f"{glued.x:.2f}"`, {cite:p}`key`, {eq}`label`, {doc}`x`
    r"`[^`\n]*`",  # code spans: names and values of code
    r"\]\([^)]*\)",  # link targets
    r"<[^>\n]+>",  # HTML tags
    r"^#{1,6} .*$",  # headings: section numbers and "Exercise N"
    r"^\s*(?:\d+\.|[-*])\s",  # list markers "1. "
    r"\*\*\d+\.\*\*",  # bold step markers "**1.**"
]
#: A digit group that stands alone (with an optional "x" or "%"): not part of a name such as H100, SmolLM2-135M,
#: Llama-2-7B, fp16, a 7B model or a data type such as 4-bit. "2.6x", "31%" and "576-wide" are numbers.
_NUMBER = re.compile(r"(?<![\w.\-/])\d+(?:[.,]\d+)*(?:x|%)?(?![\w/]|-bit\b|\.\d)")
#: Words after which a number is a reference, not a measurement.
_REFERENCE_WORDS = re.compile(
    r"(?:equation|eq\.|section|chapter|figure|fig\.|table|algorithm|alg\.|theorem|lemma|exercise|step|part|"
    r"appendix|line|version|v)\s*$",
    re.I,
)
_YEAR = re.compile(r"(?:19|20)\d\d")
#: A sentence ends at ". ", "? ", "! " or a blank line; one that cites a paper ({cite...}) states its figures.
_SENTENCE = re.compile(r"(?<=[.?!])\s+(?=[A-Z(*\[{$`])|\n\s*\n")


#: An exercise states its problem's inputs; its solution cell computes and asserts the answer.
_EXERCISE = re.compile(r"\s*### Exercise \d+")


def _prose(text: str) -> str:
    """``text`` with the regions that `typed_numbers` ignores blanked out (same length, so offsets hold)."""
    for pattern in _IGNORED:
        text = re.sub(pattern, lambda m: re.sub(r"[^\n]", " ", m.group(0)), text, flags=re.S | re.M)
    return text


def typed_numbers_in(text: str) -> list[str]:
    """The typed numbers in the markdown ``text``, each with a few words of context.

    A number is allowed when it is glued, inside code, maths, a heading, a link target or an HTML tag; part of
    a name (H100, SmolLM2-135M, fp16, 4-bit); a year; a reference (Section 3, Exercise 2); 0 or 1; or in a
    sentence that cites a paper with a ``{cite...}`` role (the paper's figure).
    """
    found = []
    start = 0
    for match in list(_SENTENCE.finditer(text)) + [None]:
        end = match.start() if match else len(text)
        sentence = text[start:end]
        start = match.end() if match else len(text)
        if "{cite" in sentence:
            continue
        prose = _prose(sentence)
        for number in _NUMBER.finditer(prose):
            value = number.group(0)
            before = prose[: number.start()]
            if value in ("0", "1") or _YEAR.fullmatch(value) or _REFERENCE_WORDS.search(before):
                continue
            context = " ".join(sentence[max(0, number.start() - 30) : number.end() + 30].split())
            found.append(f"{value!r} in '...{context}...'")
    return found


def _markdown_of(path: Path) -> list[tuple[str, str]]:
    """(where, text) for each markdown cell of a notebook, or the whole of a markdown page."""
    if path.suffix == ".md":
        return [(path.name, path.read_text())]
    return [
        (f"{path.name}: cell {i}", _source(c))
        for i, c in enumerate(_cells(path))
        if c["cell_type"] == "markdown" and not _EXERCISE.match(_source(c))
    ]


def typed_number_problems(path: Path) -> list[str]:
    """Typed numbers in the prose of a chapter (a notebook's markdown cells, except exercise statements, or a
    markdown page)."""
    return [f"{where}: typed number {hit}" for where, text in _markdown_of(path) for hit in typed_numbers_in(text)]


def toc_chapters(root: Path = ROOT) -> list[Path]:
    """The notebooks and markdown pages under ``chapters/`` that ``_toc.yml`` includes."""
    out = []
    for entry in toc_files(root / "_toc.yml"):
        for suffix in (".ipynb", ".md"):
            path = root / f"{entry}{suffix}"
            if path.exists() and path.parent.name == "chapters":
                out.append(path)
    return out


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "notebooks"
    if command == "notebooks":
        print("\n".join(str(p.relative_to(ROOT)) for p in toc_notebooks()))
        return 0
    if command == "check":
        problems = [p for nb in toc_notebooks() for p in output_problems(nb) + exercise_problems(nb)]
        print("\n".join(problems) or "book policy: ok")
        return 1 if problems else 0
    if command == "numbers":
        problems = [p for page in toc_chapters() for p in typed_number_problems(page)]
        print("\n".join(problems) or "typed numbers: none")
        return 1 if problems else 0
    print(f"unknown command {command!r}; expected 'notebooks', 'check' or 'numbers'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
