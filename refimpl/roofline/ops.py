"""Operators as (FLOPs, bytes read, bytes written) and where they sit on the roofline.

Vocabulary of the roofline paper (Williams, Waterman and Patterson 2009):

* **arithmetic intensity** ``I = FLOPs / bytes`` of memory traffic (FLOP/byte);
* **attainable performance** ``P = min(pi, beta * I)`` for peak compute ``pi`` and bandwidth ``beta``;
* **ridge point** ``I* = pi / beta``: left of it an operator is **memory-bound**, right of it **compute-bound**;
* the roofline **time** of an operator is ``FLOPs / P = max(FLOPs / pi, bytes / beta)``.

Byte convention (used by every constructor here and by :mod:`refimpl.roofline.analyzer`): an operator reads each
of its inputs and weights from memory once and writes its output once; nothing stays in cache between
operators, and intermediate values inside one fused operator (e.g. FlashAttention's score tiles) never reach
memory. It is the convention of a well-tiled kernel on a device whose caches are small next to the operands.
FLOP convention: a multiply-add is 2 FLOPs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from refimpl._checks import check_choice, check_float, check_positive_int

__all__ = [
    "KINDS",
    "Operator",
    "OperatorCost",
    "arithmetic_intensity",
    "attainable_performance",
    "bound",
    "elementwise",
    "matmul",
    "operator_cost",
    "ridge_point",
    "roofline_time",
]

KINDS = ("matmul", "attention", "elementwise", "memory")


def arithmetic_intensity(flops: float, nbytes: float) -> float:
    """``I = flops / nbytes`` in FLOP/byte (``inf`` when ``nbytes == 0``: the operator never touches memory)."""
    flops = check_float("flops", flops, min_value=0.0)
    nbytes = check_float("nbytes", nbytes, min_value=0.0)
    if nbytes == 0:
        return math.inf if flops > 0 else 0.0
    return flops / nbytes


def ridge_point(peak_flops: float, memory_bandwidth: float) -> float:
    """``I* = pi / beta`` (FLOP/byte): the intensity at which the memory and compute ceilings meet."""
    peak_flops = check_float("peak_flops", peak_flops, min_value=0.0, min_inclusive=False)
    memory_bandwidth = check_float("memory_bandwidth", memory_bandwidth, min_value=0.0, min_inclusive=False)
    return peak_flops / memory_bandwidth


def attainable_performance(intensity: float, peak_flops: float, memory_bandwidth: float) -> float:
    """``P = min(pi, beta * I)`` in FLOP/s (Williams et al. 2009, eq. 1)."""
    if intensity == math.inf:
        return check_float("peak_flops", peak_flops, min_value=0.0, min_inclusive=False)
    intensity = check_float("intensity", intensity, min_value=0.0)
    ridge = ridge_point(peak_flops, memory_bandwidth)  # validates both ceilings
    return peak_flops if intensity >= ridge else memory_bandwidth * intensity


def roofline_time(flops: float, nbytes: float, peak_flops: float, memory_bandwidth: float) -> float:
    """Seconds ``max(flops / pi, nbytes / beta)``: compute and memory traffic overlap perfectly."""
    flops = check_float("flops", flops, min_value=0.0)
    nbytes = check_float("nbytes", nbytes, min_value=0.0)
    ridge_point(peak_flops, memory_bandwidth)  # validates both ceilings
    return max(flops / peak_flops, nbytes / memory_bandwidth)


def bound(flops: float, nbytes: float, peak_flops: float, memory_bandwidth: float) -> str:
    """``"compute"`` if ``flops / pi >= nbytes / beta`` (intensity at or right of the ridge), else ``"memory"``."""
    flops = check_float("flops", flops, min_value=0.0)
    nbytes = check_float("nbytes", nbytes, min_value=0.0)
    ridge_point(peak_flops, memory_bandwidth)
    # Compare times, not intensities, so that bytes == 0 needs no special case; equality (the ridge) is compute.
    return "compute" if flops * memory_bandwidth >= nbytes * peak_flops and flops > 0 else "memory"


@dataclass(frozen=True)
class Operator:
    """One operator of a model: its work and its memory traffic, per execution.

    Attributes:
        name: e.g. ``"q_proj"``.
        flops: floating-point operations per execution.
        bytes_read: bytes read from memory per execution (inputs, weights, KV cache).
        bytes_written: bytes written to memory per execution (outputs, new KV entries).
        weight_bytes: the part of ``bytes_read`` that is model weights.
        kv_bytes: the part of ``bytes_read + bytes_written`` that is KV cache.
        count: executions per forward pass (``n_layers`` for a per-layer operator).
        kind: one of :data:`KINDS` (``"matmul"``, ``"attention"``, ``"elementwise"``, ``"memory"``).
    """

    name: str
    flops: float
    bytes_read: float
    bytes_written: float
    weight_bytes: float = 0.0
    kv_bytes: float = 0.0
    count: int = 1
    kind: str = "matmul"

    def __post_init__(self) -> None:
        for attr in ("flops", "bytes_read", "bytes_written", "weight_bytes", "kv_bytes"):
            check_float(f"{self.name}.{attr}", getattr(self, attr), min_value=0.0)
        check_positive_int(f"{self.name}.count", self.count)
        check_choice(f"{self.name}.kind", self.kind, KINDS)
        if self.weight_bytes > self.bytes_read:
            raise ValueError(f"{self.name}.weight_bytes must be <= bytes_read, got {self.weight_bytes}")
        if self.kv_bytes + self.weight_bytes > self.bytes:
            raise ValueError(f"{self.name}.kv_bytes + weight_bytes must be <= bytes, got {self.kv_bytes}")

    @property
    def bytes(self) -> float:
        """Total memory traffic per execution: ``bytes_read + bytes_written``."""
        return self.bytes_read + self.bytes_written

    @property
    def activation_bytes(self) -> float:
        """Traffic that is neither weights nor KV cache: the activations this operator reads and writes."""
        return self.bytes - self.weight_bytes - self.kv_bytes

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOP/byte."""
        return arithmetic_intensity(self.flops, self.bytes)


@dataclass(frozen=True)
class OperatorCost:
    """An :class:`Operator` placed on one machine's roofline (per execution unless ``total_`` says otherwise).

    Attributes:
        op: the operator.
        attainable_flops: ``min(pi, beta * I)``, FLOP/s.
        bound: ``"compute"`` or ``"memory"``.
        time: seconds per execution, ``max(flops / pi, bytes / beta)``.
    """

    op: Operator
    attainable_flops: float
    bound: str
    time: float

    @property
    def total_time(self) -> float:
        """Seconds for all ``op.count`` executions."""
        return self.time * self.op.count

    def as_dict(self) -> dict[str, Any]:
        """Flat row for tables: per-execution numbers plus ``count`` and ``total_*`` columns."""
        row = asdict(self.op)
        row.update(
            intensity=self.op.intensity,
            attainable_flops=self.attainable_flops,
            bound=self.bound,
            time=self.time,
            total_flops=self.op.flops * self.op.count,
            total_bytes=self.op.bytes * self.op.count,
            total_time=self.total_time,
        )
        return row


def operator_cost(op: Operator, peak_flops: float, memory_bandwidth: float) -> OperatorCost:
    """Place ``op`` on the roofline with ceilings ``peak_flops`` (FLOP/s) and ``memory_bandwidth`` (B/s)."""
    return OperatorCost(
        op=op,
        attainable_flops=attainable_performance(op.intensity, peak_flops, memory_bandwidth),
        bound=bound(op.flops, op.bytes, peak_flops, memory_bandwidth),
        time=roofline_time(op.flops, op.bytes, peak_flops, memory_bandwidth),
    )


def matmul(
    name: str,
    m: int,
    k: int,
    n: int,
    *,
    act_bytes: float,
    weight_bytes: float,
    count: int = 1,
) -> Operator:
    """``Y = X W`` with ``X: (m, k)`` activations, ``W: (k, n)`` weights, ``Y: (m, n)``.

    FLOPs ``2 m k n``; reads ``m k`` activation elements of ``act_bytes`` bytes and ``k n`` weight elements of
    ``weight_bytes`` bytes (weights may be quantized: 0.5 bytes for 4-bit); writes ``m n`` activation elements.
    With ``m`` tokens, intensity is ``2 m k n / (m k a + k n w + m n a)``: about ``2 m / w`` when ``m << k, n``
    (a GEMV at ``m = 1`` does ~1 FLOP per weight byte at ``w = 2``).
    """
    m, k, n = (check_positive_int(a, v) for a, v in (("m", m), ("k", k), ("n", n)))
    weights = k * n * weight_bytes
    return Operator(
        name=name,
        flops=2.0 * m * k * n,
        bytes_read=m * k * act_bytes + weights,
        bytes_written=m * n * act_bytes,
        weight_bytes=weights,
        count=count,
        kind="matmul",
    )


def elementwise(
    name: str,
    n_elements: int,
    *,
    flops_per_element: float,
    n_inputs: int,
    n_outputs: int = 1,
    act_bytes: float,
    extra_read_bytes: float = 0.0,
    count: int = 1,
) -> Operator:
    """An elementwise (or row-wise, like softmax and RMSNorm) operator over ``n_elements`` elements.

    Reads ``n_inputs`` tensors and writes ``n_outputs`` tensors of ``n_elements`` elements each;
    ``extra_read_bytes`` adds small parameters read once (e.g. a norm's weight vector, counted as weights).
    """
    n_elements = check_positive_int("n_elements", n_elements)
    return Operator(
        name=name,
        flops=float(flops_per_element) * n_elements,
        bytes_read=n_inputs * n_elements * act_bytes + extra_read_bytes,
        bytes_written=n_outputs * n_elements * act_bytes,
        weight_bytes=extra_read_bytes,
        count=count,
        kind="elementwise",
    )
