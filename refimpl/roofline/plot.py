"""Figures of the roofline model, shared by every chapter that puts its technique on the roofline.

Each function draws on a matplotlib ``Axes`` (a new figure if ``ax`` is None) and returns the axes; none of them
computes a cost: they draw what :func:`refimpl.roofline.analyze` and :class:`~refimpl.roofline.Hardware` give.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from refimpl.roofline.analyzer import Analysis
from refimpl.roofline.hardware import Hardware

__all__ = ["plot_operators", "plot_roofline", "plot_time_breakdown"]

BOUND_COLORS = {"memory": "#0072B2", "compute": "#D55E00"}


def _axes(ax: Any) -> Any:
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots()
    return ax


def plot_roofline(
    hardware: Hardware,
    dtype: Any = "fp16",
    ax: Any = None,
    *,
    intensity_range: Sequence[float] = (1e-2, 1e4),
    label: str | None = None,
    color: str | None = None,
    mark_ridge: bool = True,
    ridge_in_legend: bool = False,
) -> Any:
    """Draw ``P(I) = min(pi, beta I)`` on log-log axes (FLOP/byte vs FLOP/s), with the ridge point marked.

    The ridge's value is written next to it, or, with ``ridge_in_legend`` (several machines on one axes, whose
    ridges lie close together), in the line's legend label.
    """
    import numpy as np

    ax = _axes(ax)
    lo, hi = intensity_range
    peak, bw = hardware.peak(dtype), hardware.memory_bandwidth
    ridge = peak / bw
    x = np.geomspace(lo, hi, 200)
    label = label or f"{hardware.name} ({dtype})"
    shown = mark_ridge and lo <= ridge <= hi
    if shown and ridge_in_legend:
        label = f"{label}, ridge {ridge:.3g}"
    (line,) = ax.loglog(x, np.minimum(peak, bw * x), color=color, label=label)
    if shown:
        ax.plot([ridge], [peak], "o", color=line.get_color(), markersize=5)
    if shown and not ridge_in_legend:
        ax.annotate(
            f"ridge {ridge:.3g}", (ridge, peak), textcoords="offset points", xytext=(-6, 4), ha="right", fontsize=9
        )
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("attainable performance (FLOP/s)")
    return ax


def plot_operators(analysis: Analysis, ax: Any = None, *, annotate: int = 6) -> Any:
    """The hardware's roofline with one point per operator at (intensity, attainable FLOP/s).

    Point area grows with the operator's share of the stage's time; the ``annotate`` slowest points are
    numbered, and the legend names the operators at each number.
    Operators that never touch memory (infinite intensity) are left out.
    """
    ax = _axes(ax)
    rows = [r for r in analysis.rows if r.op.bytes > 0 and r.op.flops > 0]
    xs = [r.op.intensity for r in rows]
    lo, hi = min(xs + [analysis.ridge_point]) / 3, max(xs + [analysis.ridge_point]) * 3
    plot_roofline(analysis.hardware, analysis.dtype, ax, intensity_range=(lo, hi), color="0.4")
    total = analysis.time
    for r in rows:
        ax.scatter(
            r.op.intensity,
            r.attainable_flops,
            s=20 + 400 * r.total_time / total,
            color=BOUND_COLORS[r.bound],
            alpha=0.7,
            zorder=3,
        )
    # Operators of one kind often share a point (all weight GEMVs of a decode step sit at I ~ B): label each
    # point once with the names of the slowest operators on it.
    groups: dict[tuple[float, float], list[Any]] = {}
    for r in rows:
        key = (round(math.log10(r.op.intensity), 1), round(math.log10(r.attainable_flops), 1))
        groups.setdefault(key, []).append(r)
    ranked = sorted(groups.values(), key=lambda g: -sum(r.total_time for r in g))[:annotate]
    # A number at each labelled point and the names in the legend: long names beside clustered points overlap.
    for i, group in enumerate(ranked, start=1):
        group.sort(key=lambda r: -r.total_time)
        names = ", ".join(r.op.name for r in group[:3]) + (f" +{len(group) - 3}" if len(group) > 3 else "")
        r = group[0]
        ax.annotate(
            str(i),
            (r.op.intensity, r.attainable_flops),
            textcoords="offset points",
            xytext=(5, -12 if i % 2 else 4),
            fontsize=9,
            fontweight="bold",
        )
        ax.plot([], [], " ", label=f"{i}: {names}")
    for bound, color in BOUND_COLORS.items():
        ax.scatter([], [], color=color, label=f"{bound}-bound operator")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"{analysis.model.name} {analysis.stage}, batch {analysis.batch}, seq {analysis.seq}")
    return ax


def plot_time_breakdown(analysis: Analysis, ax: Any = None, *, top: int = 10) -> Any:
    """Horizontal bars: milliseconds per operator over the stage (``top`` largest), colored by bound."""
    ax = _axes(ax)
    rows = sorted(analysis.rows, key=lambda r: r.total_time)[-top:]
    ax.barh(
        [r.op.name for r in rows],
        [r.total_time * 1e3 for r in rows],
        color=[BOUND_COLORS[r.bound] for r in rows],
    )
    from matplotlib.patches import Patch

    # Legend patches made directly: an empty ``barh`` gives its legend entry the default colour, not ``color``.
    handles = [Patch(color=color, label=f"{bound}-bound") for bound, color in BOUND_COLORS.items()]
    ax.legend(handles=handles, loc="lower right", fontsize=8)
    ax.set_xlabel("time in the stage (ms)")
    ax.set_title(f"{analysis.stage}: {analysis.time * 1e3:.3g} ms on {analysis.hardware.name}")
    return ax
