"""Peak extra CPU memory of a call, measured by replaying the allocator's events.

PyTorch has no ``max_memory_allocated`` for the CPU. With ``torch.profiler.profile(profile_memory=True)`` the
profiler records every allocation and free of PyTorch's CPU allocator with its size and time stamp. Replaying
them in time order (running sum of the signed sizes) gives the net bytes the call holds at every moment; the
maximum is the peak extra memory: tensors created and freed inside the call, plus what it returns, and nothing
that existed before (the inputs). It counts tensor storage only (not the Python interpreter, not allocator
caching or fragmentation), which is what the algorithm controls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["allocation_events", "peak_memory"]


def allocation_events(fn: Callable[[], Any]) -> list[tuple[int, int]]:
    """Run ``fn()`` under the profiler; return its CPU allocations as ``(time_ns, bytes)``, frees negative."""
    if not callable(fn):
        raise TypeError(f"fn must be callable with no arguments, got {type(fn).__name__}")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
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
