"""Uniform integer quantization: symmetric and asymmetric, per tensor / channel / token / group, real packing.

A group of numbers ``X`` is stored as ``B``-bit integer codes plus statistics (Dettmers et al. 2022 sec. 2;
Liu et al. 2024 sec. 3.1):

* **asymmetric** (zero point ``z`` and scale ``s``):
  ``z = min X, s = (max X - min X) / (2^B - 1), Q(X) = round((X - z) / s), X' = Q(X) s + z``;
* **symmetric** (absmax, scale only): ``s = max |X| / (2^(B-1) - 1), Q(X) = round(X / s)`` in
  ``[-(2^(B-1) - 1), 2^(B-1) - 1]``, ``X' = Q(X) s``. Codes are stored offset by ``2^(B-1)`` so they are
  unsigned ``B``-bit integers like the asymmetric ones.

Either way every element is within ``s / 2`` of its reconstruction. Statistics are stored in ``stat_dtype``
(fp16 by default); ``z`` is rounded down and ``s`` up on conversion so the grid still covers the group and
the ``s / 2`` bound holds with the *stored* statistics. An asymmetric constant group gets ``s = 0`` when its
value is exact in ``stat_dtype`` (and a symmetric all-zero group always does): all codes are equal and the
group is reconstructed exactly.

Granularity, for a matrix ``x: (rows, K)`` whose last dimension is the one a matrix product reduces over (a
weight stored ``(out, in)``, or activations ``(tokens, in)``):

* ``"tensor"``: one group for the whole matrix;
* ``"channel"`` / ``"token"``: one group per row (an output channel of a weight, a token of activations);
* ``"group"``: groups of ``group_size`` consecutive elements of a row (GPTQ's and AWQ's ``g128``); with
  ``partial_group=True`` the last group of a row may be shorter (column ``j`` in group ``j // group_size``,
  as GPTQ's code assigns ``g_idx``), for widths such as SmolLM2's 576 that 128 does not divide.

Codes are packed ``8 / B`` to a byte (four 2-bit or two 4-bit codes), code ``i`` of a byte in bits
``[B i, B i + B)``; :func:`unpack_codes` inverts :func:`pack_codes` exactly. :meth:`IntQuantized.nbytes`
counts the packed codes, the scales and the zero points.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from refimpl._checks import check_choice, check_positive_int, check_tensor
from refimpl._dtypes import accumulation_dtype

__all__ = [
    "BITS",
    "GRANULARITIES",
    "IntQuantized",
    "codes_on_grid",
    "dequantize_groups",
    "dequantize_int",
    "fake_quantize_int",
    "group_size_for",
    "group_statistics",
    "pack_codes",
    "pack_on_grid",
    "quantize_groups",
    "quantize_int",
    "unpack_codes",
]

BITS = (2, 4, 8)  # supported code widths: each divides 8, so codes pack into whole bytes
GRANULARITIES = ("tensor", "channel", "token", "group")


def _round_toward(x: Tensor, dtype: torch.dtype, up: bool) -> Tensor:
    """``x`` converted to ``dtype``, rounded down (``up=False``) or up so the result bounds ``x``."""
    y = x.to(dtype)
    if torch.finfo(dtype).bits >= torch.finfo(x.dtype).bits:
        return y  # exact conversion
    back = y.to(x.dtype)
    wrong = back < x if up else back > x
    step = torch.full_like(y, float("inf") if up else float("-inf"))
    return torch.where(wrong, torch.nextafter(y, step), y)


def _stat_dtype(stat_dtype: torch.dtype | None, x: Tensor) -> torch.dtype:
    sdt = x.dtype if stat_dtype is None else stat_dtype
    if not (isinstance(sdt, torch.dtype) and sdt.is_floating_point):
        raise TypeError(f"stat_dtype must be a floating-point torch.dtype or None, got {stat_dtype!r}")
    return sdt


def group_statistics(
    x: Tensor, bits: int, stat_dtype: torch.dtype | None = torch.float16, symmetric: bool = False
) -> tuple[Tensor, Tensor]:
    """The grid of each group along the last dimension of ``x: (..., G)``: ``scale, zero: (...)`` in
    ``stat_dtype`` (``None``: the dtype of ``x``); ``zero`` is all zeros when ``symmetric``. Raises
    ``ValueError`` if a statistic is not finite (``x`` holds inf/NaN or exceeds the range of ``stat_dtype``)."""
    check_tensor("x", x, floating=True)
    check_choice("bits", bits, BITS)
    if x.dim() == 0:
        raise ValueError(f"x must have at least one dimension (the group), got shape {tuple(x.shape)}")
    sdt = _stat_dtype(stat_dtype, x)
    xc = x.to(accumulation_dtype(x.dtype))
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = _round_toward(xc.abs().amax(dim=-1) / qmax, sdt, up=True)  # s >= max|X| / qmax
        zero = torch.zeros_like(scale)
    else:
        lo, hi = torch.aminmax(xc, dim=-1)  # (...,) the group's range
        zero = _round_toward(lo, sdt, up=False)  # z <= min X
        scale = _round_toward((hi - zero.to(xc.dtype)) / (2**bits - 1), sdt, up=True)  # z + (2^B - 1) s >= max X
    # An inf/NaN anywhere in the group, or a range beyond stat_dtype, makes the scale non-finite.
    if not bool(torch.isfinite(scale).all()):
        raise ValueError(f"x must be finite and within the range of stat_dtype={sdt}; got a non-finite range")
    return scale, zero


def codes_on_grid(x: Tensor, scale: Tensor, zero: Tensor, bits: int, symmetric: bool = False) -> Tensor:
    """Round ``x: (..., G)`` onto the grid ``scale, zero: (...)``: uint8 codes ``(..., G)``, clamped to the
    ``bits``-bit range (``Q(X) = round((X - z) / s)``; symmetric codes offset by ``2^(bits-1)``)."""
    cdt = accumulation_dtype(x.dtype)
    xc = x.to(cdt)
    s, z = scale.to(cdt).unsqueeze(-1), zero.to(cdt).unsqueeze(-1)
    s_safe = torch.where(s > 0, s, torch.ones_like(s))  # constant group: s = 0, every code is equal
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        q = (xc / s_safe).round_().clamp_(-qmax, qmax)  # Q(X) in [-qmax, qmax]
        return (q + 2 ** (bits - 1)).to(torch.uint8)
    return ((xc - z) / s_safe).round_().clamp_(0, 2**bits - 1).to(torch.uint8)


def quantize_groups(
    x: Tensor, bits: int, stat_dtype: torch.dtype | None = torch.float16, symmetric: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize each group along the last dimension of ``x: (..., G)`` to ``bits``-bit codes.

    Returns ``codes: (..., G)`` (uint8 in ``[0, 2^bits - 1]``, unpacked), ``scale: (...)`` and
    ``zero: (...)`` in ``stat_dtype`` (``None``: the dtype of ``x``). Asymmetric (default, KIVI sec. 3.1):
    ``X' = codes * scale + zero``. Symmetric (absmax, LLM.int8() sec. 2): ``zero`` is all zeros and
    ``X' = (codes - 2^(bits-1)) * scale``. Guarantees ``|x - X'| <= scale / 2`` up to the rounding of the
    compute dtype (fp32, or fp64 for fp64 inputs). Raises ``ValueError`` if a statistic is not finite
    (``x`` holds inf/NaN or exceeds the range of ``stat_dtype``).
    """
    scale, zero = group_statistics(x, bits, stat_dtype, symmetric)
    return codes_on_grid(x, scale, zero, bits, symmetric), scale, zero


def dequantize_groups(
    codes: Tensor, scale: Tensor, zero: Tensor, dtype: torch.dtype = torch.float32, offset: int = 0
) -> Tensor:
    """Reconstruct ``X' = (Q(X) - offset) * s + z`` from ``codes: (..., G)``, ``scale, zero: (...)``.

    ``offset`` is ``2^(bits-1)`` for symmetric codes, 0 for asymmetric ones (KIVI sec. 3.1). The product is
    taken in fp32 (fp64 if ``dtype`` is fp64) and returned in ``dtype``.
    """
    cdt = accumulation_dtype(dtype)
    q = codes.to(cdt) - offset if offset else codes.to(cdt)
    out = torch.addcmul(zero.to(cdt).unsqueeze(-1), q, scale.to(cdt).unsqueeze(-1))  # z + Q s
    return out.to(dtype)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack ``codes: (..., n)`` (uint8, each ``< 2^bits``) into ``(..., n * bits / 8)`` bytes.

    Code ``i`` of each run of ``8 / bits`` codes goes to bits ``[bits * i, bits * i + bits)`` of one byte.
    ``n`` must be a multiple of ``8 / bits``; raises ``ValueError`` otherwise or if a code does not fit.
    """
    check_tensor("codes", codes, dtypes=[torch.uint8])
    check_choice("bits", bits, BITS)
    per = 8 // bits  # codes per byte
    n = codes.shape[-1] if codes.dim() else 0
    if codes.dim() == 0 or n % per:
        raise ValueError(f"codes' last dimension must be a multiple of {per} for {bits}-bit packing, got {n}")
    if codes.numel() and int(codes.max()) >= 2**bits:
        raise ValueError(f"codes must be < 2**bits = {2**bits}, got a code {int(codes.max())}")
    if bits == 8:
        return codes.clone()
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits  # (per,)
    runs = codes.reshape(*codes.shape[:-1], n // per, per).to(torch.int32)  # (..., n/per, per)
    return (runs << shifts).sum(dim=-1).to(torch.uint8)  # disjoint bit fields: sum == bitwise or


def unpack_codes(packed: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`pack_codes`: ``(..., m)`` bytes -> ``(..., m * 8 / bits)`` uint8 codes."""
    check_tensor("packed", packed, dtypes=[torch.uint8])
    check_choice("bits", bits, BITS)
    if packed.dim() == 0:
        raise ValueError("packed must have at least one dimension")
    if bits == 8:
        return packed.clone()
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.uint8) * bits  # (per,)
    codes = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)  # (..., m, per)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per)


@dataclass
class IntQuantized:
    """A matrix ``(rows, K)`` quantized to ``bits``-bit integers at some granularity.

    ``codes: (n_rows, n_full, G * bits / 8)`` packed bytes of the groups of ``G = group_size``;
    ``scale: (n_rows, n_groups)`` and, for asymmetric quantization, ``zero`` of the same shape (``None`` when
    symmetric: nothing stored). ``n_rows`` is 1 per tensor, ``rows`` otherwise; ``n_groups`` is ``K / G`` per
    group, else 1. With a partial last group (``K % G = r > 0``, GPTQ's ``column // G`` convention),
    ``n_full = K // G``, ``n_groups = n_full + 1`` and ``tail: (n_rows, 1, r * bits / 8)`` holds the last,
    shorter group's codes; ``tail`` is ``None`` otherwise.
    """

    codes: Tensor
    scale: Tensor
    zero: Tensor | None
    bits: int
    granularity: str
    group_size: int
    shape: tuple[int, int]
    dtype: torch.dtype
    tail: Tensor | None = None

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    def nbytes(self) -> int:
        """Bytes stored: packed codes (the tail's included) plus scales plus zero points (if asymmetric)."""
        held = [self.codes, self.scale] + [t for t in (self.zero, self.tail) if t is not None]
        return sum(t.numel() * t.element_size() for t in held)

    def bits_per_element(self) -> float:
        """``8 * nbytes() / (rows * K)``: the true bits per number, statistics included."""
        return 8 * self.nbytes() / (self.shape[0] * self.shape[1])


def _grouped(x: Tensor, granularity: str, group_size: int) -> list[Tensor]:
    """``x: (rows, K)`` as its groups: ``[(n_rows, n_full, G)]``, plus ``(rows, 1, r)`` for a partial last
    group of ``r = K % G`` columns."""
    rows, k = x.shape
    if granularity == "tensor":
        return [x.reshape(1, 1, rows * k)]  # (1, 1, rows K)
    if granularity in ("channel", "token"):
        return [x.reshape(rows, 1, k)]  # (rows, 1, K)
    full = k - k % group_size
    pieces = [x[:, :full].reshape(rows, full // group_size, group_size)]  # (rows, K // G, G)
    return pieces + ([x[:, full:].reshape(rows, 1, k - full)] if full < k else [])  # (rows, 1, r)


def group_size_for(
    k: int,
    rows: int,
    bits: int,
    granularity: str,
    group_size: int,
    partial_group: bool = False,
    k_name: str = "K = x.shape[1]",
) -> int:
    """The group size ``G`` that ``granularity`` implies for ``x: (rows, K)`` (``rows * K`` per tensor, ``K``
    per channel or token), after checking that ``G`` divides ``K`` (or ``partial_group``) and that a group,
    and the partial one, packs into whole bytes (``k_name`` names ``K`` in the messages). Raises
    ``ValueError`` naming the argument otherwise."""
    check_choice("bits", bits, BITS)
    check_choice("granularity", granularity, GRANULARITIES)
    if granularity == "group":
        group_size = check_positive_int("group_size", group_size)
        if k % group_size and not partial_group:
            raise ValueError(
                f"group_size must divide {k_name} = {k}, got group_size={group_size} "
                f"(partial_group=True keeps a shorter last group of {k % group_size}, GPTQ's convention)"
            )
        if group_size > k:
            raise ValueError(f"group_size must be at most {k_name} = {k}, got group_size={group_size}")
        sizes = [group_size] + ([k % group_size] if k % group_size else [])
    else:
        group_size = rows * k if granularity == "tensor" else k
        sizes = [group_size]
    for g in sizes:
        if g * bits % 8:
            raise ValueError(
                f"a group of {g} {bits}-bit codes does not pack into whole bytes "
                f"(group_size * bits, and (K % group_size) * bits, must be multiples of 8)"
            )
    return group_size


def pack_on_grid(
    x: Tensor,
    scale: Tensor,
    zero: Tensor,
    bits: int,
    granularity: str,
    group_size: int,
    symmetric: bool,
    dtype: torch.dtype | None = None,
) -> IntQuantized:
    """Round ``x: (rows, K)`` onto the grids ``scale, zero: (n_rows, n_groups)`` (already computed, e.g. by
    GPTQ) and pack the codes into an :class:`IntQuantized` that reconstructs in ``dtype`` (``None``: that of
    ``x``); ``group_size`` as :func:`group_size_for` returns."""
    pieces = _grouped(x, granularity, group_size)
    packed, start = [], 0
    for piece in pieces:
        n = piece.shape[1]
        s, z = scale[:, start : start + n], zero[:, start : start + n]
        packed.append(pack_codes(codes_on_grid(piece, s, z, bits, symmetric), bits))
        start += n
    return IntQuantized(
        codes=packed[0],
        scale=scale,
        zero=None if symmetric else zero,
        bits=bits,
        granularity=granularity,
        group_size=group_size,
        shape=(x.shape[0], x.shape[1]),
        dtype=x.dtype if dtype is None else dtype,
        tail=packed[1] if len(packed) > 1 else None,
    )


def quantize_int(
    x: Tensor,
    bits: int,
    granularity: str = "group",
    group_size: int = 128,
    symmetric: bool = True,
    stat_dtype: torch.dtype | None = torch.float16,
    partial_group: bool = False,
) -> IntQuantized:
    """Quantize ``x: (rows, K)`` to ``bits``-bit integers per tensor / channel / token / group.

    ``granularity="group"`` uses groups of ``group_size`` along ``K`` (ignored otherwise); ``group_size``
    must divide ``K`` unless ``partial_group=True``, which keeps a shorter last group of ``K % group_size``
    columns with its own statistics (column ``j`` in group ``j // group_size``, GPTQ's and AutoGPTQ's
    convention), its bytes counted in :meth:`IntQuantized.nbytes`. Symmetric (absmax) by default, as in
    LLM.int8() and GPTQ's symmetric mode; ``symmetric=False`` adds a zero point per group (KIVI, GPTQ's
    default). Raises ``ValueError`` naming the argument for unsupported ``bits``, a ``group_size`` that does
    not divide ``K`` (without ``partial_group``), a group that does not pack into whole bytes, or inf/NaN in
    ``x``.
    """
    check_tensor("x", x, ndim=2, floating=True)
    rows, k = x.shape
    if rows == 0 or k == 0:
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}")
    group_size = group_size_for(k, rows, bits, granularity, group_size, partial_group)
    stats = [group_statistics(piece, bits, stat_dtype, symmetric) for piece in _grouped(x, granularity, group_size)]
    scale, zero = (torch.cat(t, dim=1) for t in zip(*stats, strict=True))  # (n_rows, n_groups)
    return pack_on_grid(x, scale, zero, bits, granularity, group_size, symmetric)


def dequantize_int(q: IntQuantized) -> Tensor:
    """Reconstruct the ``(rows, K)`` matrix (in ``q.dtype``) from an :class:`IntQuantized`."""
    zero = torch.zeros_like(q.scale) if q.zero is None else q.zero
    offset = 2 ** (q.bits - 1) if q.zero is None else 0
    n_full = q.codes.shape[1]
    out = [dequantize_groups(unpack_codes(q.codes, q.bits), q.scale[:, :n_full], zero[:, :n_full], q.dtype, offset)]
    if q.tail is not None:
        out.append(
            dequantize_groups(unpack_codes(q.tail, q.bits), q.scale[:, n_full:], zero[:, n_full:], q.dtype, offset)
        )
    return torch.cat([o.reshape(q.shape[0], -1) for o in out], dim=1)  # (rows, K): groups are row-major


def fake_quantize_int(x: Tensor, bits: int, *args: Any, **kwargs: Any) -> Tensor:
    """``dequantize_int(quantize_int(x, bits, ...))`` (the same arguments): ``x: (rows, K)`` with its
    quantization error applied."""
    return dequantize_int(quantize_int(x, bits, *args, **kwargs))
