"""The API reference (``api/*.rst``, built by ``_ext/api_reference.py``): it covers every public module, every
page is in the table of contents, and a build with ``-W -n`` fails on a broken reference in a docstring."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.books import build_book
from tools import book_policy

ROOT = Path(__file__).resolve().parent.parent


def _extension():
    spec = importlib.util.spec_from_file_location("api_reference", ROOT / "_ext" / "api_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


api_reference = _extension()
DIRECTIVE = re.compile(r"^\.\. refimpl-api::[ \t]*(\S*)\n(?:[ \t]+:modules:[ \t]*(.*)\n)?", re.MULTILINE)


def _documented_modules(page: Path) -> list[str]:
    out = []
    for package, modules in DIRECTIVE.findall(page.read_text()):
        out += modules.split() if modules else api_reference.public_submodules(package)
        out += [package] if package else []
    return out


def test_every_public_module_has_a_page() -> None:
    documented = [m for page in sorted((ROOT / "api").glob("*.rst")) for m in _documented_modules(page)]
    public = ["refimpl", *api_reference.public_submodules("refimpl")]
    assert len(documented) == len(set(documented)), "a module is documented on two pages"
    # The top-level package is the part's index page (api/index.md), not an autodoc page.
    assert set(public) - set(documented) == {"refimpl"}, f"no API page: {sorted(set(public) - set(documented))}"
    assert set(documented) <= set(public), f"not a public module: {sorted(set(documented) - set(public))}"


def test_every_api_page_is_in_the_toc() -> None:
    pages = {f"api/{p.stem}" for p in (ROOT / "api").glob("*.[mr]s*")}
    assert pages <= set(book_policy.toc_files()), f"not in _toc.yml: {sorted(pages - set(book_policy.toc_files()))}"


def test_private_and_main_modules_are_left_out() -> None:
    modules = api_reference.public_submodules("refimpl")
    assert "refimpl.roofline.hardware" in modules and "refimpl.attention.triton_kernels" in modules
    assert not [m for m in modules if "._" in m], modules


def _api_book(tmp_path: Path, docstring: str) -> Path:
    """This book's configuration around one API page documenting a module ``apidemo`` with ``docstring``."""
    book = tmp_path / "book"
    (book / "api").mkdir(parents=True)
    shutil.copy(ROOT / "_config.yml", book / "_config.yml")
    shutil.copytree(ROOT / "_ext", book / "_ext")
    (book / "_vendor" / "static").mkdir(parents=True)
    shutil.copy(ROOT / "references.bib", book / "references.bib")
    (book / "_toc.yml").write_text("format: jb-book\nroot: api/index\nchapters:\n  - file: api/demo\n")
    (book / "api" / "index.md").write_text("# API\n\nThe reference.\n")
    (book / "api" / "demo.rst").write_text("Demo\n====\n\n.. refimpl-api::\n   :modules: apidemo\n")
    source = (
        f'"""A demo module."""\n\n__all__ = ["f"]\n\n\ndef f(n: int) -> int:\n    """{docstring}"""\n    return n\n'
    )
    (tmp_path / "apidemo.py").write_text(source)
    return book


def _build(book: Path) -> subprocess.CompletedProcess:
    return build_book(book, env={"PYTHONPATH": f"{book.parent}{os.pathsep}{ROOT}"})


@pytest.mark.slow
def test_api_build_passes_on_good_references_and_fails_on_a_broken_one(tmp_path: Path) -> None:
    good = textwrap.dedent(
        """Twice :func:`refimpl.roofline.load_hardware` of :class:`refimpl.roofline.Hardware`.

        Args:
            n: a count.
        """
    )
    result = _build(_api_book(tmp_path / "good", good))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    html = (tmp_path / "good" / "book" / "_build" / "html" / "api" / "demo.html").read_text()
    assert 'id="apidemo.f"' in html, "the function was not documented"
    broken = _build(_api_book(tmp_path / "broken", "Calls :func:`refimpl.roofline.no_such_function`."))
    assert broken.returncode != 0
    assert "no_such_function" in broken.stdout + broken.stderr


def test_browser_check_visits_every_page_of_a_folder(tmp_path: Path) -> None:
    from tools.check_browser import pages_of

    for rel in ("index.html", "genindex.html", "search.html", "_static/x.html", "api/index.html", "api/kivi.html"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("<html></html>")
    assert [p.relative_to(tmp_path).as_posix() for p in pages_of(tmp_path)] == ["api/index.html", "api/kivi.html"]
