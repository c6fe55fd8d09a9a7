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
# Settings only the test needs: every cell in the DOM (no windowing), and nothing saved back to the copy.
TEST_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
}

# Runs in the page: the state of the notebook's cells.
CELL_STATE = """
() => {
  const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(p => p.textContent.trim());
  const errors = [...document.querySelectorAll(
    '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')].map(e => e.innerText.slice(0, 300));
  return {prompts, errors};
}
"""

# Runs in the page once the cells have run: the rendered prose and its {eval} expressions.
PROSE_STATE = """
() => {
  const cells = [...document.querySelectorAll('.jp-MarkdownCell')];
  const text = cells.map(c => c.innerText).join('\\n');
  const exprs = [...document.querySelectorAll('.jp-MarkdownCell .myst-RenderedExpression')].map(e => ({
    text: e.innerText.trim(),
    error: !!e.querySelector('[data-mime-type="application/vnd.jupyter.stderr"], .myst-RenderedExpressionError'),
  }));
  return {text, exprs};
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
    """Click Run > Run All Cells and wait until every code cell ran or one failed; returns the problems."""
    page.locator('.lm-MenuBar-item:has-text("Run")').first.click()
    page.locator('.lm-Menu-item[data-command="runmenu:run-all"]').click()
    deadline = time.monotonic() + timeout_s
    while True:
        state = page.evaluate(CELL_STATE)
        if state["errors"]:
            return [f"error/stderr output in a cell: {e}" for e in state["errors"]]
        if state["prompts"] and all(re.fullmatch(r"\[\d+\]:", p) for p in state["prompts"]):
            return []
        if time.monotonic() > deadline:
            waiting = sum(not re.fullmatch(r"\[\d+\]:", p) for p in state["prompts"])
            return [f"Run All did not finish in {timeout_s:.0f} s ({waiting} code cells not run)"]
        time.sleep(1)


def _check_prose(page, expected: int) -> list[str]:
    """Raw MyST markup and {eval} expressions that did not render (waits for the kernel's answers)."""
    deadline = time.monotonic() + 30
    while True:
        prose = page.evaluate(PROSE_STATE)
        shown = [e for e in prose["exprs"] if e["text"]]
        if len(shown) >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    problems = [f"raw markup in the prose: ...{m.string[max(0, m.start() - 40) : m.end() + 40]!r}..."
                for m in RAW_MARKUP.finditer(prose["text"])]  # fmt: skip
    if len(shown) < expected:
        problems.append(f"{expected - len(shown)} of {expected} {{eval}} expressions show no value")
    for e in prose["exprs"]:
        if e["error"]:
            problems.append(f"an {{eval}} expression shows an error: {e['text'][:200]}")
        elif e["text"][:1] in "'\"":
            problems.append(f"an {{eval}} expression shows a quoted string: {e['text'][:80]}")
    return problems


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


def check_notebook(notebook: Path, timeout_s: float = 240) -> dict:
    """Open a copy of ``notebook`` in a fresh JupyterLab, run all cells, and check the page; returns a report."""
    import nbformat
    from playwright.sync_api import sync_playwright

    expected = sum(
        len(re.findall(r"\{eval\}`", c.source)) for c in nbformat.read(notebook, 4).cells if c.cell_type == "markdown"
    )
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="check-lab-") as tmp:
        work = Path(tmp) / "notebooks"
        work.mkdir()
        shutil.copy(notebook, work / notebook.name)
        with lab_server(work, Path(tmp) / "jupyter") as (base, token), sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            js_errors: list[str] = []
            page.on("pageerror", lambda error: js_errors.append(f"JavaScript error: {error}"))
            page.goto(f"{base}/lab/tree/{notebook.name}?token={token}", timeout=120_000)
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
            # Run All before the kernel is up makes jupyterlab-myst fail on the first markdown cell ("Session has
            # no kernel"), and the run stops there: wait for the status bar's "| Idle".
            page.wait_for_function("() => document.body.innerText.includes('| Idle')", timeout=120_000)
            problems = _run_all(page, timeout_s)
            if not problems:
                problems += _check_prose(page, expected)
                widget_problems, widgets = _check_widgets(page)
                problems += widget_problems
            else:
                widgets = 0
            problems += js_errors
            browser.close()
    return {"problems": problems, "evals": expected, "widgets": widgets, "seconds": time.monotonic() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, default=[ROOT / "chapters" / "flash_attention.ipynb"])
    parser.add_argument("--timeout", type=float, default=240, help="seconds Run All may take")
    args = parser.parse_args(argv)
    failed = 0
    for nb in args.notebooks:
        report = check_notebook(nb, args.timeout)
        failed += bool(report["problems"])
        status = "FAIL" if report["problems"] else "ok  "
        print(f"{status} {nb.name}: {report['evals']} {{eval}} values, {report['widgets']} widgets moved, "
              f"{report['seconds']:.0f} s")  # fmt: skip
        for p in report["problems"]:
            print(f"       - {p}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
