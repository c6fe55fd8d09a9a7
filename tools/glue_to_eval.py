"""Move a chapter's computed numbers from myst-nb's ``glue`` to the MyST ``{eval}`` role.

JupyterLab with jupyterlab-myst renders ``{eval}`` (it evaluates the role's expression in the kernel) but not
``{glue:text}``; myst-nb 1.4.0 renders both, ``{eval}`` only with ``execute_notebooks: inline`` in
``_config.yml`` (and ``nb_eval_name_regex`` widened to accept an expression). Both strip the quotes of a string.
So ``{eval}`f"{glued.key:.1f}"``` shows the same number in JupyterLab and in the book.

    python tools/glue_to_eval.py check [NOTEBOOK ...]    # what converts, and what needs a hand (exit 1 if any)
    python tools/glue_to_eval.py convert [NOTEBOOK ...]  # rewrite each notebook that converts completely

The rewrite:

- code: ``from myst_nb import glue`` becomes ``glued = SimpleNamespace()`` (imported from ``types``), and each
  statement ``glue("key", EXPR, display=False)`` becomes ``glued.key = EXPR``;
- markdown: ``{glue:text}`key:fmt``` becomes ``{eval}`f"{glued.key:fmt}"``` and ``{glue:text}`key``` (or
  ``{glue}`key```) becomes ``{eval}`glued.key```.

- a ``glue`` whose key is computed (``glue(f"x_{k}", v, display=False)``) becomes ``setattr(glued, f"x_{k}", v)``.

``{eval}`` is evaluated where the markdown cell stands, once the cells above it have run (in JupyterLab's "Run All"
and in the book's inline execution alike). Prose that refers to a number a later code cell computes is moved: the
markdown cell is split at the first paragraph (outside fences and display maths) with such a reference, and that
paragraph and the rest of the cell go right after the code cell that computes the last of its numbers, provided
only code cells lie in between (each move is printed). A notebook is left unchanged (and reported) when that does
not hold, when a reference has no ``glue`` at all, when a ``glue`` call also displays its value, or when a code cell
does not parse. Running it again changes nothing. Without notebook arguments the chapters in ``_toc.yml`` are read.
Run ``make format`` after a conversion (import order).
"""

from __future__ import annotations

import ast
import keyword
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

GLUE_REF = re.compile(r"\{glue(?::text)?\}`([^`:]+)(?::([^`]*))?`")
GLUE_IMPORT = "from myst_nb import glue"
NAMESPACE_IMPORT = "from types import SimpleNamespace"
NAMESPACE = "glued = SimpleNamespace()  # the numbers the prose shows with {eval}"


@dataclass
class Plan:
    """What converting one notebook would change, and why it cannot (``problems``)."""

    path: Path
    code_edits: dict[int, str] = field(default_factory=dict)  # cell index -> new source
    markdown_edits: dict[int, str] = field(default_factory=dict)
    references: int = 0
    problems: list[str] = field(default_factory=list)
    # markdown cell index -> (text kept in place, text moved, index of the code cell it goes after)
    moves: dict[int, tuple[str, str, int]] = field(default_factory=dict)


def _is_glue_call(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Call)
        and isinstance(node.value.func, ast.Name)
        and node.value.func.id == "glue"
    )


def _convert_code(
    source: str, index: int, glued_at: dict[str, int], computed_at: list[int], problems: list[str]
) -> str:
    """``source`` with its glue statements turned into ``glued.key = EXPR``; records each key's cell (and the cells
    that glue a computed key)."""
    if "glue" not in source:
        return source
    try:
        tree = ast.parse(source)
    except SyntaxError as err:
        problems.append(f"cell {index}: does not parse ({err.msg}); glue calls in it cannot be converted")
        return source
    lines = source.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    edits: list[tuple[int, int, str]] = []
    for node in ast.walk(tree):
        if not _is_glue_call(node):
            continue
        call = node.value
        display = next((k.value for k in call.keywords if k.arg == "display"), None)
        key = call.args[0] if call.args else None
        label = ast.get_source_segment(source, key) if key else "none"
        if not (isinstance(display, ast.Constant) and display.value is False) or len(call.args) != 2:
            problems.append(f"cell {index}: glue({label}, ...) also displays its value; convert it by hand")
            continue
        value = ast.get_source_segment(source, call.args[1])
        if "\n" in value:  # its later lines keep their indentation: valid inside parentheses only
            value = f"({value})"
        start = offsets[node.lineno - 1] + node.col_offset
        end = offsets[node.end_lineno - 1] + node.end_col_offset
        if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
            edits.append((start, end, f"setattr(glued, {label}, {value})"))
            computed_at.append(index)
            continue
        name = key.value
        if not name.isidentifier() or keyword.iskeyword(name):
            problems.append(f"cell {index}: glue key {name!r} is not a Python name")
            continue
        edits.append((start, end, f"glued.{name} = {value}"))
        glued_at.setdefault(name, index)
    for start, end, text in sorted(edits, reverse=True):
        source = source[:start] + text + source[end:]
    if GLUE_IMPORT in source:
        source = _add_namespace(source.replace(GLUE_IMPORT, NAMESPACE_IMPORT, 1))
    return source


def _add_namespace(source: str) -> str:
    """Define ``glued`` after the last top-level import of the cell that imported ``glue``."""
    imports = [n for n in ast.parse(source).body if isinstance(n, (ast.Import, ast.ImportFrom))]
    lines = source.splitlines()
    at = max(n.end_lineno for n in imports)
    return "\n".join([*lines[:at], "", NAMESPACE, *lines[at:]])


def _eval_role(key: str, spec: str | None) -> str:
    return f'{{eval}}`f"{{glued.{key}:{spec}}}"`' if spec else f"{{eval}}`glued.{key}`"


def _to_eval(markdown: str) -> str:
    return GLUE_REF.sub(lambda m: _eval_role(m.group(1), m.group(2)), markdown)


def _blocks(source: str) -> list[str]:
    """The paragraphs of a markdown cell, split at blank lines outside code fences, directives and display maths."""
    blocks, current, fence, maths = [], [], None, False
    for line in source.split("\n"):
        stripped = line.strip()
        if fence is None and not maths and not stripped and current:
            blocks.append("\n".join(current))
            current = []
            continue
        if fence is None and not maths and not stripped:
            continue
        current.append(line)
        marker = re.match(r"(`{3,}|~{3,}|:{3,})", stripped)
        if marker and not maths:
            if fence is None:
                fence = marker.group(1)
            elif stripped == fence[0] * len(fence) or stripped.startswith(fence) and not stripped[len(fence) :]:
                fence = None
        elif fence is None and stripped.count("$$") % 2:
            maths = not maths
    if current:
        blocks.append("\n".join(current))
    return blocks


def plan(path: Path) -> Plan:
    """Work out the conversion of notebook ``path`` without writing anything."""
    nb = nbformat.read(path, 4)
    result = Plan(path)
    glued_at: dict[str, int] = {}
    computed_at: list[int] = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            new = _convert_code(cell.source, i, glued_at, computed_at, result.problems)
            if new != cell.source:
                result.code_edits[i] = new

    def computed_in(key: str) -> int | None:
        """The cell that computes ``key``: its glue, else the first glue with a computed key, else None."""
        return glued_at.get(key, min(computed_at, default=None))

    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "markdown" or not GLUE_REF.search(cell.source):
            continue
        result.references += len(GLUE_REF.findall(cell.source))
        missing = [m.group(0) for m in GLUE_REF.finditer(cell.source) if computed_in(m.group(1)) is None]
        for ref in missing:
            key = GLUE_REF.match(ref).group(1)
            result.problems.append(f"cell {i}: {ref} has no glue('{key}', ..., display=False)")
        if missing:
            continue
        blocks = _blocks(cell.source)
        late = [max([computed_in(k) for k, _ in GLUE_REF.findall(b)], default=-1) > i for b in blocks]
        if not any(late):
            result.markdown_edits[i] = _to_eval(cell.source)
            continue
        first, at = late.index(True), 0
        for block in blocks[: first + 1]:
            at = cell.source.index(block, at)
        kept, moved = cell.source[:at].rstrip(), cell.source[at:]
        target = max(computed_in(k) for k, _ in GLUE_REF.findall(moved))
        between = [j for j in range(i + 1, target + 1) if nb.cells[j].cell_type != "code"]
        if between:
            ref = next(m.group(0) for m in GLUE_REF.finditer(moved) if computed_in(m.group(1)) > i)
            at_cell = computed_in(GLUE_REF.match(ref).group(1))
            result.problems.append(
                f"cell {i}: {ref} comes before cell {at_cell} computes it, and markdown cell {between[0]} lies between"
            )
            continue
        result.moves[i] = (_to_eval(kept), _to_eval(moved), target)
    return result


def convert(path: Path) -> Plan:
    """Rewrite ``path`` if every glue reference in it converts; return the plan either way."""
    result = plan(path)
    if result.problems or not (result.code_edits or result.markdown_edits or result.moves):
        return result
    nb = nbformat.read(path, 4)
    for i, source in {**result.code_edits, **result.markdown_edits}.items():
        nb.cells[i].source = source
    after: dict[int, list] = {}
    for i, (kept, moved, target) in result.moves.items():
        nb.cells[i].source = kept
        after.setdefault(target, []).append(nbformat.v4.new_markdown_cell(moved))
    cells = []
    for j, cell in enumerate(nb.cells):
        if not (cell.cell_type == "markdown" and j in result.moves and not cell.source):
            cells.append(cell)
        cells.extend(after.get(j, []))
    nb.cells = cells
    path.write_text(nbformat.writes(nb) + "\n")
    return result


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("check", "convert"):
        print(__doc__.split("\n\n")[2], file=sys.stderr)
        return 2
    if argv[1:]:
        paths = [Path(p) for p in argv[1:]]
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from book_policy import toc_notebooks

        paths = toc_notebooks()
    blocked = 0
    for path in paths:
        result = convert(path) if argv[0] == "convert" else plan(path)
        action = "converted" if argv[0] == "convert" and not result.problems else "converts"
        if result.problems:
            blocked += 1
            action = "needs a hand"
        print(f"{path.name}: {result.references} references, {action}")
        for problem in result.problems:
            print(f"  - {problem}")
        if not result.problems:
            for i, (kept, moved, target) in result.moves.items():
                where = "the rest of the cell" if kept else "the whole cell"
                print(
                    f"  - cell {i}: {where} from {moved[:50]!r}... goes after code cell {target} (it uses its numbers)"
                )
    return 1 if blocked else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
