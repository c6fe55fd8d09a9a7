"""refimpl.interact: widgets whose outputs the kernel writes, and why (the executing client's lost reply)."""

from __future__ import annotations

import time

import ipywidgets as widgets
import nbformat
import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.display import display

from refimpl.interact import KernelRenderedInteractive, interactive, recording_outputs


@pytest.fixture
def shell() -> InteractiveShell:
    return InteractiveShell.instance()


def _summary(outputs) -> list:
    return [(o["output_type"], o.get("text", sorted(o.get("data", {})))) for o in outputs]


def test_recording_keeps_streams_and_displays_in_order(shell: InteractiveShell) -> None:
    with recording_outputs() as outputs:
        print("a")
        print("b")
        display({"text/plain": "shown", "text/html": "<b>shown</b>"}, raw=True)
        print("c")
    assert _summary(outputs) == [
        ("stream", "a\nb\n"),
        ("display_data", ["text/html", "text/plain"]),
        ("stream", "c\n"),
    ]


def test_the_output_widget_holds_the_result_and_follows_the_controls(shell: InteractiveShell) -> None:
    def f(n: int = 2, label: str = "x") -> None:
        print(f"{label} = {n}")

    w = interactive(f, n=widgets.IntSlider(value=2, min=0, max=9), label=widgets.Text(value="x"))
    assert isinstance(w, KernelRenderedInteractive)
    assert _summary(w.out.outputs) == [("stream", "x = 2\n")]
    w.children[0].value = 7  # a reader moves the slider
    assert _summary(w.out.outputs) == [("stream", "x = 7\n")], "the new output replaces the old one"
    w.children[1].value = "y"
    assert _summary(w.out.outputs) == [("stream", "y = 7\n")]


def test_abbreviations_build_the_same_controls_as_ipywidgets(shell: InteractiveShell) -> None:
    ours = interactive(lambda n: None, n=(0, 9))
    theirs = widgets.interactive(lambda n: None, n=(0, 9))
    assert [type(c) for c in ours.children] == [type(c) for c in theirs.children]
    assert (ours.children[0].min, ours.children[0].max) == (0, 9)


def test_an_error_fails_the_cell_at_first_and_shows_in_the_widget_later(shell: InteractiveShell) -> None:
    def f(n: int = 1) -> None:
        if n == 0:
            raise ValueError("n must be positive")
        print(1 / n)

    with pytest.raises(ValueError, match="n must be positive"):
        interactive(f, n=widgets.IntSlider(value=0))
    w = interactive(f, n=widgets.IntSlider(value=1))
    w.children[0].value = 0
    (out,) = w.out.outputs
    assert out["name"] == "stderr" and "ValueError: n must be positive" in out["text"]


def test_interactive_rejects_a_non_callable() -> None:
    with pytest.raises(TypeError, match="f must be callable, got int"):
        interactive(3)


# --- the stall this module avoids, reproduced deterministically -------------------------------------------------

IPYWIDGETS_INTERACT = "import ipywidgets\n_ = ipywidgets.interact(lambda n: print(n), n=(0, 9))"
OURS = "from refimpl.interact import interactive\ninteractive(lambda n: print(n), n=(0, 9))"


def _execute_with_a_slow_client(source: str, timeout: int) -> float:
    """Seconds nbclient waits for a widget cell when it handles captured output a little late.

    The client sleeps before handling an output that an ``Output`` widget captured (as a busy machine or a large
    figure makes it do): the kernel's ``execute_reply`` reaches the client's socket meanwhile, and the ``comm_msg``
    nbclient then sends on the same socket swallows its wake-up.
    """
    from nbclient import NotebookClient

    class SlowClient(NotebookClient):
        def process_message(self, msg, cell, cell_index):
            captured = self.output_hook_stack.get(msg["parent_header"].get("msg_id"))
            if captured and msg["msg_type"] in ("stream", "display_data"):  # outputs nbclient syncs to the kernel
                time.sleep(0.5)
            return super().process_message(msg, cell, cell_index)

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source)]
    client = SlowClient(nb, timeout=timeout, kernel_name="python3")
    with client.setup_kernel():
        start = time.perf_counter()
        client.execute_cell(nb.cells[0], 0)
        return time.perf_counter() - start


@pytest.mark.slow
def test_ipywidgets_interact_keeps_the_client_waiting_and_ours_does_not() -> None:
    timeout = 8
    assert _execute_with_a_slow_client(IPYWIDGETS_INTERACT, timeout) >= timeout - 0.5, (
        "the control: ipywidgets' captured output no longer stalls nbclient (fixed upstream?)"
    )
    assert _execute_with_a_slow_client(OURS, timeout) < timeout / 2
