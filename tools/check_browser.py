"""Open every page of the built book in headless Chromium and fail on a page that did not render.

Usage: ``python tools/check_browser.py [_build/html] [--screenshots DIR]``

The pages are served from 127.0.0.1 by a throwaway HTTP server; every request to any other host is blocked and
reported (the book must render offline). A page fails if it has: a failed request or HTTP error, an image that did
not load, mathematics that MathJax did not typeset (or typeset with an error), a saved widget that the widget
manager did not render, an error or stderr output in a notebook cell, a JavaScript error, or no article text.
Exit status 1 lists every problem.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
]

# Runs in the page once it has loaded; returns a list of problems found in the DOM.
PAGE_PROBE = """
async () => {
  const problems = [];
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    await MathJax.startup.promise;
    if (MathJax.typesetPromise) { await MathJax.typesetPromise(); }
  }
  // Saved widget views: the widget manager inserts each view's rendering just before its script tag.
  const views = [...document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]')];
  const shown = v => {
    const area = v.previousElementSibling;
    return !!area && area.classList.contains('widget-subarea') && area.childElementCount > 0;
  };
  for (let waited = 0; waited < 15000 && !views.every(shown); waited += 250) {
    await new Promise(resolve => setTimeout(resolve, 250));
  }
  for (const v of views) {
    if (!shown(v)) problems.push(`widget did not render: ${v.textContent.trim().slice(0, 100)}`);
  }
  for (const img of document.images) {
    if (!img.complete || img.naturalWidth === 0) problems.push(`image did not load: ${img.getAttribute('src')}`);
  }
  const maths = document.querySelectorAll('div.math, span.math');
  const typeset = document.querySelectorAll('mjx-container').length;
  if (maths.length > 0 && !window.MathJax) problems.push('page has mathematics but MathJax did not load');
  for (const m of maths) {
    if (!m.querySelector('mjx-container')) problems.push(`mathematics not typeset: ${m.textContent.slice(0, 60)}`);
  }
  for (const e of document.querySelectorAll('mjx-merror')) {
    problems.push(`MathJax error: ${e.textContent.slice(0, 80)}`);
  }
  const bad = ['traceback', 'error', 'stderr'].map(c => `.cell_output .output.${c}`).join(', ');
  const errs = document.querySelectorAll(bad);
  for (const e of errs) problems.push(`error/stderr output in a cell: ${e.textContent.trim().slice(0, 120)}`);
  const article = document.querySelector('article') || document.querySelector('main');
  if (!article || article.innerText.trim().length < 20) problems.push('page has no article text');
  return {problems, maths: maths.length, typeset, images: document.images.length, widgets: views.length};
}
"""


def pages_of(html_dir: Path) -> list[Path]:
    """The content pages of a Sphinx build: every .html outside _static/_sources, minus the generated ones at the
    top (the index, the search page, the redirect ``index.html``); ``api/index.html`` is a content page."""
    skip = {"genindex.html", "search.html", "index.html"}
    pages = []
    for p in sorted(html_dir.rglob("*.html")):
        rel = p.relative_to(html_dir)
        if rel.parts[0].startswith("_") or rel.as_posix() in skip:
            continue
        pages.append(p)
    return pages


def _serve(html_dir: Path) -> tuple[http.server.ThreadingHTTPServer, int]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(html_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def chromium_path() -> str:
    """Path of the Chromium executable: $CHROMIUM, else Debian's /usr/bin/chromium."""
    path = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    if not Path(path).exists():
        raise FileNotFoundError(
            f"Chromium not found at {path}: install Debian's package (apt-get install chromium) or set $CHROMIUM"
        )
    return path


def _watch(page, origin: str) -> list[str]:
    """Block requests that leave ``origin`` and collect the page's failures into the returned list."""
    problems: list[str] = []

    def route(r, request) -> None:
        if urlparse(request.url).netloc == origin or request.url.startswith("data:"):
            r.continue_()
        else:
            problems.append(f"request outside the book (blocked): {request.url}")
            r.abort()

    def on_console(message) -> None:
        if message.type == "error" and "net::ERR_FAILED" not in message.text:
            problems.append(f"console error: {message.text}")

    def on_response(response) -> None:
        if response.status >= 400:
            problems.append(f"HTTP {response.status}: {response.url}")

    def on_failed(request) -> None:
        if urlparse(request.url).netloc == origin:
            problems.append(f"request failed: {request.url}")

    page.route("**/*", route)
    page.on("pageerror", lambda error: problems.append(f"JavaScript error: {error}"))
    page.on("console", on_console)
    page.on("response", on_response)
    page.on("requestfailed", on_failed)
    return problems


def check_pages(html_dir: Path, screenshots: Path | None = None, timeout_ms: int = 30000) -> dict[str, list[str]]:
    """Open each page of ``html_dir`` in headless Chromium; return ``{page: [problems]}`` for every page."""
    from playwright.sync_api import sync_playwright

    pages = pages_of(html_dir)
    if not pages:
        return {str(html_dir): ["no HTML pages found"]}
    server, port = _serve(html_dir)
    origin = f"127.0.0.1:{port}"
    report: dict[str, list[str]] = {}
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            for path in pages:
                rel = path.relative_to(html_dir).as_posix()
                page = context.new_page()
                problems = _watch(page, origin)
                page.goto(f"http://{origin}/{rel}", wait_until="load", timeout=timeout_ms)
                page.wait_for_load_state("networkidle", timeout=timeout_ms)
                result = page.evaluate(PAGE_PROBE)
                problems.extend(result["problems"])
                if screenshots is not None:
                    screenshots.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(screenshots / (rel.replace("/", "__") + ".png")), full_page=True)
                report[rel] = sorted(set(problems))
                page.close()
            browser.close()
    finally:
        server.shutdown()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html_dir", nargs="?", default="_build/html", type=Path)
    parser.add_argument("--screenshots", type=Path, default=None, help="save a full-page PNG of each page here")
    args = parser.parse_args(argv)
    report = check_pages(args.html_dir, args.screenshots)
    bad = {page: probs for page, probs in report.items() if probs}
    for page, probs in report.items():
        print(f"{'FAIL' if probs else 'ok  '} {page}")
        for p in probs:
            print(f"       - {p}")
    print(f"browser check: {len(report) - len(bad)} of {len(report)} pages rendered")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
