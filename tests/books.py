"""Book builds that several test modules run: ``jupyter-book build`` of a small book, with the Makefile's flags."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

#: The jupyter-book command of this environment (next to the Python running the tests).
JUPYTER_BOOK = (str(Path(sys.executable).parent / "jupyter-book"),)


def build_book(
    book: Path,
    *,
    program: Sequence[str] = JUPYTER_BOOK,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``program build BOOK -W -n --keep-going`` (the Makefile's ``BUILD_FLAGS``: warnings fail the build,
    every cross-reference checked, every page tried) and return the finished process, its output captured as text.

    ``program``: the command that takes jupyter-book's arguments (default :data:`JUPYTER_BOOK`). ``env``:
    variables set on top of this process's environment. Raises ``subprocess.TimeoutExpired`` after 300 s.
    """
    return subprocess.run(
        [*program, "build", str(book), "-W", "-n", "--keep-going"],
        capture_output=True,
        text=True,
        timeout=300,
        env=None if env is None else {**os.environ, **env},
        cwd=cwd,
    )
