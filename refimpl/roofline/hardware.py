"""Hardware ceilings for the roofline model: peak FLOP/s per dtype, memory bandwidth, capacity, host link.

The roofline model (Williams, Waterman and Patterson 2009, "Roofline: an insightful visual performance model")
bounds a kernel of arithmetic intensity ``I`` (FLOP per byte of memory traffic) on a machine with peak compute
``pi`` (FLOP/s) and memory bandwidth ``beta`` (B/s) by the attainable performance

    P(I) = min(pi, beta * I)                                                       (Williams et al. 2009, eq. 1)

The two ceilings meet at the ridge point ``I* = pi / beta``: a kernel left of it is memory-bound, right of it
compute-bound. This module holds the ceilings. Datasheet entries live in ``refimpl/data/hardware.yaml`` (package
data, read with :mod:`importlib.resources`) with their source and date; the entry ``"cpu"`` is measured on the
machine that runs the code (:func:`measure_hardware`, with the micro-benchmarks
of :mod:`refimpl.roofline.measure`).

Units are SI everywhere in code: FLOP/s, bytes/s, bytes. Dense and 2:4-sparse peaks are kept apart: only
``peak_flops`` (dense) is a ceiling used by the analyzer; ``peak_flops_sparse`` is there to be labelled honestly.
"""

from __future__ import annotations

import datetime
import functools
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from refimpl._checks import check_choice, check_float, resolve_named
from refimpl.roofline.dtypes import DTYPE_BITS, dtype_bits, normalize_dtype

__all__ = [
    "DTYPE_BITS",
    "HARDWARE_YAML",
    "Hardware",
    "dtype_bits",
    "list_hardware",
    "load_hardware",
    "measure_hardware",
    "normalize_dtype",
    "resolve_hardware",
]

#: The datasheet entries, shipped inside the package (a :class:`~importlib.resources.abc.Traversable`).
HARDWARE_YAML = resources.files("refimpl") / "data" / "hardware.yaml"


@dataclass(frozen=True)
class Hardware:
    """The ceilings of one machine, in SI units.

    Attributes:
        name: short key (``"a100-40gb"``) used by :func:`load_hardware`.
        peak_flops: dense peak compute per dtype, FLOP/s (OP/s for integer types); the roofline's ``pi``.
        memory_bandwidth: device memory bandwidth, bytes/s; the roofline's ``beta``.
        memory_capacity: device memory, bytes.
        host_link_bandwidth: host <-> device link, one direction, bytes/s (``None`` where there is no separate
            host link, e.g. a CPU whose "device memory" is host memory).
        peak_flops_sparse: 2:4 structured-sparsity peaks per dtype, FLOP/s; labelled, never the dense ceiling.
        description: long name.
        source: where the numbers come from (datasheet title and URL, or the measurement that produced them).
        date: datasheet date, or the date of the measurement.
        measured: True for numbers measured on this machine, False for datasheet numbers.
    """

    name: str
    peak_flops: dict[str, float]
    memory_bandwidth: float
    memory_capacity: float
    host_link_bandwidth: float | None = None
    peak_flops_sparse: dict[str, float] = field(default_factory=dict)
    description: str = ""
    source: str = ""
    date: str = ""
    measured: bool = False

    def __post_init__(self) -> None:
        if not self.peak_flops:
            raise ValueError(f"peak_flops of {self.name!r} must name at least one dtype, got {{}}")
        for dtype, value in self.peak_flops.items():
            normalize_dtype(dtype)
            check_float(f"peak_flops[{dtype!r}]", value, min_value=0.0, min_inclusive=False)
        check_float("memory_bandwidth", self.memory_bandwidth, min_value=0.0, min_inclusive=False)
        check_float("memory_capacity", self.memory_capacity, min_value=0.0, min_inclusive=False)
        if self.host_link_bandwidth is not None:
            check_float("host_link_bandwidth", self.host_link_bandwidth, min_value=0.0, min_inclusive=False)

    @property
    def dtypes(self) -> list[str]:
        """The dtypes with a dense peak on this machine."""
        return list(self.peak_flops)

    def peak(self, dtype: Any) -> float:
        """Dense peak FLOP/s for ``dtype``; raises ``ValueError`` naming the dtypes this machine has."""
        name = normalize_dtype(dtype)
        if name not in self.peak_flops:
            raise ValueError(
                f"dtype must be one of {self.dtypes} for hardware {self.name!r}; got {name!r} (no peak listed)"
            )
        return self.peak_flops[name]

    def ridge_point(self, dtype: Any) -> float:
        """Ridge point ``I* = pi / beta`` in FLOP/byte: the intensity where the two ceilings meet."""
        return self.peak(dtype) / self.memory_bandwidth

    def attainable_performance(self, intensity: float, dtype: Any) -> float:
        """Attainable FLOP/s ``min(pi, beta * I)`` at arithmetic intensity ``intensity`` (FLOP/byte)."""
        intensity = check_float("intensity", intensity, min_value=0.0)
        return min(self.peak(dtype), self.memory_bandwidth * intensity)

    def summary(self) -> str:
        """One line per ceiling, in human units, for printing."""
        peaks = ", ".join(f"{d} {v / 1e12:g}" for d, v in self.peak_flops.items())
        link = "n/a" if self.host_link_bandwidth is None else f"{self.host_link_bandwidth / 1e9:g} GB/s"
        return (
            f"{self.name}: {self.description}\n"
            f"  peak (dense, TFLOP/s): {peaks}\n"
            f"  memory bandwidth: {self.memory_bandwidth / 1e9:g} GB/s, capacity: "
            f"{self.memory_capacity / 2**30:g} GiB, host link: {link}\n"
            f"  source: {self.source} ({self.date})"
        )


@functools.lru_cache(maxsize=1)
def _read_yaml() -> dict[str, dict[str, Any]]:
    import yaml

    return yaml.safe_load(HARDWARE_YAML.read_text(encoding="utf-8"))


def list_hardware() -> list[str]:
    """Names accepted by :func:`load_hardware` (the datasheet entries of :data:`HARDWARE_YAML` and ``"cpu"``)."""
    return list(_read_yaml())


def _from_entry(name: str, entry: dict[str, Any]) -> Hardware:
    src = entry["source"]
    link = entry.get("host_link_gbps")
    return Hardware(
        name=name,
        peak_flops={normalize_dtype(k): float(v) * 1e12 for k, v in entry["peak_tflops"].items()},
        peak_flops_sparse={normalize_dtype(k): float(v) * 1e12 for k, v in entry.get("peak_tflops_sparse", {}).items()},
        memory_bandwidth=float(entry["memory_bandwidth_gbps"]) * 1e9,
        memory_capacity=float(entry["memory_capacity_gib"]) * 2**30,
        host_link_bandwidth=None if link is None else float(link) * 1e9,
        description=entry.get("name", name),
        source=f"{src['title']} {src.get('url', '')}".strip(),
        date=str(src.get("date", "")),
        measured=False,
    )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_hardware(
    name: str = "cpu",
    *,
    matmul_sizes: Sequence[int] = (256, 512, 1024),
    dtypes: Sequence[Any] = ("fp32",),
    stream_nbytes: int = 64 * 2**20,
    repeats: int = 5,
    return_sweep: bool = False,
) -> Hardware | tuple[Hardware, dict[str, dict[int, float]]]:
    """Build a :class:`Hardware` for this machine from measurements.

    ``peak_flops[d]`` is the best :func:`matmul_flops` over ``matmul_sizes`` for each dtype ``d`` in ``dtypes``;
    ``memory_bandwidth`` is :func:`read_bandwidth` over arrays of ``stream_nbytes`` and ``2 * stream_nbytes``
    bytes (a read-dominated stream, the way memory-bound operators use memory); ``memory_capacity`` is the physical
    RAM; ``host_link_bandwidth`` is ``None`` (a CPU has no separate host link). Takes about a second with the
    defaults on a 2-core machine. With ``return_sweep=True`` also returns the sweep ``{dtype: {n: FLOP/s}}``,
    whose best point is the compute ceiling (to plot the sweep under the roofline it defines).
    """
    import torch

    from refimpl.roofline.measure import matmul_flops, read_bandwidth

    if not matmul_sizes:
        raise ValueError("matmul_sizes must name at least one size, got an empty sequence")
    if not dtypes:
        raise ValueError("dtypes must name at least one dtype, got an empty sequence")
    sweep = {normalize_dtype(d): {n: matmul_flops(n, d, repeats=repeats) for n in matmul_sizes} for d in dtypes}
    peaks = {d: max(rates.values()) for d, rates in sweep.items()}
    read_sizes = (stream_nbytes, 2 * stream_nbytes)
    bandwidth = read_bandwidth(read_sizes, repeats=repeats)
    capacity = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    source = (
        f"measured: best matmul over n in {list(matmul_sizes)}, best streaming read (sum, matvec) over "
        f"{list(read_sizes)} B, min of {repeats} runs; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    hardware = Hardware(
        name=name,
        peak_flops=peaks,
        memory_bandwidth=bandwidth,
        memory_capacity=capacity,
        host_link_bandwidth=None,
        description=f"{_cpu_model()} (measured)",
        source=source,
        date=datetime.date.today().isoformat(),
        measured=True,
    )
    return (hardware, sweep) if return_sweep else hardware


_MEASURED: dict[str, Hardware] = {}


def load_hardware(name: str) -> Hardware:
    """Return the :class:`Hardware` called ``name`` (see :func:`list_hardware`).

    Datasheet entries come from :data:`HARDWARE_YAML`. ``"cpu"`` is measured on first use with
    :func:`measure_hardware` (about a second) and cached for the process.
    Raises ``ValueError`` listing the known names for an unknown ``name``.
    """
    table = _read_yaml()
    check_choice("hardware", name, table)
    entry = table[name]
    if entry.get("measured"):
        if name not in _MEASURED:
            _MEASURED[name] = measure_hardware(name=name)
        return _MEASURED[name]
    return _from_entry(name, entry)


def resolve_hardware(hardware: Hardware | str) -> Hardware:
    """Accept a :class:`Hardware` or a name for :func:`load_hardware`; return the :class:`Hardware`."""
    return resolve_named("hardware", hardware, Hardware, load_hardware)
