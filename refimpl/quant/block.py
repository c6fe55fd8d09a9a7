"""Block formats: block floating point (BFP) and OCP Microscaling (MX), and channel reordering.

Both store a block of ``k`` consecutive numbers with one shared power-of-two scale ``2^e`` (an 8-bit
exponent, E8M0) and a narrow element per number:

* **BFP** (e.g. BFP12 of Trukhanov & Soloveychik 2024: 8-bit shared exponent, 4-bit elements): the
  elements are signed integers of ``m`` bits, ``x' = q 2^e`` with ``q`` in ``[-(2^(m-1) - 1), 2^(m-1) - 1]``;
  ``e`` is the smallest exponent with ``max |x| <= (2^(m-1) - 1) 2^e``, so nothing is clipped. This is
  symmetric integer quantization (:mod:`refimpl.quant.integer`) with the scale rounded up to a power of two.
* **MX** (OCP Microscaling Formats v1.0, sec. 6.3; Rouhani et al. 2023): ``k = 32``, the shared scale is
  ``X = 2^(floor(log2 max|x|) - emax_elem)`` with ``emax_elem`` the largest exponent of the element format,
  and each ``x / X`` is rounded to the element format (FP4 E2M1, FP8 E4M3), *saturating* at its largest
  value (MXFP4 can clip the block maximum: ``x / X`` lies in ``[4, 8)`` and E2M1 stops at 6).

An outlier forces a large scale on its whole block. "Accurate Block Quantization in LLMs with Outliers"
(Trukhanov & Soloveychik 2024) permutes the channels so that outlier channels share blocks (sorted by
magnitude, their K-sort); a permutation folds into the adjacent weights like any orthogonal matrix, so the
float model is unchanged. :func:`channel_order` computes the order from calibration statistics.
"""

from __future__ import annotations

import torch
from torch import Tensor

from refimpl._checks import check_choice, check_positive_int, check_tensor
from refimpl._dtypes import accumulation_dtype

__all__ = ["ELEMENTS", "block_bits_per_element", "block_fake_quantize", "channel_order", "fp4_e2m1_grid"]

#: element formats: "intM" for BFP with M-bit signed integers, and MX's FP4 (E2M1) and FP8 (E4M3)
ELEMENTS = ("int4", "int6", "int8", "fp4_e2m1", "fp8_e4m3")
_EMAX = {"fp4_e2m1": 2, "fp8_e4m3": 8}  # largest exponent of the element format (OCP MX spec, Table 1)
SCALE_BITS = 8  # E8M0 shared exponent


def fp4_e2m1_grid() -> Tensor:
    """The non-negative FP4 E2M1 values (OCP MX spec sec. 5.3.3): 0, 0.5, 1, 1.5, 2, 3, 4, 6 (float64)."""
    return torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def _round_to_e2m1(y: Tensor) -> Tensor:
    """Round ``y`` to the nearest FP4 E2M1 value, ties to even mantissa, saturating at 6: in binade
    ``[2^e, 2^(e+1))`` (``e`` in 0..2; below 1 the subnormal step) E2M1 has the step ``2^(e-1)``, so this is
    round-half-even of ``|y| / 2^(e-1)`` (the values of :func:`fp4_e2m1_grid`)."""
    a = y.abs().clamp(max=6.0)
    e = torch.frexp(a.clamp(min=1.0)).exponent - 1  # floor(log2 max(a, 1)), exact
    step = torch.ldexp(torch.ones_like(a), (e - 1).to(torch.int32))  # 2^(e-1)
    return (a / step).round() * step * y.sign()  # torch.round: half to even


def block_fake_quantize(x: Tensor, block_size: int = 32, element: str = "int4") -> Tensor:
    """Quantize and dequantize ``x: (rows, K)`` in blocks of ``block_size`` along ``K`` (BFP or MX).

    Raises ``ValueError`` for a block size that does not divide ``K``, an unknown element format, or
    inf/NaN in ``x``. Computes in fp32 (fp64 for fp64 ``x``; exact for these grids) and returns ``x.dtype``.
    """
    check_tensor("x", x, ndim=2, floating=True)
    block_size = check_positive_int("block_size", block_size)
    check_choice("element", element, ELEMENTS)
    rows, k = x.shape
    if k % block_size:
        raise ValueError(f"block_size must divide K = x.shape[1] = {k}, got {block_size}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x must be finite, got inf or NaN")
    # The shared scales in float64 (exact powers of two), the elements in the compute dtype: dividing by a power
    # of two and rounding to these grids is exact in fp32 as well, so the result does not depend on it.
    cdt = accumulation_dtype(x.dtype)
    b = x.to(cdt).reshape(rows, k // block_size, block_size)  # (rows, blocks, k)
    amax = b.abs().amax(-1, keepdim=True).double()
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    if element.startswith("int"):  # BFP: smallest 2^e with amax <= qmax 2^e
        qmax = 2 ** (int(element[3:]) - 1) - 1
        scale = torch.exp2(torch.ceil(torch.log2(safe / qmax))).to(cdt)
        out = (b / scale).round().clamp(-qmax, qmax) * scale
    else:  # MX: X = 2^(floor(log2 amax) - emax_elem), saturating element rounding
        scale = torch.exp2(torch.floor(torch.log2(safe)) - _EMAX[element]).to(cdt)
        y = b / scale
        if element == "fp4_e2m1":
            q = _round_to_e2m1(y)
        else:
            fmax = torch.finfo(torch.float8_e4m3fn).max
            q = y.clamp(-fmax, fmax).to(torch.float8_e4m3fn).to(cdt)
        out = q * scale
    out = torch.where(amax > 0, out, torch.zeros_like(out))
    return out.reshape(rows, k).to(x.dtype)


def block_bits_per_element(block_size: int, element: str) -> float:
    """Bits stored per number: the element's bits plus the 8-bit shared exponent over ``block_size``."""
    block_size = check_positive_int("block_size", block_size)
    check_choice("element", element, ELEMENTS)
    bits = {"fp4_e2m1": 4, "fp8_e4m3": 8}.get(element) or int(element[3:])
    return bits + SCALE_BITS / block_size


def channel_order(magnitude: Tensor) -> Tensor:
    """The channel permutation that sorts ``magnitude: (K,)`` (e.g. the calibration RMS of each channel, as
    their K-sort sorts by row norms) in descending order, so the largest channels share the first blocks.
    Returns a LongTensor ``perm``: quantize ``x[:, perm]``, and undo with ``argsort(perm)``."""
    check_tensor("magnitude", magnitude, ndim=1, floating=True)
    return torch.argsort(magnitude, descending=True, stable=True)
