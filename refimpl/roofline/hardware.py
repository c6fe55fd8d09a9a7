"""Hardware ceilings for the roofline model: peak FLOP/s per dtype, memory bandwidth, capacity, host link.

The roofline model (Williams, Waterman and Patterson 2009, "Roofline: an insightful visual performance model")
bounds a kernel of arithmetic intensity ``I`` (FLOP per byte of memory traffic) on a machine with peak compute
``pi`` (FLOP/s) and memory bandwidth ``beta`` (B/s) by the attainable performance

    P(I) = min(pi, beta * I)                                                       (Williams et al. 2009, eq. 1)

The two ceilings meet at the ridge point ``I* = pi / beta``: a kernel left of it is memory-bound, right of it
compute-bound. This module holds the ceilings. Datasheet entries live in ``refimpl/data/hardware.yaml`` (package
data, read with :mod:`importlib.resources`) with their source and date; the entry ``"cpu"`` is measured on the
machine that runs the code (:mod:`refimpl.roofline.measure`).

Units are SI everywhere in code: FLOP/s, bytes/s, bytes. Dense and 2:4-sparse peaks are kept apart: only
``peak_flops`` (dense) is a ceiling used by the analyzer; ``peak_flops_sparse`` is there to be labelled honestly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from refimpl._checks import check_choice, check_float, resolve_named

__all__ = [
    "DTYPE_BITS",
    "HARDWARE_YAML",
    "Hardware",
    "dtype_bits",
    "list_hardware",
    "load_hardware",
    "normalize_dtype",
    "resolve_hardware",
]

#: The datasheet entries, shipped inside the package (a :class:`~importlib.resources.abc.Traversable`).
HARDWARE_YAML = resources.files("refimpl") / "data" / "hardware.yaml"

#: Storage size of one element, in bits. tf32 is stored as fp32 (it only changes the Tensor Core arithmetic).
DTYPE_BITS: dict[str, float] = {
    "fp64": 64,
    "fp32": 32,
    "tf32": 32,
    "bf16": 16,
    "fp16": 16,
    "fp8": 8,
    "int8": 8,
    "int4": 4,
}

# Other spellings readers use (torch names, numpy names) -> the canonical short name.
_ALIASES: dict[str, str] = {
    "float64": "fp64",
    "double": "fp64",
    "float32": "fp32",
    "float": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "float8_e4m3fn": "fp8",
    "float8_e5m2": "fp8",
    "e4m3": "fp8",
    "e5m2": "fp8",
}


def normalize_dtype(dtype: Any) -> str:
    """Return the canonical dtype name (``"fp16"``, ``"bf16"``, ``"fp32"``, ...) for a name or ``torch.dtype``.

    Accepts ``"fp16"``, ``"float16"``, ``"half"``, ``torch.float16`` and the like. Raises ``ValueError`` listing
    the known names for anything else.
    """
    name = str(dtype).removeprefix("torch.").lower() if not isinstance(dtype, str) else dtype.lower()
    name = _ALIASES.get(name, name)
    return check_choice("dtype", name, DTYPE_BITS)


def dtype_bits(dtype: Any) -> float:
    """Bits per stored element of ``dtype`` (see :data:`DTYPE_BITS`)."""
    return DTYPE_BITS[normalize_dtype(dtype)]


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


_MEASURED: dict[str, Hardware] = {}


def load_hardware(name: str) -> Hardware:
    """Return the :class:`Hardware` called ``name`` (see :func:`list_hardware`).

    Datasheet entries come from :data:`HARDWARE_YAML`. ``"cpu"`` is measured on first use with
    :func:`refimpl.roofline.measure.measure_hardware` (about a second) and cached for the process.
    Raises ``ValueError`` listing the known names for an unknown ``name``.
    """
    table = _read_yaml()
    check_choice("hardware", name, table)
    entry = table[name]
    if entry.get("measured"):
        if name not in _MEASURED:
            from refimpl.roofline.measure import measure_hardware

            _MEASURED[name] = measure_hardware(name=name)
        return _MEASURED[name]
    return _from_entry(name, entry)


def resolve_hardware(hardware: Hardware | str) -> Hardware:
    """Accept a :class:`Hardware` or a name for :func:`load_hardware`; return the :class:`Hardware`."""
    return resolve_named("hardware", hardware, Hardware, load_hardware)
