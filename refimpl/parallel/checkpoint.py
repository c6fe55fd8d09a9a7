"""Asynchronous checkpointing: stall training only for a copy of the state, write it in the background.

DataStates-LLM (Maurya et al. 2024, "DataStates-LLM: Lazy Asynchronous Checkpointing for Large Language
Models", sec. 4) observes that the model and optimizer state are immutable between the end of one optimizer
step and the next update, so a checkpoint needs only a consistent *copy* made before the next update; the slow
part (serializing and writing to storage) can overlap the following forward and backward passes. A synchronous
``torch.save`` stalls training for all of it.

:func:`async_snapshot` copies every tensor of a state dict to host memory (on a GPU this is the device-to-host
transfer; on the CPU a memory copy), returns, and writes the copy with ``torch.save`` and ``fsync``
(:func:`save_durably`) in a background thread.
:meth:`Snapshot.wait` joins the writer. The copy makes the file independent of later updates to the live state.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["Snapshot", "async_snapshot", "host_copy", "save_durably"]


def host_copy(state: Any) -> Any:
    """A copy of ``state`` (nested dicts, lists and tuples of tensors and plain values) with every tensor on the CPU."""
    if isinstance(state, Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: host_copy(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(host_copy(v) for v in state)
    return state


@dataclass
class Snapshot:
    """A checkpoint being written: ``copy_s`` is how long training stalled; :meth:`wait` returns the write time."""

    path: str
    copy_s: float
    _thread: threading.Thread = field(repr=False)
    _write_s: list[float] = field(default_factory=list, repr=False)
    _error: list[BaseException] = field(default_factory=list, repr=False)

    def wait(self) -> float:
        """Block until the file is written; return the background write's seconds. Re-raises a write error."""
        self._thread.join()
        if self._error:
            raise self._error[0]
        return self._write_s[0]


def save_durably(state: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(state, path)``, then ``fsync``: a checkpoint counts once it is on storage, not in the page cache."""
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def async_snapshot(state: Any, path: str | os.PathLike[str]) -> Snapshot:
    """Copy ``state`` to host memory now; write it to ``path`` with :func:`save_durably` in a background thread."""
    path = os.fspath(path)
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise ValueError(f"path must be in an existing directory, got {path!r}")
    start = time.perf_counter()
    copy = host_copy(state)
    copy_s = time.perf_counter() - start
    write_s: list[float] = []
    errors: list[BaseException] = []

    def write() -> None:
        t0 = time.perf_counter()
        try:
            save_durably(copy, path)
        except BaseException as err:  # surfaced by Snapshot.wait
            errors.append(err)
        write_s.append(time.perf_counter() - t0)

    thread = threading.Thread(target=write, name="refimpl-snapshot", daemon=True)
    thread.start()
    return Snapshot(path, copy_s, thread, write_s, errors)
