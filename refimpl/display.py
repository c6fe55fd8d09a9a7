"""Display helpers shared by every chapter: show the package's own source, one figure style.

The book never copies an algorithm into a notebook. A chapter calls :func:`show_source` on the ``refimpl``
object it explains, so the code the reader sees is the code the tests check. :func:`use_book_style` sets one
matplotlib style for every figure in the book. :func:`claims_table` renders the table of a paper's claims, each
with what this book measured and a computed verdict, that closes each technique chapter. :func:`progress` shows
how far a long loop of a cell has got while it runs in JupyterLab, and nothing in the built book.
:func:`references` lists the works a chapter cites, for JupyterLab, which shows a ``{cite}`` role as its bare key
(jupyterlab-myst has no bibliography support); the built book renders citations itself.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import textwrap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

#: Set to "0" to turn :func:`progress` off; the book build sets it for the kernels it starts (_ext/book_budget.py),
#: so no progress bar ends up in a built page.
PROGRESS_ENV = "REFIMPL_PROGRESS"

#: Figures are rendered at the book's content width (about 7 inches at 100 dpi) and must stay readable there.
BOOK_STYLE: dict[str, Any] = {
    "figure.figsize": (7.0, 4.0),
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "savefig.bbox": "tight",
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "legend.fontsize": 10,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 2.0,
    "lines.markersize": 6,
    "image.cmap": "viridis",
    "axes.prop_cycle": __import__("cycler").cycler(
        color=["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]
    ),  # Okabe-Ito: distinguishable with colour-vision deficiency
}


def use_book_style() -> None:
    """Apply the book's matplotlib style (:data:`BOOK_STYLE`) globally; call once at the top of a chapter."""
    import matplotlib as mpl

    mpl.rcParams.update(BOOK_STYLE)


def source_of(obj: Any) -> str:
    """Return the dedented source code of a function, class, method or module ``obj``.

    Raises ``TypeError`` naming ``obj`` when its source is not available (a builtin, a C extension).
    """
    try:
        return textwrap.dedent(inspect.getsource(obj))
    except (TypeError, OSError) as err:
        raise TypeError(f"obj must be a Python function, class or module with source, got {obj!r}") from err


class SourceCode:
    """Syntax-highlighted source that renders in Jupyter (HTML) and in the HTML book.

    In the book the notebook output is stored as ``text/html`` (highlighted by Pygments with inline styles, so
    it needs no extra CSS) with a ``text/plain`` fallback.
    """

    def __init__(self, code: str, title: str | None = None, language: str = "python") -> None:
        self.code = code
        self.title = title
        self.language = language  # a Pygments lexer name: "python", "c", ...

    def _repr_html_(self) -> str:
        from pygments import highlight
        from pygments.formatters import HtmlFormatter
        from pygments.lexers import get_lexer_by_name

        formatter = HtmlFormatter(noclasses=True, style="default", nowrap=False)
        body = highlight(self.code, get_lexer_by_name(self.language), formatter)
        head = f"<div style='font-size:0.85em;color:#555'><code>{self.title}</code></div>" if self.title else ""
        return f"<div class='refimpl-source'>{head}{body}</div>"

    def __repr__(self) -> str:
        return self.code


def show_source(obj: Any) -> SourceCode:
    """Return a displayable, highlighted view of ``obj``'s source, titled with its qualified name.

    Use it as the last expression of a notebook cell: ``show_source(refimpl.kivi.quantize)``.
    """
    code = source_of(obj)
    module = getattr(obj, "__module__", None) or getattr(obj, "__name__", "")
    name = getattr(obj, "__qualname__", None)
    title = f"{module}.{name}" if name and module != name else str(module)
    return SourceCode(code, title=title)


#: The three verdicts of a claims table, by what :func:`verdict` is given.
VERDICTS = {True: "yes", False: "no", None: "not testable here"}


@dataclass(frozen=True)
class Claim:
    """One row of a chapter's closing table: a paper's claim, its figure, what this book measured, the verdict.

    ``holds`` is computed in the notebook: ``True`` or ``False`` when the claim can be tested here, ``None``
    when it cannot (then ``why`` must say why). ``cite`` is the ``references.bib`` key of the paper and
    ``where`` the place in it (a table, a figure, the abstract) that states ``paper``.
    """

    claim: str
    paper: str
    cite: str
    where: str
    measured: str
    holds: bool | None
    why: str = ""

    def __post_init__(self) -> None:
        for name in ("claim", "paper", "cite", "where", "measured"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        if self.holds is not None and not isinstance(self.holds, bool):
            import numpy as np

            if not isinstance(self.holds, np.bool_):  # a comparison of numpy scalars gives np.bool_
                raise TypeError(f"holds must be True, False or None, got {self.holds!r}")
            object.__setattr__(self, "holds", bool(self.holds))
        if self.holds is not True and not self.why.strip():
            raise ValueError(f"why must say why the claim {self.claim!r} does not hold or cannot be tested here")

    @property
    def verdict(self) -> str:
        """``"yes"``, ``"no"`` or ``"not testable here"``."""
        return VERDICTS[self.holds]


class ClaimsTable:
    """The "paper claims | measured here | holds here?" table that closes each technique chapter.

    Renders as HTML in Jupyter and in the book (``_repr_html_``), as markdown (``_repr_markdown_``) and as
    plain text. :attr:`verdicts` maps each claim to its verdict, so a notebook asserts them all at once and a
    change that flips a verdict fails the cell.
    """

    COLUMNS = ("the paper claims", "paper's figure", "measured here", "holds here?", "why")

    def __init__(self, rows: list[Claim]) -> None:
        if not isinstance(rows, list) or not rows or not all(isinstance(r, Claim) for r in rows):
            raise TypeError(f"rows must be a non-empty list of Claim, got {rows!r}")
        claims = [r.claim for r in rows]
        if len(set(claims)) != len(claims):
            raise ValueError(f"rows must have distinct claims, got {claims}")
        self.rows = rows

    @property
    def verdicts(self) -> dict[str, str]:
        """``{claim: verdict}`` in row order."""
        return {r.claim: r.verdict for r in self.rows}

    def _cells(self, row: Claim) -> tuple[str, ...]:
        return (row.claim, f"{row.paper} ({row.cite}, {row.where})", row.measured, row.verdict, row.why)

    def _repr_markdown_(self) -> str:
        def esc(text: str) -> str:
            return text.replace("|", "\\|").replace("\n", " ")

        lines = ["| " + " | ".join(self.COLUMNS) + " |", "|" + "---|" * len(self.COLUMNS)]
        lines += ["| " + " | ".join(esc(c) for c in self._cells(r)) + " |" for r in self.rows]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from html import escape

        colour = {"yes": "#009E73", "no": "#D55E00", "not testable here": "#666666"}
        cell = "text-align:left;vertical-align:top;padding:0.2em 0.5em"
        head = "".join(f"<th style='{cell}'>{escape(c)}</th>" for c in self.COLUMNS)
        body = []
        for row in self.rows:
            cells = [escape(c) for c in self._cells(row)]
            cells[3] = f"<b style='color:{colour[row.verdict]}'>{cells[3]}</b>"
            body.append("<tr>" + "".join(f"<td style='{cell}'>{c}</td>" for c in cells) + "</tr>")
        table = "class='refimpl-claims' style='font-size:0.85em;border-collapse:collapse'"
        return f"<table {table}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"

    def __repr__(self) -> str:
        return "\n".join(" | ".join(self._cells(r)) for r in self.rows)


def claims_table(rows: list[Claim]) -> ClaimsTable:
    """Return the displayable closing table of a chapter; use it as a cell's last expression after asserting
    ``table.verdicts``."""
    return ClaimsTable(rows)


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """``iterable``, with a progress bar while it is consumed: a tqdm widget in JupyterLab (removed when the loop
    ends), a bar on stderr in a terminal, nothing when stderr is not a terminal outside a notebook (a pipe, a test)
    or when ``REFIMPL_PROGRESS=0`` (the book build). For loops of a few seconds or more per step: a chapter's
    timing rounds, one model evaluation per configuration.

    Args:
        iterable: what the loop runs over.
        desc: the bar's label, e.g. ``"decode timing rounds"``.
        total: the number of steps, when ``len(iterable)`` does not give it.
    """
    if os.environ.get(PROGRESS_ENV, "1") == "0":
        return iter(iterable)
    from tqdm.auto import tqdm

    # tqdm.auto is the widget bar inside a Jupyter kernel; disable=None turns a terminal bar off without a terminal.
    in_notebook = tqdm.__module__ == "tqdm.notebook"
    return iter(tqdm(iterable, desc=desc, total=total, leave=False, disable=False if in_notebook else None))


#: A MyST citation role and its comma-separated keys: {cite}`a`, {cite:p}`a,b`, {cite:t}`a`.
_CITE = re.compile(r"\{cite(?::\w+)?\}`([^`]+)`")


class References:
    """A chapter's reference list: ``(key, formatted entry)`` pairs, rendered as a markdown list."""

    def __init__(self, entries: list[tuple[str, str]]) -> None:
        self.entries = entries

    def _repr_markdown_(self) -> str:
        return "\n".join(f"- `{key}`: {text}" for key, text in self.entries)

    def __repr__(self) -> str:
        return "\n".join(f"{key}: {text}" for key, text in self.entries)


def _format_entry(entry: Any) -> str:
    """``Authors (year). Title. Venue.`` of a pybtex entry; more than two authors become "First et al."."""

    def plain(text: str) -> str:
        return re.sub(r"[{}]", "", text).replace("\\", "").strip()

    names = [plain(" ".join(p.last_names)) for p in entry.persons.get("author", [])]
    authors = names[0] + " et al." if len(names) > 2 else " and ".join(names)
    fields = entry.fields
    venue = next((fields[k] for k in ("journal", "booktitle", "publisher", "howpublished") if k in fields), "")
    venue = re.sub(r"\\url\{([^}]*)\}", r"\1", venue)
    parts = [f"{authors} ({fields.get('year', 'n.d.')})", f"*{plain(fields.get('title', ''))}*", plain(venue)]
    return ". ".join(p for p in parts if p) + "."


def references(notebook: str | os.PathLike[str], bib: str | os.PathLike[str] | None = None) -> References:
    """The works cited by the ``{cite}`` roles in the markdown cells of ``notebook`` (a path to an ``.ipynb``), in
    order of first citation, each formatted from the BibTeX file ``bib`` (default: ``references.bib`` in the
    notebook's parent folder, the book's root). A chapter's last cell shows it in JupyterLab; the book build
    removes that cell (tag ``remove-cell``) because the book renders its citations and bibliography itself.

    Raises ``FileNotFoundError`` naming a missing file, ``KeyError`` naming a cited key that ``bib`` lacks, and
    ``ImportError`` if ``pybtex`` (installed with the book's requirements) is missing.
    """
    path = Path(notebook)
    bib_path = Path(bib) if bib is not None else path.resolve().parent.parent / "references.bib"
    for name, file in (("notebook", path), ("bib", bib_path)):
        if not file.is_file():
            raise FileNotFoundError(f"{name} must be an existing file, got {str(file)!r}")
    from pybtex.database import parse_file

    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    keys: list[str] = []
    for cell in cells:
        if cell.get("cell_type") == "markdown":
            text = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            for group in _CITE.findall(text):
                for key in (k.strip() for k in group.split(",")):
                    if key and key not in keys:
                        keys.append(key)
    entries = parse_file(str(bib_path)).entries
    missing = [k for k in keys if k not in entries]
    if missing:
        raise KeyError(f"{bib_path.name} has no entry for the cited key(s) {missing}")
    return References([(k, _format_entry(entries[k])) for k in keys])
