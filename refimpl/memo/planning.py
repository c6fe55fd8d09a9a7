"""Memory planning: where each tensor of one layer's forward and backward pass lives in device memory.

A training step allocates and frees the same tensors in the same order every step. A caching allocator (PyTorch's
CUDA allocator) places them online, best fit, and keeps freed blocks for reuse; with long sequences the tensors
are huge and differently sized, free space ends up split into holes no request fits, and the allocator must
reserve more memory than is ever live at once: **fragmentation**. Because the sequence is known in advance, the
addresses can instead be planned offline. MEMO (Zhao et al. 2024) plans them with a bi-level mixed-integer
program; this module solves the building block, one layer's plan, exactly:

* :func:`trace_lifetimes` - sizes and lifetimes of every storage a function allocates (a
  ``TorchDispatchMode`` numbers the operators; a weak reference to each storage tells when it was freed);
* :func:`best_fit_layout` - a caching allocator in the style of PyTorch's: sizes rounded up to 512 bytes, best
  fit among free blocks, blocks split on allocation and merged with free neighbours on release, and a new
  segment reserved when nothing fits (segments are never returned);
* :func:`milp_layout` - the exact plan: offsets ``x_i`` minimizing the peak ``P`` subject to ``x_i + s_i <= P``
  and, for every two tensors alive at the same time, one below the other (a binary ``y_ij`` and big-M
  constraints), solved with HiGHS through ``scipy.optimize.milp``;
* :func:`max_live_bytes` - the lower bound no plan can beat; :func:`check_layout` - validity.

Lifetimes are half-open operator intervals ``[start, end)``: two tensors conflict when
``start_i < end_j and start_j < end_i``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from refimpl._checks import check_float, check_int, check_positive_int

__all__ = [
    "Layout",
    "LifetimeTracer",
    "TensorLife",
    "best_fit_layout",
    "check_layout",
    "conflicts",
    "first_fit_in_order",
    "max_live_bytes",
    "milp_layout",
    "plot_layout",
    "round_up",
    "trace_lifetimes",
]


@dataclass(frozen=True)
class TensorLife:
    """One allocation: ``nbytes`` live over operator indices ``[start, end)``; ``name`` is the operator."""

    name: str
    nbytes: int
    start: int
    end: int

    def __post_init__(self) -> None:
        check_int("nbytes", self.nbytes, min_value=0)
        check_int("start", self.start, min_value=0)
        check_int("end", self.end, min_value=self.start + 1)


def round_up(nbytes: int, multiple: int) -> int:
    """``nbytes`` rounded up to a multiple of ``multiple`` (at least one ``multiple``)."""
    multiple = check_positive_int("multiple", multiple)
    return max(multiple, -(-int(nbytes) // multiple) * multiple)


def conflicts(lives: Sequence[TensorLife]) -> list[tuple[int, int]]:
    """Pairs ``(i, j)``, ``i < j``, of tensors alive at the same time (their intervals intersect)."""
    order = sorted(range(len(lives)), key=lambda i: lives[i].start)
    pairs = []
    for pos, i in enumerate(order):  # sweep: only later-starting tensors that start before i ends
        for j in order[pos + 1 :]:
            if lives[j].start >= lives[i].end:
                break
            pairs.append((min(i, j), max(i, j)))
    return sorted(pairs)


def max_live_bytes(lives: Sequence[TensorLife], sizes: Sequence[int] | None = None) -> int:
    """The lower bound of any plan: the largest total size of tensors alive at one operator index."""
    sizes = [t.nbytes for t in lives] if sizes is None else list(sizes)
    best = 0
    for t in {life.start for life in lives}:  # the live set only grows at allocations
        best = max(best, sum(sz for life, sz in zip(lives, sizes) if life.start <= t < life.end))
    return best


# ----------------------------------------------------------------------------------------------------------
# Tracing


class LifetimeTracer:
    """Context manager recording every storage allocated by PyTorch operators inside it, with its lifetime.

    Use ``with LifetimeTracer() as tr: ...``, then ``tr.lives`` (a list of :class:`TensorLife`) and ``tr.marks``
    (``{label: operator index}`` set by :meth:`mark`, e.g. where the backward pass starts). Storages that exist
    before the context (inputs, parameters) are not counted; storages alive at exit end at the last index + 1.
    """

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        tracer = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                return tracer._dispatch(func, args, kwargs or {})

        self._mode = _Mode()
        self.step = 0
        self.lives: list[TensorLife] = []
        self.marks: dict[str, int] = {}
        self._live: dict[int, tuple[Any, str, int, int]] = {}  # cdata -> (weakref, name, nbytes, start)
        self._external: dict[int, Any] = {}  # cdata -> weakref of storages made outside

    def mark(self, label: str) -> None:
        """Remember the current operator index under ``label``."""
        self.marks[label] = self.step

    def _poll(self) -> None:
        for key, (ref, name, nbytes, start) in list(self._live.items()):
            if ref.expired():
                self.lives.append(TensorLife(name, nbytes, start, max(self.step, start + 1)))
                del self._live[key]
        for key, ref in list(self._external.items()):
            if ref.expired():
                del self._external[key]

    def _dispatch(self, func: Any, args: tuple, kwargs: dict) -> Any:
        import torch
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._pytree import tree_flatten

        self._poll()  # frees since the previous operator happen "at" this one (conservative)
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                if ref.cdata not in self._live:
                    self._external.setdefault(ref.cdata, ref)
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                if ref.cdata not in self._live and ref.cdata not in self._external:
                    name = str(func.overloadpacket.__name__)
                    self._live[ref.cdata] = (ref, name, t.untyped_storage().nbytes(), self.step)
        self.step += 1
        return out

    def __enter__(self) -> LifetimeTracer:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)
        self._poll()
        for _ref, name, nbytes, start in self._live.values():
            self.lives.append(TensorLife(name, nbytes, start, max(self.step, start + 1)))
        self._live = {}
        self.lives.sort(key=lambda t: (t.start, t.end))


def trace_lifetimes(fn: Callable[[LifetimeTracer], Any], *, min_bytes: int = 1) -> tuple[list[TensorLife], dict]:
    """Run ``fn(tracer)`` under a :class:`LifetimeTracer`; return the lifetimes of allocations of at least
    ``min_bytes`` and the tracer's marks. ``fn`` may call ``tracer.mark("backward")`` between its phases."""
    min_bytes = check_int("min_bytes", min_bytes, min_value=0)
    with LifetimeTracer() as tracer:
        fn(tracer)
    return [t for t in tracer.lives if t.nbytes >= min_bytes and t.nbytes > 0], dict(tracer.marks)


# ----------------------------------------------------------------------------------------------------------
# Layouts


@dataclass
class Layout:
    """Addresses for a list of lifetimes.

    Attributes:
        offsets: byte address of each tensor.
        sizes: bytes reserved for each tensor (its size rounded up).
        peak: bytes of address space the layout needs (for the allocator: memory reserved from the device).
        method: how it was made.
        info: solver status, gap, timings, segments.
    """

    offsets: list[int]
    sizes: list[int]
    peak: int
    method: str
    info: dict[str, Any] = field(default_factory=dict)


def check_layout(lives: Sequence[TensorLife], layout: Layout) -> None:
    """Raise ``ValueError`` naming the pair if two tensors alive at the same time overlap in memory, or if a
    tensor lies outside ``[0, peak)`` or got fewer bytes than it needs."""
    if len(layout.offsets) != len(lives) or len(layout.sizes) != len(lives):
        raise ValueError(f"layout must place {len(lives)} tensors, got {len(layout.offsets)}")
    for i, t in enumerate(lives):
        if layout.sizes[i] < t.nbytes:
            raise ValueError(f"tensor {i} needs {t.nbytes} bytes, layout gives {layout.sizes[i]}")
        if layout.offsets[i] < 0 or layout.offsets[i] + layout.sizes[i] > layout.peak:
            raise ValueError(f"tensor {i} at [{layout.offsets[i]}, +{layout.sizes[i]}) is outside [0, {layout.peak})")
    for i, j in conflicts(lives):
        a0, a1 = layout.offsets[i], layout.offsets[i] + layout.sizes[i]
        b0, b1 = layout.offsets[j], layout.offsets[j] + layout.sizes[j]
        if a0 < b1 and b0 < a1:
            raise ValueError(f"tensors {i} and {j} are alive at the same time and overlap in memory")


def best_fit_layout(lives: Sequence[TensorLife], *, round_to: int = 512) -> Layout:
    """Simulate a best-fit caching allocator on ``lives`` (in the style of PyTorch's CUDA caching allocator).

    Events are replayed in time order, frees before allocations at equal times. A request of ``r`` bytes
    (rounded up to ``round_to``) takes the smallest free block of at least ``r`` bytes (lowest address on ties)
    and splits off the rest; if none fits, a new segment of exactly ``r`` bytes is reserved after the last one.
    A freed block merges with free neighbours of its own segment; segments are never given back.

    Returns a :class:`Layout` whose ``peak`` is the memory reserved, with ``info["peak_allocated"]`` (the most
    bytes in use at once) and ``info["fragmentation"] = 1 - peak_allocated / peak``.
    """
    round_to = check_positive_int("round_to", round_to)
    sizes = [round_up(t.nbytes, round_to) for t in lives]
    events = sorted([(t.start, 1, i) for i, t in enumerate(lives)] + [(t.end, 0, i) for i, t in enumerate(lives)])
    free: list[list[int]] = []  # [address, size, segment], kept sorted by address
    segments: list[tuple[int, int]] = []  # (base, size)
    offsets = [0] * len(lives)
    seg_of = [0] * len(lives)
    reserved = allocated = peak_allocated = 0
    for _, is_alloc, i in events:
        r = sizes[i]
        if is_alloc:
            fits = [blk for blk in free if blk[1] >= r]
            if fits:
                blk = min(fits, key=lambda b: (b[1], b[0]))
                offsets[i], seg_of[i] = blk[0], blk[2]
                if blk[1] == r:
                    free.remove(blk)
                else:  # split: the tail stays free
                    blk[0] += r
                    blk[1] -= r
            else:
                offsets[i], seg_of[i] = reserved, len(segments)
                segments.append((reserved, r))
                reserved += r
            allocated += r
            peak_allocated = max(peak_allocated, allocated)
        else:
            allocated -= r
            blk = [offsets[i], r, seg_of[i]]
            free.append(blk)
            free.sort()
            merged: list[list[int]] = []
            for b in free:  # merge neighbours within one segment
                if merged and merged[-1][2] == b[2] and merged[-1][0] + merged[-1][1] == b[0]:
                    merged[-1][1] += b[1]
                else:
                    merged.append(b)
            free = merged
    info = {
        "peak_allocated": peak_allocated,
        "fragmentation": 1.0 - peak_allocated / reserved if reserved else 0.0,
        "segments": segments,
        "round_to": round_to,
    }
    return Layout(offsets, sizes, reserved, "best-fit caching allocator", info)


def first_fit_in_order(lives: Sequence[TensorLife], sizes: Sequence[int], order: Sequence[int]) -> Layout:
    """Place tensors one by one in ``order``, each at the lowest address free of the conflicting tensors
    already placed. Placing in the order of any valid plan's offsets gives offsets no higher than that plan's
    (each placed tensor ends below the next one's planned offset), so the peak never gets worse."""
    conflict_with: list[set[int]] = [set() for _ in lives]
    for i, j in conflicts(lives):
        conflict_with[i].add(j)
        conflict_with[j].add(i)
    offsets = [0] * len(lives)
    placed: set[int] = set()
    for i in order:
        busy = sorted((offsets[j], offsets[j] + sizes[j]) for j in conflict_with[i] & placed)
        addr = 0
        for lo, hi in busy:
            if addr + sizes[i] <= lo:
                break
            addr = max(addr, hi)
        offsets[i] = addr
        placed.add(i)
    peak = max((o + s for o, s in zip(offsets, sizes)), default=0)
    return Layout(offsets, list(sizes), peak, "first fit in order")


def milp_layout(
    lives: Sequence[TensorLife],
    *,
    round_to: int = 512,
    time_limit: float = 5.0,
    upper_bound: Layout | None = None,
) -> Layout:
    """The exact plan: offsets minimizing the peak, by mixed-integer linear programming (HiGHS via scipy).

    Variables (sizes in units of ``round_to`` bytes, rounded up as the allocator does): offsets ``x_i >= 0``,
    the peak ``P``, and a binary ``y_ij`` for each conflicting pair. Minimize ``P`` subject to::

        x_i + s_i <= P                                      every tensor below the peak
        x_i + s_i <= x_j + M (1 - y_ij)                     y_ij = 1: i below j
        x_j + s_j <= x_i + M y_ij                           y_ij = 0: j below i
        max_live_bytes <= P <= M

    with ``M`` the peak of ``upper_bound`` (default: the best-fit allocator's layout, which is feasible, so the
    program always has a solution no worse than the allocator's). The solver's offsets are cleaned by
    :func:`first_fit_in_order` in their order (exact integers, never a higher peak). If HiGHS stops at
    ``time_limit`` seconds, ``info["status"]`` says so and ``info["gap"]`` is the relative optimality gap; if it
    found nothing, the upper bound layout is returned.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    round_to = check_positive_int("round_to", round_to)
    time_limit = check_float("time_limit", time_limit, min_value=0.0, min_inclusive=False)
    n = len(lives)
    if n == 0:
        return Layout([], [], 0, "MILP", {"status": "empty", "gap": 0.0})
    if upper_bound is None:
        upper_bound = best_fit_layout(lives, round_to=round_to)
    sizes = [round_up(t.nbytes, round_to) for t in lives]
    units = [s // round_to for s in sizes]
    lb = max_live_bytes(lives, sizes) // round_to
    big_m = max(upper_bound.peak // round_to, lb)
    pairs = conflicts(lives)
    nv = n + 1 + len(pairs)  # x_0..x_{n-1}, P, y_pairs
    p_idx = n
    a = lil_matrix((n + 2 * len(pairs), nv))
    lo_b, hi_b = [], []
    for i in range(n):  # x_i - P <= -s_i
        a[i, i], a[i, p_idx] = 1.0, -1.0
        lo_b.append(-np.inf)
        hi_b.append(-units[i])
    for k, (i, j) in enumerate(pairs):
        y = n + 1 + k
        r = n + 2 * k
        a[r, i], a[r, j], a[r, y] = 1.0, -1.0, big_m  # x_i - x_j + M y <= M - s_i
        lo_b.append(-np.inf)
        hi_b.append(big_m - units[i])
        a[r + 1, j], a[r + 1, i], a[r + 1, y] = 1.0, -1.0, -big_m  # x_j - x_i - M y <= -s_j
        lo_b.append(-np.inf)
        hi_b.append(-units[j])
    c = np.zeros(nv)
    c[p_idx] = 1.0
    integrality = np.zeros(nv)
    integrality[n + 1 :] = 1
    lower = np.zeros(nv)
    upper = np.ones(nv)
    upper[:n] = [big_m - u for u in units]
    lower[p_idx], upper[p_idx] = lb, big_m
    start = time.perf_counter()
    res = milp(
        c,
        constraints=LinearConstraint(a.tocsr(), lo_b, hi_b),
        integrality=integrality,
        bounds=Bounds(lower, upper),
        options={"time_limit": time_limit, "disp": False},
    )
    seconds = time.perf_counter() - start
    info: dict[str, Any] = {
        "status": res.message,
        "optimal": res.status == 0,
        "seconds": seconds,
        "binaries": len(pairs),
        "lower_bound": lb * round_to,
        "round_to": round_to,
    }
    if res.x is None:
        info["gap"] = float("nan")
        return Layout(
            list(upper_bound.offsets), list(upper_bound.sizes), upper_bound.peak, "best fit (MILP found none)", info
        )
    info["gap"] = float(getattr(res, "mip_gap", 0.0) or 0.0)
    order = sorted(range(n), key=lambda i: (res.x[i], i))
    plan = first_fit_in_order(lives, sizes, order)
    plan.method, plan.info = "MILP", info
    return plan


def plot_layout(ax: Any, lives: Sequence[TensorLife], layout: Layout, *, title: str = "", unit: float = 2**20) -> None:
    """Draw ``layout`` as an address-time diagram on matplotlib axes ``ax``: one rectangle per tensor, from its
    first to its last operator (x) and over its addresses (y, in ``unit`` bytes; MiB by default)."""
    from matplotlib.patches import Rectangle

    cmap = __import__("matplotlib").colormaps["viridis"]
    biggest = max((t.nbytes for t in lives), default=1)
    for t, off, size in zip(lives, layout.offsets, layout.sizes):
        colour = cmap(0.15 + 0.75 * t.nbytes / biggest)
        ax.add_patch(Rectangle((t.start, off / unit), t.end - t.start, size / unit, fc=colour, ec="white", lw=0.5))
    ax.axhline(layout.peak / unit, color="black", ls="--", lw=1)
    ax.set_xlim(0, max((t.end for t in lives), default=1))
    ax.set_ylim(0, max(layout.peak, 1) / unit * 1.08)
    ax.set_xlabel("operator index (time)")
    ax.set_ylabel("address (MiB)" if unit == 2**20 else f"address (x{unit:g} bytes)")
    if title:
        ax.set_title(title)
