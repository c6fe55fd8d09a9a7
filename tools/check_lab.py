"""Run a chapter in JupyterLab, as a student does with ``make lab``, in headless Chromium, and report what went wrong.

Usage: ``python tools/check_lab.py [chapters/flash_attention.ipynb ...]``

For each notebook, a copy is opened in a JupyterLab started by this tool (on 127.0.0.1, a free port, a random
token, ``--allow-root`` for root, and every Jupyter directory it writes in a temporary folder: the user's own
settings, workspaces and runtime files are not touched; the project's ``tools/jupyterlab/overrides.json`` is the
app settings). Then "Run All Cells", and the notebook fails on:

- an error or stderr output in a cell;
- raw ``{glue``, ``{eval`` or ``{cite`` text in the rendered prose (jupyterlab-myst did not render it);
- an ``{eval}`` expression that did not show a value, or showed an error or a quoted string;
- an interactive widget whose output does not change when its first control is moved.

Exit status 1 lists every problem. ``tests/test_lab_browser.py`` runs it on one chapter and on broken twins.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_browser import CHROMIUM_ARGS, chromium_path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RAW_MARKUP = re.compile(r"\{(glue|eval|cite)[:}]")
EVAL = re.compile(r"\{eval\}`([^`]+)`")
GLUE_ROLE = re.compile(r"\{glue(?::\w+)?\}`[^`]*`")
# Settings only the test needs: every cell in the DOM (no windowing), and nothing saved back to the copy.
TEST_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
}

DISABLED_EXTENSIONS = json.dumps({"disabledExtensions": {"jupyterlab-jupytext": True}})

# Runs in the page: the state of the notebook's cells.
CELL_STATE = """
() => {
  const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(p => p.textContent.trim());
  const errors = [...document.querySelectorAll(
    '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')].map(e => e.innerText.slice(0, 300));
  return {prompts, errors};
}
"""

# Runs in the page once the cells have run: the prose as jupyterlab-myst rendered it (the editors are hidden), and
# the {eval} values it rendered as an error.
PROSE_STATE = """
() => {
  const prose = [...document.querySelectorAll('.jp-MarkdownCell .myst, .jp-MarkdownCell .jp-RenderedMarkdown')];
  const myst = document.querySelectorAll('.jp-MarkdownCell .myst').length;
  const errors = prose.flatMap(p => [...p.querySelectorAll('[data-mime-type*="stderr"], [data-mime-type*="error"]')]);
  return {text: prose.map(p => p.innerText).join('\\n'), errors: errors.map(e => e.innerText.slice(0, 200)), myst};
}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def lab_server(root_dir: Path, scratch: Path, timeout_s: float = 120) -> Iterator[tuple[str, str]]:
    """A JupyterLab serving ``root_dir`` on loopback; yields ``(base_url, token)`` and stops it afterwards."""
    port, token = _free_port(), secrets.token_hex(16)
    dirs = {name: scratch / name for name in ("config", "data", "runtime", "settings", "workspaces", "app", "ipython")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "tools" / "jupyterlab" / "overrides.json", dirs["app"] / "overrides.json")
    # As `make lab` does: jupytext's extension needs JupyterLab 4.6 and fails to load in 4.5.
    (dirs["config"] / "labconfig").mkdir()
    (dirs["config"] / "labconfig" / "page_config.json").write_text(DISABLED_EXTENSIONS)
    for name, values in TEST_SETTINGS.items():
        path = dirs["settings"] / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(dirs["config"]),
        "JUPYTER_DATA_DIR": str(dirs["data"]),
        "JUPYTER_RUNTIME_DIR": str(dirs["runtime"]),
        "JUPYTERLAB_SETTINGS_DIR": str(dirs["settings"]),
        "JUPYTERLAB_WORKSPACES_DIR": str(dirs["workspaces"]),
        "IPYTHONDIR": str(dirs["ipython"]),
    }
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root_dir}",
        f"--LabApp.app_settings_dir={dirs['app']}",
        *(["--allow-root"] if os.geteuid() == 0 else []),
    ]
    log = (scratch / "lab.log").open("w")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root_dir)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"JupyterLab did not start: {(scratch / 'lab.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield base, token
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def _run_all(page, timeout_s: float) -> list[str]:
    """Click Run > Run All Cells and wait until every code cell ran, or the run stopped at an error (Run All queues
    every cell at once, "[*]", and a failing cell sends the rest back to "[ ]"); returns the problems."""
    page.locator('.lm-MenuBar-item:has-text("Run")').first.click()
    page.locator('.lm-Menu-item[data-command="runmenu:run-all"]').click()
    deadline = time.monotonic() + timeout_s
    while True:
        time.sleep(1)
        state = page.evaluate(CELL_STATE)
        ran = [bool(re.fullmatch(r"\[\d+\]:", p)) for p in state["prompts"]]
        running = "[*]:" in state["prompts"]
        if (ran and all(ran)) or (state["errors"] and not running):
            return [f"error/stderr output in a cell: {e}" for e in state["errors"]]
        if time.monotonic() > deadline:
            problems = [f"error/stderr output in a cell: {e}" for e in state["errors"]]
            return [*problems, f"Run All did not finish in {timeout_s:.0f} s ({ran.count(False)} code cells not run)"]


def _check_prose(page, expressions: list[str]) -> list[str]:
    """Raw MyST markup, and {eval} expressions shown as code (not evaluated) or as an error, in the rendered prose.

    jupyterlab-myst shows an expression's source until the kernel has answered, so the check waits for that."""
    deadline = time.monotonic() + 30
    while True:
        prose = page.evaluate(PROSE_STATE)
        pending = [e for e in expressions if e in prose["text"]]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    problems = [f"raw markup in the prose: ...{m.string[max(0, m.start() - 40) : m.end() + 40]!r}..."
                for m in RAW_MARKUP.finditer(prose["text"])]  # fmt: skip
    if not prose["myst"]:
        problems.append("jupyterlab-myst did not render the prose (is it installed and enabled?)")
    problems += [f"an {{eval}} expression shows no value: {e}" for e in pending]
    problems += [f"an {{eval}} expression shows an error: {e}" for e in prose["errors"]]
    return problems


def _check_references(page, notebook: Path) -> list[str]:
    """JupyterLab shows a citation as its bare key: the notebook's last cell must list every cited work."""
    from refimpl.display import references

    keys = [key for key, _ in references(notebook, ROOT / "references.bib").entries]
    outputs = "() => [...document.querySelectorAll('.jp-OutputArea-output')].map(e => e.innerText).join('\\n')"
    shown = page.evaluate(outputs)
    missing = [key for key in keys if f"{key}:" not in shown]
    return [f"the references cell does not list the cited works {missing}"] if missing else []


def _check_widgets(page) -> tuple[list[str], int]:
    """Move the first control of every interactive widget; its output must change."""
    problems = []
    boxes = page.locator(".jp-OutputArea-output .widget-interact")
    for i in range(boxes.count()):
        box = boxes.nth(i)
        box.scroll_into_view_if_needed()
        output = box.locator(".widget-output").first
        before = output.inner_html()
        handle, select = box.locator(".noUi-handle"), box.locator("select")
        if handle.count():
            handle.first.focus()
            page.keyboard.press("End")  # the slider's maximum: a different value than the start, whatever it is
            control = "slider"
        elif select.count():
            options = select.first.locator("option")
            current = select.first.input_value()
            values = [options.nth(j).get_attribute("value") for j in range(options.count())]
            select.first.select_option(next(v for v in values if v != current))
            control = "dropdown"
        else:
            problems.append(f"widget {i}: no slider or dropdown to move")
            continue
        deadline = time.monotonic() + 20
        while output.inner_html() == before and time.monotonic() < deadline:
            time.sleep(0.25)
        if output.inner_html() == before:
            problems.append(f"widget {i}: its output did not change when its {control} was moved")
    return problems, boxes.count()


def _check_page(page, base: str, token: str, notebook: Path, timeout_s: float) -> dict:
    import nbformat

    cells = nbformat.read(notebook, 4).cells
    # jupyterlab-myst renders a role it does not know, such as {glue:text}`key:.1f`, as its bare content ("key:.1f"):
    # the page cannot tell it from prose, so the source is checked.
    glue_roles = [m for c in cells if c.cell_type == "markdown" for m in GLUE_ROLE.findall(c.source)]
    expressions = [e for c in cells if c.cell_type == "markdown" for e in EVAL.findall(c.source)]
    started = time.monotonic()
    js_errors: list[str] = []
    page.on("pageerror", lambda error: js_errors.append(f"JavaScript error: {error}"))
    # ?reset: a fresh workspace, so only this notebook is open.
    page.goto(f"{base}/lab/tree/chapters/{notebook.name}?reset&token={token}", timeout=120_000)
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
    # Run All before the kernel is up makes jupyterlab-myst fail on the first markdown cell ("Session has no
    # kernel"), and the run stops there: wait for the status bar's "| Idle".
    page.wait_for_function("() => document.body.innerText.includes('| Idle')", timeout=120_000)
    problems = _run_all(page, timeout_s)
    problems += [f"raw markup in the prose: {r} (JupyterLab shows the bare key)" for r in glue_roles]
    problems += _check_prose(page, expressions)
    problems += _check_references(page, notebook)
    widget_problems, widgets = _check_widgets(page)
    problems += widget_problems + js_errors
    return {"problems": problems, "evals": len(expressions), "widgets": widgets, "seconds": time.monotonic() - started}


def check_notebooks(notebooks: list[Path], timeout_s: float = 240) -> dict[str, dict]:
    """Open a copy of each notebook (distinct names) in one fresh JupyterLab, run all its cells and check the page;
    returns ``{name: report}`` with the report's ``problems``, ``evals``, ``widgets`` and ``seconds``."""
    from playwright.sync_api import sync_playwright

    reports = {}
    with tempfile.TemporaryDirectory(prefix="check-lab-") as tmp:
        # The copies sit in chapters/ beside the repository's data/, as the chapters do (they read ../data/...).
        work = Path(tmp) / "book"
        (work / "chapters").mkdir(parents=True)
        (work / "data").symlink_to(ROOT / "data")
        (work / "references.bib").symlink_to(ROOT / "references.bib")  # each chapter's last cell lists its citations
        for notebook in notebooks:
            shutil.copy(notebook, work / "chapters" / notebook.name)
        with lab_server(work, Path(tmp) / "jupyter") as (base, token), sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
            for notebook in notebooks:
                context = browser.new_context(viewport={"width": 1400, "height": 1000})
                reports[notebook.name] = _check_page(context.new_page(), base, token, notebook, timeout_s)
                context.close()
            browser.close()
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, default=[ROOT / "chapters" / "flash_attention.ipynb"])
    parser.add_argument("--timeout", type=float, default=240, help="seconds Run All may take")
    args = parser.parse_args(argv)
    failed = 0
    for name, report in check_notebooks(args.notebooks, args.timeout).items():
        failed += bool(report["problems"])
        status = "FAIL" if report["problems"] else "ok  "
        print(f"{status} {name}: {report['evals']} {{eval}} values, {report['widgets']} widgets moved, "
              f"{report['seconds']:.0f} s")  # fmt: skip
        for p in report["problems"]:
            print(f"       - {p}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
