"""Peak extra CPU memory of a call, measured by replaying the allocator's events.

PyTorch has no ``max_memory_allocated`` for the CPU. With ``torch.profiler.profile(profile_memory=True)`` the
profiler records every allocation and free of PyTorch's CPU allocator with its size and time stamp. Replaying
them in time order (running sum of the signed sizes) gives the net bytes the call holds at every moment; the
maximum is the peak extra memory: tensors created and freed inside the call, plus what it returns, and nothing
that existed before (the inputs). It counts tensor storage only (not the Python interpreter, not allocator
caching or fragmentation), which is what the algorithm controls.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["allocation_events", "peak_memory"]


@contextlib.contextmanager
def _without_profiler_banners() -> Iterator[None]:
    """Drop the ``profiler_start``/``profiler_stop`` lines Kineto writes to file descriptor 2 (no switch turns them
    off); every other line written there meanwhile is passed on to ``sys.stderr``."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable descriptor 2: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines(keepends=True):
                if "ActivityProfiler" not in line:
                    sys.stderr.write(line)


def allocation_events(fn: Callable[[], Any]) -> list[tuple[int, int]]:
    """Run ``fn()`` under the profiler; return its CPU allocations as ``(time_ns, bytes)``, frees negative."""
    if not callable(fn):
        raise TypeError(f"fn must be callable with no arguments, got {type(fn).__name__}")
    from torch.profiler import ProfilerActivity, profile

    with _without_profiler_banners(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    alloc_type = torch._C._profiler._ExtraFields_Allocation
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:  # allocations are nested under the operator that made them; walk the whole tree
        node = stack.pop()
        fields = node.extra_fields
        if isinstance(fields, alloc_type) and fields.device.type == "cpu":
            events.append((node.start_time_ns, int(fields.alloc_size)))
        stack.extend(node.children)
    events.sort()
    return events


def peak_memory(fn: Callable[[], Any]) -> int:
    """Peak extra bytes of CPU tensor storage held while ``fn()`` runs (its result counts until it returns).

    Example: ``peak_memory(lambda: naive_attention(q, k, v))`` is about ``2 B H N^2 * 4`` bytes in float32
    (scores and probabilities), ``peak_memory(lambda: flash_attention(q, k, v))`` a few tiles plus the output.
    """
    running = peak = 0
    for _, size in allocation_events(fn):
        running += size
        peak = max(peak, running)
    return peak
