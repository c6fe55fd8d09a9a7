"""Sphinx extension: keep the rendered book self-contained (no script that fetches code from a CDN).

Jupyter Book 1.x always loads sphinx-thebe, which declares its CDN URL in an inline script (twice, on this
Sphinx version: a JavaScript error on every page) and would fetch thebe from unpkg.com on demand. The book does
not offer live kernels in the page (readers run the notebooks in Jupyter), so thebe's scripts and style are
dropped from every page.
"""

from __future__ import annotations

from typing import Any


def _is_thebe(asset: Any) -> bool:
    name = str(getattr(asset, "filename", asset) or "")
    body = str(getattr(asset, "attributes", {}).get("body", ""))
    return "thebe" in name or "THEBE_JS_URL" in body


def _drop_thebe(app: Any, pagename: str, templatename: str, context: dict, doctree: Any) -> None:
    for key in ("script_files", "css_files"):
        if key in context:
            context[key] = [a for a in context[key] if not _is_thebe(a)]


def setup(app: Any) -> dict[str, Any]:
    app.connect("html-page-context", _drop_thebe, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
