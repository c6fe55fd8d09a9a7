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
``[B i, B i + B)``; :func:`unpack_codes` inverts :func:`pack_codes` exactly. These group primitives live in
:mod:`refimpl.quant.integer` (shared with weight and activation quantization); this module arranges a
``(B, H, T, D)`` cache tensor into KIVI's groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from refimpl._checks import check_choice, check_positive_int, check_tensor
from refimpl.quant.integer import BITS, dequantize_groups, pack_codes, quantize_groups, unpack_codes

__all__ = [
    "AXES",
    "BITS",
    "QuantizedTensor",
    "check_packing",
    "dequantize",
    "dequantize_groups",
    "fake_quantize",
    "pack_codes",
    "quantize",
    "quantize_groups",
    "unpack_codes",
]

AXES = ("channel", "token")  # per-channel groups (along tokens) or per-token groups (along channels)


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


def check_packing(bits: int, group_size: int) -> int:
    """Check the options every quantized KV store shares: ``bits`` in :data:`BITS` and a ``group_size`` whose
    ``G * bits`` codes pack into whole bytes; return ``group_size``. Raises ``ValueError`` naming the argument."""
    check_choice("bits", bits, BITS)
    group_size = check_positive_int("group_size", group_size)
    if group_size * bits % 8:
        raise ValueError(f"group_size * bits must be a multiple of 8 to pack codes, got {group_size} * {bits}")
    return group_size


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
    group_size = check_packing(bits, group_size)
    check_choice("axis", axis, AXES)
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
