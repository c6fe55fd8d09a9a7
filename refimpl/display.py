"""Display helpers shared by every chapter: show the package's own source, one figure style.

The book never copies an algorithm into a notebook. A chapter calls :func:`show_source` on the ``refimpl``
object it explains, so the code the reader sees is the code the tests check. :func:`use_book_style` sets one
matplotlib style for every figure in the book.
"""

from __future__ import annotations

import inspect
import textwrap
from typing import Any

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

    def __init__(self, code: str, title: str | None = None) -> None:
        self.code = code
        self.title = title

    def _repr_html_(self) -> str:
        from pygments import highlight
        from pygments.formatters import HtmlFormatter
        from pygments.lexers import PythonLexer

        formatter = HtmlFormatter(noclasses=True, style="default", nowrap=False)
        body = highlight(self.code, PythonLexer(), formatter)
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
