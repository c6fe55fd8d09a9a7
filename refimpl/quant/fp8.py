"""FP8 quantization (E4M3 and E5M2) through torch's float8 dtypes, with a scale per tensor / channel / token.

An 8-bit float stores a sign, ``E`` exponent bits and ``M`` mantissa bits (Micikevicius et al. 2022, "FP8
Formats for Deep Learning", Table 1): E4M3 (``torch.float8_e4m3fn``: bias 7, no infinities, largest finite
448) for weights and activations, E5M2 (``torch.float8_e5m2``: bias 15, IEEE-like, largest finite 57344) for
gradients. Its grid is relative: spacing ``2^(e - M)`` near ``2^e``, so the relative rounding error is at most
``2^-(M+1)`` for normal numbers, whatever their magnitude.

To use the format's range a tensor is scaled first, ``s = max |X| / FP8_MAX`` (per tensor, per row = output
channel of a weight or token of activations), ``Q(X) = fp8(X / s)`` rounded to nearest even, ``X' = Q(X) s``.
Bytes: one per element plus an fp32 scale per group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from refimpl._checks import check_choice, check_tensor
from refimpl._dtypes import accumulation_dtype

__all__ = ["FP8_FORMATS", "FP8Quantized", "dequantize_fp8", "fake_quantize_fp8", "fp8_grid", "quantize_fp8"]

#: name -> torch dtype
FP8_FORMATS: dict[str, torch.dtype] = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def fp8_grid(fmt: str) -> Tensor:
    """Every finite non-negative value of the format, ascending, in float64 (from its bit patterns)."""
    check_choice("fmt", fmt, FP8_FORMATS)
    values = torch.arange(128, dtype=torch.uint8).view(FP8_FORMATS[fmt]).to(torch.float64)
    return values[torch.isfinite(values)].unique()


@dataclass
class FP8Quantized:
    """``codes: (rows, K)`` in a float8 dtype and ``scale: (n_rows, 1)`` fp32 (``n_rows`` 1 per tensor)."""

    codes: Tensor
    scale: Tensor
    fmt: str
    granularity: str
    dtype: torch.dtype

    def nbytes(self) -> int:
        """One byte per element plus the fp32 scales."""
        return self.codes.numel() + self.scale.numel() * self.scale.element_size()

    def bits_per_element(self) -> float:
        return 8 * self.nbytes() / self.codes.numel()


def quantize_fp8(x: Tensor, fmt: str = "e4m3", granularity: str = "channel") -> FP8Quantized:
    """Quantize ``x: (rows, K)`` to FP8 ``fmt`` ("e4m3" or "e5m2") with an fp32 scale per ``granularity``
    ("tensor", or "channel"/"token": one per row). Raises ``ValueError`` for inf/NaN in ``x``, an empty ``x``
    or an unknown format/granularity."""
    check_tensor("x", x, ndim=2, floating=True)
    check_choice("fmt", fmt, FP8_FORMATS)
    check_choice("granularity", granularity, ("tensor", "channel", "token"))
    if x.numel() == 0:
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x must be finite, got inf or NaN")
    dt = FP8_FORMATS[fmt]
    xc = x.to(accumulation_dtype(x.dtype))
    amax = xc.abs().amax() if granularity == "tensor" else xc.abs().amax(dim=1)  # () or (rows,)
    amax = amax.reshape(-1, 1).float()  # (n_rows, 1)
    scale = torch.where(amax > 0, amax / torch.finfo(dt).max, torch.ones_like(amax))  # s = max|X| / FP8_MAX
    # X / s <= FP8_MAX up to one rounding; clamp so no value rounds past the largest finite number (E4M3 -> NaN).
    scaled = (xc / scale.to(xc.dtype)).clamp(-torch.finfo(dt).max, torch.finfo(dt).max)
    return FP8Quantized(scaled.to(dt), scale, fmt, granularity, x.dtype)


def dequantize_fp8(q: FP8Quantized) -> Tensor:
    """``X' = Q(X) s`` in ``q.dtype``."""
    cdt = accumulation_dtype(q.dtype)
    return (q.codes.to(cdt) * q.scale.to(cdt)).to(q.dtype)


def fake_quantize_fp8(x: Tensor, fmt: str = "e4m3", granularity: str = "channel") -> Tensor:
    """``dequantize_fp8(quantize_fp8(x, ...))``."""
    return dequantize_fp8(quantize_fp8(x, fmt, granularity))
