"""llama.cpp's block formats Q8_0, Q4_0 and Q4_1, byte for byte (ggml's ``quantize_row_q*_ref``).

GGUF files store a weight row in blocks of ``QK = 32`` numbers; each block is one fp16 scale ``d`` (and, for
Q4_1, one fp16 minimum ``m``) followed by the codes (ggml ``ggml-common.h``: ``block_q8_0``, ``block_q4_0``,
``block_q4_1``; reference quantizers in ``ggml-quants.c``). They are the integer grids of
:mod:`refimpl.quant.integer` (Q8_0 symmetric 8-bit, Q4_1 asymmetric 4-bit, groups of 32) with ggml's own
arithmetic, which this module follows exactly so that its bytes equal llama.cpp's and ``gguf-py``'s:

* **Q8_0**: ``d = max|x| / 127``, ``q = roundf(x * (1/d))`` (ties away from zero) in int8; ``x' = q d``.
* **Q4_0**: ``d = x_max / -8`` with ``x_max`` the *signed* value of largest magnitude (the first one on a tie),
  ``q = min(15, trunc(x * (1/d) + 8.5))``; ``x' = (q - 8) d``. The extreme lands exactly on code 0 (-8), so
  16 levels are used, and ``+ 8.5`` then truncation rounds ties *up* (toward +inf).
* **Q4_1**: ``d = (max x - min x) / 15``, ``m = min x``, ``q = min(15, trunc((x - m) * (1/d) + 0.5))``;
  ``x' = q d + m``.

Where ggml differs from ``quantize_int``: the codes are computed in fp32 with the *reciprocal* of the
unrounded fp32 scale (``1/d = 0`` for an all-zero block) and only then is ``d`` stored as fp16 (round to
nearest even), so the reconstruction error can exceed ``d / 2`` by the fp16 rounding of ``d``;
``quantize_int`` rounds its stored scale up and codes against it, which keeps the ``s / 2`` bound exact.
Byte layout (little-endian): ``d`` (2 bytes) [, ``m`` (2 bytes)], then the codes; a 4-bit byte ``j`` holds
element ``j`` in its low nibble and element ``j + 16`` in its high nibble (not consecutive pairs as in
:func:`~refimpl.quant.integer.pack_codes`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from refimpl._checks import check_choice, check_tensor

__all__ = ["GGML_FORMATS", "QK", "dequantize_ggml", "ggml_bits_per_weight", "quantize_ggml"]

QK = 32  # numbers per block (ggml's QK8_0 = QK4_0 = QK4_1)
GGML_FORMATS = {"q8_0": 2 + QK, "q4_0": 2 + QK // 2, "q4_1": 4 + QK // 2}  # format -> bytes per block


def ggml_bits_per_weight(fmt: str) -> float:
    """Bits per number of a format, statistics included: 8.5 (Q8_0), 4.5 (Q4_0), 5.0 (Q4_1)."""
    check_choice("fmt", fmt, GGML_FORMATS)
    return 8 * GGML_FORMATS[fmt] / QK


def _round_half_away(v: Tensor) -> Tensor:
    """C's ``roundf``: to nearest, ties away from zero (``a - floor(a)`` is exact in fp32)."""
    a = v.abs()
    fl = a.floor()
    return torch.where(a - fl >= 0.5, fl + 1, fl).copysign(v)


def _reciprocal(d: Tensor) -> Tensor:
    """``id = d ? 1/d : 0`` (ggml), fp32."""
    return torch.where(d == 0, torch.zeros_like(d), 1 / torch.where(d == 0, torch.ones_like(d), d))


def _f16_bytes(v: Tensor) -> Tensor:
    """``(n, 1)`` fp32 -> ``(n, 2)`` bytes of its fp16 rounding (GGML_FP32_TO_FP16, little-endian)."""
    h = v.to(torch.float16)
    if not bool(torch.isfinite(h).all()):
        raise ValueError("x is too large for the fp16 statistics of the format (a scale or minimum overflows)")
    return h.view(torch.uint8)


def _nibbles(q: Tensor) -> Tensor:
    """``(n, 32)`` codes in ``[0, 15]`` -> ``(n, 16)`` bytes: low nibble element ``j``, high nibble ``j + 16``."""
    q = q.to(torch.uint8)
    return q[:, : QK // 2] | (q[:, QK // 2 :] << 4)


def quantize_ggml(x: Tensor, fmt: str) -> Tensor:
    """Quantize ``x: (..., K)`` to ggml blocks of ``fmt`` (``"q8_0"``, ``"q4_0"``, ``"q4_1"``), ``K % 32 == 0``.

    Returns uint8 ``(..., K / 32 * bytes_per_block)``: the bytes a GGUF file stores for the rows of ``x``,
    equal to ``gguf.quants.quantize`` and to llama.cpp's reference quantizers. ``x`` is read in fp32 (as
    ggml does). Raises ``ValueError`` naming the argument for an unknown format, a last dimension that is not
    a multiple of 32, inf/NaN, or a statistic that overflows fp16.
    """
    check_tensor("x", x, floating=True)
    check_choice("fmt", fmt, GGML_FORMATS)
    if x.dim() == 0 or x.shape[-1] % QK:
        raise ValueError(f"x's last dimension must be a multiple of {QK}, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x must be finite, got inf or NaN")
    lead, k = x.shape[:-1], x.shape[-1]
    blocks = x.detach().to(torch.float32).reshape(-1, QK)  # (n, 32)
    if fmt == "q8_0":
        d = blocks.abs().amax(1, keepdim=True) / 127  # (n, 1)
        q = _round_half_away(blocks * _reciprocal(d)).to(torch.int8).view(torch.uint8)
        out = torch.cat([_f16_bytes(d), q], 1)
    elif fmt == "q4_0":
        imax = blocks.abs().argmax(1, keepdim=True)  # first index of the largest magnitude
        d = blocks.gather(1, imax) / -8  # the signed extreme maps to code 0, i.e. -8
        q = (blocks * _reciprocal(d) + 8.5).trunc().clamp(0, 15)
        out = torch.cat([_f16_bytes(d), _nibbles(q)], 1)
    else:  # q4_1
        lo, hi = torch.aminmax(blocks, dim=1, keepdim=True)
        d = (hi - lo) / 15
        q = ((blocks - lo) * _reciprocal(d) + 0.5).trunc().clamp(0, 15)
        out = torch.cat([_f16_bytes(d), _f16_bytes(lo), _nibbles(q)], 1)
    return out.reshape(*lead, k // QK * GGML_FORMATS[fmt])


def dequantize_ggml(data: Tensor, fmt: str, dtype: torch.dtype = torch.float32) -> Tensor:
    """Reconstruct ``(..., K)`` from ggml blocks ``data: (..., K / 32 * bytes_per_block)`` (uint8) of ``fmt``:
    ``x' = q d`` (Q8_0), ``(q - 8) d`` (Q4_0), ``q d + m`` (Q4_1), in fp32, returned in ``dtype``."""
    check_tensor("data", data, dtypes=[torch.uint8])
    check_choice("fmt", fmt, GGML_FORMATS)
    size = GGML_FORMATS[fmt]
    if data.dim() == 0 or data.shape[-1] % size:
        raise ValueError(f"data's last dimension must be a multiple of {size} bytes for {fmt}, got {tuple(data.shape)}")
    lead, nb = data.shape[:-1], data.shape[-1] // size
    blocks = data.reshape(-1, size)
    d = blocks[:, :2].contiguous().view(torch.float16).float()  # (n, 1)
    if fmt == "q8_0":
        x = blocks[:, 2:].contiguous().view(torch.int8).float() * d
    else:
        qs = blocks[:, -QK // 2 :]
        q = torch.cat([qs & 0x0F, qs >> 4], 1).float()  # (n, 32): elements j and j + 16
        if fmt == "q4_0":
            x = (q - 8) * d
        else:
            x = q * d + blocks[:, 2:4].contiguous().view(torch.float16).float()
    return x.reshape(*lead, nb * QK).to(dtype)
