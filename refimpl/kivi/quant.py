"""Asymmetric uniform quantization in groups, and real bit packing (KIVI, Liu et al. 2024, section 3.1).

A group of numbers ``X`` (here: ``G`` consecutive elements of a key or value tensor) is stored as ``B``-bit
integer codes plus two statistics, a zero point ``z`` and a scale ``s`` (KIVI sec. 3.1):

    z = min X,    s = (max X - min X) / (2^B - 1),    Q(X) = round((X - z) / s),    X' = Q(X) * s + z.

Every element is then within ``s / 2`` of its reconstruction. *Asymmetric* means ``z`` shifts the grid onto
``[min X, max X]``, so no level is wasted when a group is all positive or all negative.

Two groupings of a ``(B, H, T, D)`` tensor (batch, heads, tokens, channels) give the two axes of KIVI:

* ``axis="channel"`` (per-channel, KIVI's keys): a group is ``G`` consecutive *tokens* of one channel, so an
  outlier channel gets its own scale and does not blow up the error of the others;
* ``axis="token"`` (per-token, KIVI's values): a group is ``G`` consecutive *channels* of one token.

Statistics are stored in ``stat_dtype`` (fp16 by default, as in KIVI). To keep the ``s / 2`` bound with the
*stored* statistics, ``z`` is rounded down and ``s`` up when converting to ``stat_dtype`` (so the grid still
covers ``[min X, max X]``). A constant group (``max X == min X``) gets ``s = 0`` when ``min X`` is exact in
``stat_dtype``: all codes are 0 and it is reconstructed exactly, without a division by zero.

Codes are packed ``8 / B`` to a byte (four 2-bit or two 4-bit codes), code ``i`` of a byte in bits
``[B i, B i + B)``; :func:`unpack_codes` inverts :func:`pack_codes` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from refimpl._checks import check_choice, check_positive_int, check_tensor
from refimpl._dtypes import accumulation_dtype

__all__ = [
    "AXES",
    "BITS",
    "QuantizedTensor",
    "dequantize",
    "dequantize_groups",
    "fake_quantize",
    "pack_codes",
    "quantize",
    "quantize_groups",
    "unpack_codes",
]

BITS = (2, 4, 8)  # supported code widths: each divides 8, so codes pack into whole bytes
AXES = ("channel", "token")  # per-channel groups (along tokens) or per-token groups (along channels)


def _round_toward(x: Tensor, dtype: torch.dtype, up: bool) -> Tensor:
    """``x`` converted to ``dtype``, rounded down (``up=False``) or up so the result bounds ``x``."""
    y = x.to(dtype)
    if torch.finfo(dtype).bits >= torch.finfo(x.dtype).bits:
        return y  # exact conversion
    back = y.to(x.dtype)
    wrong = back < x if up else back > x
    step = torch.full_like(y, float("inf") if up else float("-inf"))
    return torch.where(wrong, torch.nextafter(y, step), y)


def quantize_groups(
    x: Tensor, bits: int, stat_dtype: torch.dtype | None = torch.float16
) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize each group along the last dimension of ``x: (..., G)`` to ``bits``-bit codes (KIVI sec. 3.1).

    Returns ``codes: (..., G)`` (uint8 in ``[0, 2^bits - 1]``, unpacked), ``scale: (...)`` and
    ``zero: (...)`` in ``stat_dtype`` (``None``: the dtype of ``x``). Guarantees
    ``|x - (codes * scale + zero)| <= scale / 2`` up to the rounding of the compute dtype (fp32, or fp64 for
    fp64 inputs). Raises ``ValueError`` if a statistic is not finite (``x`` holds inf/NaN or exceeds the range
    of ``stat_dtype``).
    """
    check_tensor("x", x, floating=True)
    check_choice("bits", bits, BITS)
    if x.dim() == 0:
        raise ValueError(f"x must have at least one dimension (the group), got shape {tuple(x.shape)}")
    sdt = x.dtype if stat_dtype is None else stat_dtype
    if not (isinstance(sdt, torch.dtype) and sdt.is_floating_point):
        raise TypeError(f"stat_dtype must be a floating-point torch.dtype or None, got {stat_dtype!r}")
    cdt = accumulation_dtype(x.dtype)  # fp16/bf16 quantized in fp32, as a GPU kernel would in registers
    levels = 2**bits - 1
    xc = x.to(cdt)
    lo, hi = torch.aminmax(xc, dim=-1)  # (...,) the group's range
    zero = _round_toward(lo, sdt, up=False)  # z <= min X
    scale = _round_toward((hi - zero.to(cdt)) / levels, sdt, up=True)  # z + (2^B - 1) s >= max X
    # An inf/NaN anywhere in the group, or a range beyond stat_dtype, makes the scale non-finite.
    if not bool(torch.isfinite(scale).all()):
        raise ValueError(f"x must be finite and within the range of stat_dtype={sdt}; got a non-finite range")
    s, z = scale.to(cdt).unsqueeze(-1), zero.to(cdt).unsqueeze(-1)
    s_safe = torch.where(s > 0, s, torch.ones_like(s))  # constant group: s = 0, every code is 0
    codes = ((xc - z) / s_safe).round_().clamp_(0, levels).to(torch.uint8)  # Q(X)
    return codes, scale, zero


def dequantize_groups(codes: Tensor, scale: Tensor, zero: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Reconstruct ``X' = Q(X) * s + z`` (KIVI sec. 3.1) from ``codes: (..., G)``, ``scale, zero: (...)``.

    The product is taken in fp32 (fp64 if ``dtype`` is fp64) and returned in ``dtype``.
    """
    cdt = accumulation_dtype(dtype)
    out = torch.addcmul(zero.to(cdt).unsqueeze(-1), codes.to(cdt), scale.to(cdt).unsqueeze(-1))  # z + Q s
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
class QuantizedTensor:
    """A ``(B, H, T, D)`` tensor quantized in groups of ``group_size`` along ``axis``.

    ``axis="token"``: ``codes: (B, H, T, D/G, G*bits/8)``, ``scale, zero: (B, H, T, D/G)``.
    ``axis="channel"``: ``codes: (B, H, T/G, D, G*bits/8)``, ``scale, zero: (B, H, T/G, D)``.
    ``dtype`` is the dtype :func:`dequantize` returns (that of the original tensor).
    """

    codes: Tensor
    scale: Tensor
    zero: Tensor
    bits: int
    group_size: int
    axis: str
    dtype: torch.dtype

    @property
    def n_tokens(self) -> int:
        """``T``, the number of tokens represented."""
        t = self.codes.shape[2]
        return t * self.group_size if self.axis == "channel" else t

    def nbytes(self) -> int:
        """Bytes held: packed codes plus scales and zero points."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))


def quantize(
    x: Tensor,
    bits: int,
    group_size: int,
    axis: str,
    stat_dtype: torch.dtype | None = torch.float16,
) -> QuantizedTensor:
    """Quantize ``x: (B, H, T, D)`` per channel or per token in groups of ``G = group_size`` (KIVI sec. 3.1).

    ``axis="channel"``: groups of ``G`` tokens of one channel (requires ``T % G == 0``);
    ``axis="token"``: groups of ``G`` channels of one token (requires ``D % G == 0``).
    ``G * bits`` must be a multiple of 8 so a group packs into whole bytes. Raises ``ValueError`` naming the
    argument on any violated requirement.
    """
    check_tensor("x", x, ndim=4, floating=True)
    check_choice("bits", bits, BITS)
    group_size = check_positive_int("group_size", group_size)
    check_choice("axis", axis, AXES)
    if group_size * bits % 8:
        raise ValueError(f"group_size * bits must be a multiple of 8 to pack, got group_size={group_size}")
    b, h, t, d = x.shape
    g = group_size
    if axis == "token":
        if d % g:
            raise ValueError(f"per-token groups need D % group_size == 0, got D={d}, group_size={g}")
        groups = x.reshape(b, h, t, d // g, g)  # (B, H, T, D/G, G)
    else:
        if t % g:
            raise ValueError(f"per-channel groups need T % group_size == 0, got T={t}, group_size={g}")
        groups = x.reshape(b, h, t // g, g, d).transpose(-1, -2)  # (B, H, T/G, D, G)
    codes, scale, zero = quantize_groups(groups, bits, stat_dtype)
    return QuantizedTensor(pack_codes(codes, bits), scale, zero, bits, g, axis, x.dtype)


def dequantize(q: QuantizedTensor) -> Tensor:
    """Reconstruct the ``(B, H, T, D)`` tensor (in ``q.dtype``) from a :class:`QuantizedTensor`."""
    groups = dequantize_groups(unpack_codes(q.codes, q.bits), q.scale, q.zero, q.dtype)
    b, h = groups.shape[:2]
    if q.axis == "token":
        return groups.reshape(b, h, groups.shape[2], -1)  # (B, H, T, D/G, G) -> (B, H, T, D)
    return groups.transpose(-1, -2).reshape(b, h, -1, groups.shape[3])  # (B, H, T/G, G, D) -> (B, H, T, D)


def fake_quantize(
    x: Tensor, bits: int, group_size: int, axis: str, stat_dtype: torch.dtype | None = torch.float16
) -> Tensor:
    """``dequantize(quantize(x, ...))``: ``x: (B, H, T, D)`` with its quantization error applied."""
    return dequantize(quantize(x, bits, group_size, axis, stat_dtype))
