"""Interactive widgets for the book's "explore" cells, whose outputs are written by the kernel.

``ipywidgets.interact`` shows each result by *capturing* the kernel's output messages into an ``Output`` widget:
the front end routes every message of the running cell into the widget. nbclient, which executes the notebooks in
the book build, imitates that front end: for each captured output it sends a ``comm_msg`` back to the kernel on
the shell channel, while it is itself waiting on that channel for the cell's ``execute_reply``. jupyter_client
sends through a blocking shadow of the asyncio socket, and that send can consume libzmq's edge-triggered wake-up
for a reply that has just arrived; the client then sleeps until the cell's timeout although the kernel is idle
(nbclient issue 312). How often this happens depends on timing (a larger figure, a busier machine).

:func:`interactive` writes each result into the ``Output`` widget's ``outputs`` state from the kernel instead.
No output message is captured and the executing client sends nothing back, so the cell ends when the kernel does;
JupyterLab and the built page render the same ``outputs`` state.
"""

from __future__ import annotations

import contextlib
import io
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import ipywidgets as widgets
from IPython import get_ipython
from IPython.core.displaypub import DisplayPublisher
from ipywidgets.widgets.interaction import show_inline_matplotlib_plots

Output = dict[str, Any]  # one output in nbformat's JSON form, as the Output widget's ``outputs`` state holds it


class _StreamRecorder(io.TextIOBase):
    """A text stream that appends what is written to ``outputs`` as nbformat stream outputs."""

    def __init__(self, name: str, outputs: list[Output]) -> None:
        self.name, self.outputs = name, outputs

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        last = self.outputs[-1] if self.outputs else {}
        if last.get("output_type") == "stream" and last.get("name") == self.name:
            last["text"] += text
        else:
            self.outputs.append({"output_type": "stream", "name": self.name, "text": text})
        return len(text)


class _DisplayRecorder(DisplayPublisher):
    """IPython's display publisher, appending to ``outputs`` instead of sending ``display_data`` messages."""

    def __init__(self, outputs: list[Output]) -> None:
        super().__init__()
        self.outputs = outputs

    def publish(self, data: dict, metadata: dict | None = None, *args: Any, **kwargs: Any) -> None:
        self.outputs.append({"output_type": "display_data", "data": data, "metadata": metadata or {}})

    def clear_output(self, wait: bool = False) -> None:
        self.outputs.clear()


@contextlib.contextmanager
def recording_outputs() -> Iterator[list[Output]]:
    """Record stdout, stderr and rich displays (matplotlib figures included), in order, as nbformat outputs."""
    outputs: list[Output] = []
    shell = get_ipython()
    if shell is not None:
        saved_pub, shell.display_pub = shell.display_pub, _DisplayRecorder(outputs)
    try:
        with (
            contextlib.redirect_stdout(_StreamRecorder("stdout", outputs)),
            contextlib.redirect_stderr(_StreamRecorder("stderr", outputs)),
        ):
            yield outputs
            show_inline_matplotlib_plots()  # figures the function drew but did not show
    finally:
        if shell is not None:
            shell.display_pub = saved_pub


class KernelRenderedInteractive(widgets.interactive):
    """``ipywidgets.interactive`` whose ``Output`` is filled by the kernel (see the module docstring).

    The first call of ``f`` (while the widget is built) raises on error, so a broken widget fails the cell; later
    calls, made when a reader moves a control, show the traceback in the widget instead.
    """

    def update(self, *args: Any) -> None:
        first = not hasattr(self, "_rendered")
        self._rendered = True
        self.kwargs = {w._kwarg: w.get_interact_value() for w in self.kwargs_widgets}
        show_inline_matplotlib_plots()  # earlier figures belong to the cell, not to this widget
        with recording_outputs() as outputs:
            try:
                self.result = self.f(**self.kwargs)
            except Exception:
                if first:
                    raise
                outputs.append({"output_type": "stream", "name": "stderr", "text": traceback.format_exc()})
        self.out.outputs = tuple(outputs)


def interactive(f: Callable[..., Any], **controls: Any) -> KernelRenderedInteractive:
    """Controls for ``f``'s keyword arguments above ``f``'s output, re-rendered when a control moves.

    Takes what ``ipywidgets.interactive`` takes (a widget or an abbreviation such as ``(0, 9)`` per argument) and
    returns the widget; end a cell with it to show it.
    """
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    return KernelRenderedInteractive(f, **controls)
