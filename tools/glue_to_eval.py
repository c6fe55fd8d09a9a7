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

``{eval}`` is evaluated where the markdown cell stands, once the cells above it have run, so a notebook is left
unchanged (and reported) when a reference comes before the cell that computes it, when a key is computed (an
f-string), when a ``glue`` call also displays its value, or when a code cell does not parse. Without notebook
arguments the chapters in ``_toc.yml`` are read. Run ``make format`` after a conversion (import order).
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


def _is_glue_call(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Call)
        and isinstance(node.value.func, ast.Name)
        and node.value.func.id == "glue"
    )


def _convert_code(source: str, index: int, glued_at: dict[str, int], problems: list[str]) -> str:
    """``source`` with its glue statements turned into ``glued.key = EXPR``; records each key's cell."""
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
        if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
            problems.append(f"cell {index}: glue with a computed key ({ast.unparse(key) if key else 'none'})")
            continue
        name = key.value
        if not name.isidentifier() or keyword.iskeyword(name):
            problems.append(f"cell {index}: glue key {name!r} is not a Python name")
            continue
        if not (isinstance(display, ast.Constant) and display.value is False) or len(call.args) != 2:
            problems.append(f"cell {index}: glue({name!r}, ...) also displays its value; convert it by hand")
            continue
        value = ast.get_source_segment(source, call.args[1])
        start = offsets[node.lineno - 1] + node.col_offset
        end = offsets[node.end_lineno - 1] + node.end_col_offset
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


def plan(path: Path) -> Plan:
    """Work out the conversion of notebook ``path`` without writing anything."""
    nb = nbformat.read(path, 4)
    result = Plan(path)
    glued_at: dict[str, int] = {}
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            new = _convert_code(cell.source, i, glued_at, result.problems)
            if new != cell.source:
                result.code_edits[i] = new
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "markdown":
            continue

        def replace(match: re.Match, i: int = i) -> str:
            key, spec = match.group(1), match.group(2)
            result.references += 1
            if key not in glued_at:
                result.problems.append(f"cell {i}: {match.group(0)} has no glue('{key}', ..., display=False) above")
            elif glued_at[key] > i:
                result.problems.append(f"cell {i}: {match.group(0)} comes before cell {glued_at[key]} computes it")
            return _eval_role(key, spec)

        new = GLUE_REF.sub(replace, cell.source)
        if new != cell.source:
            result.markdown_edits[i] = new
    return result


def convert(path: Path) -> Plan:
    """Rewrite ``path`` if every glue reference in it converts; return the plan either way."""
    result = plan(path)
    if result.problems or not (result.code_edits or result.markdown_edits):
        return result
    nb = nbformat.read(path, 4)
    for i, source in {**result.code_edits, **result.markdown_edits}.items():
        nb.cells[i].source = source
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
    return 1 if blocked else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
