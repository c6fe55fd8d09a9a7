"""Book policy checks shared by the Makefile and the tests.

- :func:`toc_notebooks` lists the notebooks in ``_toc.yml`` (what nbval executes);
- :func:`output_problems` finds executed outputs in a notebook (notebooks are committed without outputs);
- :func:`exercise_problems` checks the exercise convention of a chapter notebook: a ``## Exercises`` section,
  each ``### Exercise N`` followed by a code cell tagged ``hide-cell`` whose first line is
  ``# Solution to exercise N`` and which asserts its answer (so a wrong solution fails CI).

``python tools/book_policy.py notebooks`` prints the notebooks in the table of contents, one per line;
``python tools/book_policy.py check`` runs the output and exercise checks over them and exits 1 on a problem.
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


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "notebooks"
    if command == "notebooks":
        print("\n".join(str(p.relative_to(ROOT)) for p in toc_notebooks()))
        return 0
    if command == "check":
        problems = [p for nb in toc_notebooks() for p in output_problems(nb) + exercise_problems(nb)]
        print("\n".join(problems) or "book policy: ok")
        return 1 if problems else 0
    print(f"unknown command {command!r}; expected 'notebooks' or 'check'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
