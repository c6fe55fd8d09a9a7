"""Sphinx extension: hold every notebook's execution in the book build to a time budget, and print the times.

Two rules, both failures of a build run with ``-W``:

- **No cell may reach the per-cell timeout** (``execute: timeout`` in ``_config.yml``). nbclient raises
  ``CellTimeoutError`` when the kernel is still busy at the timeout; a cell that reaches the timeout *without* that
  error is a client that waited on an idle kernel, because its wake-up for the cell's ``execute_reply`` was lost
  (issue 19: ``ipywidgets.interact`` in the roofline chapter, see ``refimpl/interact.py``). nbclient then carries
  on as if nothing happened; this extension turns it into the same ``CellTimeoutError``, so the notebook is
  reported as failed and is not stored in the execution cache.
- **No notebook may take longer than ``book_notebook_budget`` seconds** to execute (fresh or as recorded in
  jupyter-cache, so an over-budget notebook does not pass on the next, cached build).

Both limits are for 2 free CPU cores. On a machine k times slower (shared, loaded), ``BOOK_TIME_SCALE=k``
multiplies both; ``BOOK_FULL=1`` (the chapters' size knob) lifts the budget and gives each cell four times the
timeout.

At the end of reading, the build log lists each notebook's execution time against the budget.

Both execution modes the book can use are timed: ``cache``/``force`` (jupyter-cache's ``single_nb_execution``) and
``inline`` (myst-nb runs the cells while it reads the page, which ``{eval}`` in the prose needs): the same per-cell
hooks are installed on the inline client.
"""

from __future__ import annotations

import os
import time
from typing import Any

from nbclient.exceptions import CellTimeoutError
from sphinx.util import logging

logger = logging.getLogger(__name__)

_app: Any = None  # the running Sphinx application (the wrapper below runs inside myst-nb and has no handle on it)
_MYST_NB_EXECUTORS = ("myst_nb.core.execute.cache", "myst_nb.core.execute.direct")


def _cell_label(cell: Any, cell_index: int) -> str:
    first = next((line for line in cell.source.splitlines() if line.strip()), "")
    return f"cell {cell_index} ({first[:60]!r})"


def _cell_hooks(timeout: int | None) -> tuple[Any, Any, dict[int, float]]:
    """nbclient's ``on_cell_execute`` and ``on_cell_executed`` hooks that time each cell into the returned dict and
    turn a cell that kept the client waiting for the whole timeout into ``CellTimeoutError``."""
    started: dict[int, float] = {}
    seconds: dict[int, float] = {}

    def on_cell_execute(cell: Any, cell_index: int) -> None:
        started[cell_index] = time.perf_counter()

    def on_cell_executed(cell: Any, cell_index: int, execute_reply: Any) -> None:
        seconds[cell_index] = elapsed = time.perf_counter() - started[cell_index]
        if timeout and elapsed >= timeout:
            raise CellTimeoutError.error_from_timeout_and_cell(
                f"{_cell_label(cell, cell_index)} kept the client waiting for the whole per-cell timeout "
                f"({elapsed:.1f} s) although the kernel finished it: its execute_reply was missed",
                timeout,
                cell,
            )

    return on_cell_execute, on_cell_executed, seconds


def _record(seconds: dict[int, float]) -> None:
    if _app is not None and _app.env.docname:
        _app.env.book_cell_seconds[_app.env.docname] = seconds


def _timed_execution(single_nb_execution: Any) -> Any:
    """Wrap jupyter-cache's ``single_nb_execution`` so each cell's wall time on the client side is checked."""

    def run(nb: Any, cwd: Any, timeout: int | None, allow_errors: bool, **kwargs: Any) -> Any:
        on_cell_execute, on_cell_executed, seconds = _cell_hooks(timeout)
        result = single_nb_execution(
            nb,
            cwd=cwd,
            timeout=timeout,
            allow_errors=allow_errors,
            on_cell_execute=on_cell_execute,
            on_cell_executed=on_cell_executed,
            **kwargs,
        )
        _record(seconds)
        return result

    run.wrapped = single_nb_execution  # type: ignore[attr-defined]
    return run


def _timed_inline_start(start_client: Any) -> Any:
    """Wrap myst-nb's ``NotebookClientInline.start_client`` so its nbclient gets the same per-cell hooks."""

    def start(self: Any) -> None:
        start_client(self)
        client = self._client
        client.on_cell_execute, client.on_cell_executed, seconds = _cell_hooks(client.timeout)
        _record(seconds)  # filled in as the page is read and its cells run

    start.wrapped = start_client  # type: ignore[attr-defined]
    return start


def _full_size() -> bool:
    return os.environ.get("BOOK_FULL", "0") == "1"


def _time_scale() -> float:
    value = os.environ.get("BOOK_TIME_SCALE", "1")
    try:
        scale = float(value)
    except ValueError:
        scale = 0.0
    if not scale > 0:
        raise ValueError(f"BOOK_TIME_SCALE must be a positive number, got {value!r}")
    return scale


def _install(app: Any, config: Any) -> None:
    import importlib

    global _app
    _app = app
    # The kernels that execute the notebooks inherit this: refimpl.display.progress shows no bar in a built page.
    os.environ["REFIMPL_PROGRESS"] = "0"
    for name in _MYST_NB_EXECUTORS:
        module = importlib.import_module(name)
        if not hasattr(module, "single_nb_execution"):
            raise RuntimeError(f"book_budget: {name} no longer calls single_nb_execution; update _ext/book_budget.py")
        if not hasattr(module.single_nb_execution, "wrapped"):
            module.single_nb_execution = _timed_execution(module.single_nb_execution)
    from myst_nb.core.execute.inline import NotebookClientInline

    if not hasattr(NotebookClientInline.start_client, "wrapped"):
        NotebookClientInline.start_client = _timed_inline_start(NotebookClientInline.start_client)
    if config.nb_execution_timeout:
        config.nb_execution_timeout = round(config.nb_execution_timeout * _time_scale() * (4 if _full_size() else 1))


def _forget_last_build(app: Any, env: Any, docnames: list[str]) -> None:
    env.book_cell_seconds = {}


def _report(app: Any, env: Any) -> None:
    from myst_nb.sphinx_ import NbMetadataCollector

    budget = None if _full_size() else app.config.book_notebook_budget * _time_scale()
    fresh = getattr(env, "book_cell_seconds", {})
    rows = []
    for docname, data in sorted(NbMetadataCollector.get_doc_data(env).items()):
        exec_data = data.get("exec_data")
        if not exec_data or exec_data.get("runtime") is None:
            continue
        runtime = float(exec_data["runtime"])
        if docname in fresh:
            source = "executed now" + (" (inline)" if exec_data.get("method") == "inline" else "")
        elif exec_data.get("method") == "cache":
            source = "from the execution cache"
        else:
            source = f"executed in {exec_data.get('method')} mode, cells not timed"
        slowest = ""
        if fresh.get(docname):
            index, seconds = max(fresh[docname].items(), key=lambda kv: kv[1])
            slowest = f"; slowest cell {index}: {seconds:.1f} s"
        rows.append(f"  {docname}: {runtime:6.1f} s ({source}{slowest})")
        if budget is not None and runtime > budget:
            logger.warning(
                f"executing the notebook took {runtime:.1f} s, over the budget of {budget:g} s per notebook "
                "(book_notebook_budget in _config.yml; BOOK_TIME_SCALE=k on a machine k times slower)",
                location=docname,
                type="book",
                subtype="budget",
            )
    if rows:
        limit = "none (BOOK_FULL=1)" if budget is None else f"{budget:g} s"
        cell = app.config.nb_execution_timeout
        logger.info(
            f"notebook execution times (budget per notebook: {limit}; per cell: under {cell} s):\n" + "\n".join(rows)
        )


def setup(app: Any) -> dict[str, Any]:
    app.add_config_value("book_notebook_budget", 120, "env", [int, float])
    app.connect("config-inited", _install)
    app.connect("env-before-read-docs", _forget_last_build)
    app.connect("env-updated", _report)
    # The wrapper attributes each execution to the document being read: reading must be serial.
    return {"parallel_read_safe": False, "parallel_write_safe": True}
