"""OliVe: outlier-victim pair quantization (Guo et al., ISCA 2023), 4 bits per number, aligned to memory.

Outliers are rare but large; clipping them hurts, and storing them apart (LLM.int8(), sparse outlier lists)
breaks the regular memory layout. OliVe keeps every number in 4 bits by pairing *adjacent* numbers
``(x_2i, x_2i+1)``: when one of them is an outlier, its neighbour, the *victim*, is pruned to 0 and its slot
holds an identifier, and the outlier is stored in its own slot in a wider-range 4-bit float (sec. 3-4):

* normal values: symmetric int4 ``q s``, ``q`` in ``[-7, 7]``, stored as ``q + 8`` (1..15); the unused
  code of int4's ``-8`` (stored 0) is the victim identifier;
* outliers (``|x| > 7.5 s``): "abfloat" E2M1 with a bias, ``+-(1 + m/2) 2^(e + bias) s``; ``bias = 3`` places
  the smallest, ``8 s``, just past the normal range. The code is a sign bit and a 3-bit index 1..7 (index 0
  would make ``-0`` collide with the identifier), so 7 magnitudes ``8 s .. 64 s``;
* a pair of two outliers keeps the larger and prunes the other.

The normal scale ``s`` is searched per row (output channel) to minimize the squared error, as the paper does
for its scale factor. Stored: 4 bits per number plus an fp16 scale per row.
"""

from __future__ import annotations

import torch
from torch import Tensor

from refimpl._checks import check_tensor
from refimpl._dtypes import accumulation_dtype
from refimpl.quant.integer import pack_codes, unpack_codes

__all__ = ["ABFLOAT_BIAS", "abfloat_values", "olive_decode", "olive_encode", "olive_fake_quantize"]

ABFLOAT_BIAS = 3
IDENTIFIER = 0  # the stored code of int4's -8 (normal codes are offset by 8): marks the victim


def abfloat_values() -> Tensor:
    """The outlier magnitudes in units of ``s`` by 3-bit index: ``[0 (unused), 8, 12, 16, 24, 32, 48, 64]``;
    index ``i >= 1`` is ``(1 + m/2) 2^(e + bias)`` with ``(e, m) = divmod(i - 1, 2)``."""
    e, m = (torch.arange(7) >> 1), (torch.arange(7) & 1)
    return torch.cat([torch.zeros(1), (1 + m / 2) * torch.exp2(e + ABFLOAT_BIAS)]).double()


def _encode_with_scale(x: Tensor, s: Tensor) -> Tensor:
    """4-bit codes ``(rows, K)`` of ``x: (rows, K)`` (fp32 or fp64) for row scales ``s: (rows, 1)``."""
    rows, k = x.shape
    y = (x / s).view(rows, k // 2, 2)  # pairs, in units of s
    mag = y.abs()
    outlier = mag > 7.5  # beyond the reach of int4 rounding
    pair_has = outlier.any(-1, keepdim=True)  # (rows, K/2, 1)
    keep = torch.zeros_like(outlier)
    keep.scatter_(-1, mag.argmax(-1, keepdim=True), True)  # the larger of the pair is the one kept
    normal = (y.round().clamp(-7, 7) + 8).to(torch.uint8)  # int4 codes offset by 8: 1..15
    ab = abfloat_values()[1:]
    mid = (ab[1:] + ab[:-1]) / 2  # round to the nearest abfloat magnitude (saturating at the ends)
    idx = (torch.bucketize(mag.contiguous(), mid.to(mag.dtype)) + 1).to(torch.uint8)  # 1..7
    sign = (y < 0).to(torch.uint8) << 3
    outlier_code = sign | idx  # 1 sign bit, then the 3-bit abfloat index (e, m)
    pair_code = torch.where(keep, outlier_code, torch.full_like(normal, IDENTIFIER))
    codes = torch.where(pair_has, pair_code, normal)
    return codes.view(rows, k)


def olive_decode(codes: Tensor, scale: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Numbers ``(rows, K)`` in ``dtype`` from 4-bit ``codes: (rows, K)`` (unpacked) and ``scale: (rows, 1)``:
    a pair holding the identifier is (abfloat outlier, 0), any other pair two int4 numbers. Exact in fp32 as
    well: small integers and abfloat magnitudes times an fp16 scale."""
    rows, k = codes.shape
    c = codes.view(rows, k // 2, 2).long()
    victim = c == IDENTIFIER
    pair_has = victim.any(-1, keepdim=True)
    normal = (c - 8).to(dtype)
    out_mag = abfloat_values().to(dtype)[c & 7]
    out_val = torch.where((c >> 3) == 1, -out_mag, out_mag)
    vals = torch.where(pair_has, torch.where(victim, torch.zeros_like(out_val), out_val), normal)
    return vals.view(rows, k) * scale.to(dtype)


def _row_error(x: Tensor, s: Tensor) -> Tensor:
    """``||olive_decode(_encode_with_scale(x, s), s) - x||^2`` per row without building the codes: a pair
    without an outlier costs its int4 rounding errors; a pair with one costs the abfloat rounding of its
    larger number and the pruned smaller one (in units of ``s``, times ``s^2``)."""
    rows, k = x.shape
    mag = (x / s).abs().view(rows, k // 2, 2)  # pairs, in units of s
    hi, lo = mag.amax(-1), mag.amin(-1)  # (rows, K/2)
    d = (mag.round().clamp(max=7) - mag).square()  # |round(y)| = round(|y|): rounding is symmetric
    normal = d[..., 0] + d[..., 1]
    ab = abfloat_values()[1:].to(mag.dtype)
    kept = ab[torch.bucketize(hi, (ab[1:] + ab[:-1]) / 2)]  # the nearest abfloat magnitude, saturating
    pair_err = torch.where(hi > 7.5, (kept - hi).square() + lo.square(), normal)
    return pair_err.sum(1) * s[:, 0].square()


def olive_encode(x: Tensor, n_candidates: int = 32) -> tuple[Tensor, Tensor]:
    """Encode ``x: (rows, K)`` (``K`` even): packed 4-bit codes ``(rows, K/2)`` and fp16 row scales
    ``(rows, 1)``. The scale of each row is the best of ``n_candidates`` values ``max|x| / (7 c)``,
    ``c`` log-spaced in ``[1, 12]`` (no clipping down to an outlier range 12x the normal one), by squared
    error. Raises ``ValueError`` for odd ``K``, an empty or non-finite ``x``."""
    check_tensor("x", x, ndim=2, floating=True)
    rows, k = x.shape
    if k % 2 or k == 0 or rows == 0:
        raise ValueError(f"x must have an even, non-zero number of columns (pairs), got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x must be finite, got inf or NaN")
    xc = x.to(accumulation_dtype(x.dtype))  # fp32 for fp32 x, fp64 for fp64
    amax = x.double().abs().amax(1, keepdim=True)
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    best_s, best_err = None, None
    for c in torch.logspace(0, torch.log10(torch.tensor(12.0)), n_candidates, dtype=torch.float64):
        s = (amax / (7 * c)).half().double()  # candidates as they will be stored (fp16)
        err = _row_error(xc, s.to(xc.dtype))  # the search in the compute dtype (fp32 for fp32 x)
        if best_err is None:
            best_s, best_err = s, err
        else:
            better = (err < best_err)[:, None]
            best_s = torch.where(better, s, best_s)
            best_err = torch.minimum(err, best_err)
    codes = _encode_with_scale(xc, best_s.to(xc.dtype))
    return pack_codes(codes, 4), best_s.half()


def olive_fake_quantize(x: Tensor, n_candidates: int = 32) -> Tensor:
    """``x: (rows, K)`` through OliVe's 4-bit encoding and back (same dtype)."""
    packed, scale = olive_encode(x, n_candidates)
    return olive_decode(unpack_codes(packed, 4), scale, accumulation_dtype(x.dtype)).to(x.dtype)
