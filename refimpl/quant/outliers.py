"""Outlier handling for activation quantization: LLM.int8()'s decomposition and SmoothQuant's migration.

Activations of LLMs have a few feature dimensions (input channels of a linear layer) with magnitudes far above
the rest, in most tokens. A per-token int8 scale is set by them, and the ordinary channels lose their bits.

* **LLM.int8()** (Dettmers et al. 2022, sec. 3.2, eq. 3): split the input channels. The set
  ``O = {j : max_t |X_tj| >= alpha}`` (threshold ``alpha = 6``) is multiplied in 16-bit; the rest with
  vector-wise int8 quantization, one absmax scale per row of ``X`` (token) and per column of ``W`` (output):
  ``X W = X_O W_O + S_X^-1 S_W^-1 (C_X C_W)`` with ``C`` the int8 codes and the int32 product exact.
* **SmoothQuant** (Xiao et al. 2023, eq. 4): divide each input channel by ``s_j`` and multiply the matching row
  of the weight by it, ``X W = (X diag(s)^-1)(diag(s) W)``, with ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``.
  The product is unchanged in exact arithmetic; the activation outliers shrink and the weights absorb them.
  ``alpha = 0.5`` balances the two (the paper's default); the division folds into the preceding RMSNorm.
"""

from __future__ import annotations

import torch
from torch import Tensor

from refimpl._checks import check_float, check_tensor
from refimpl.quant.integer import quantize_int, unpack_codes

__all__ = ["int8_matmul", "llm_int8_matmul", "outlier_channels", "smoothquant_scales"]


def outlier_channels(x: Tensor, threshold: float = 6.0) -> Tensor:
    """Boolean mask ``(K,)`` of the input channels of ``x: (T, K)`` with some ``|X_tj| >= threshold``."""
    check_tensor("x", x, ndim=2, floating=True)
    threshold = check_float("threshold", threshold, min_value=0.0, min_inclusive=False)
    return (x.abs() >= threshold).any(dim=0)


def int8_matmul(x: Tensor, w: Tensor) -> Tensor:
    """Vector-wise int8 ``X W`` (LLM.int8() sec. 3.1): ``x: (T, K)`` per-token absmax, ``w: (K, N)``
    per-output-column absmax; the code product ``C_X C_W`` is exact (accumulated in float64, as an int32
    accumulator would), then scaled back by the outer product of the scales. Returns ``(T, N)`` in ``x.dtype``."""
    check_tensor("x", x, ndim=2, floating=True)
    check_tensor("w", w, ndim=2, floating=True)
    if x.shape[1] != w.shape[0]:
        raise ValueError(f"x: (T, K) and w: (K, N) must share K, got {tuple(x.shape)} and {tuple(w.shape)}")
    qx = quantize_int(x, 8, "token", stat_dtype=None)
    qw = quantize_int(w.t(), 8, "channel", stat_dtype=None)  # rows of W^T = output columns of W
    cx = unpack_codes(qx.codes, 8).reshape(x.shape).double() - 128  # signed codes in [-127, 127]
    cw = unpack_codes(qw.codes, 8).reshape(w.shape[1], w.shape[0]).double() - 128
    acc = cx @ cw.t()  # (T, N), exact integers
    return (acc * qx.scale.double() * qw.scale.double().t()).to(x.dtype)  # scale rows by s_X, columns by s_W


def llm_int8_matmul(x: Tensor, w: Tensor, threshold: float = 6.0) -> Tensor:
    """LLM.int8()'s mixed-precision decomposition (eq. 3): ``x: (T, K) @ w: (K, N)`` with the outlier input
    channels (:func:`outlier_channels`) in full precision and the rest in vector-wise int8."""
    check_tensor("w", w, ndim=2, floating=True)
    mask = outlier_channels(x, threshold)  # (K,)
    if x.shape[1] != w.shape[0]:
        raise ValueError(f"x: (T, K) and w: (K, N) must share K, got {tuple(x.shape)} and {tuple(w.shape)}")
    out = x[:, mask] @ w[mask]  # X_O W_O in full precision
    if bool((~mask).any()):
        out = out + int8_matmul(x[:, ~mask], w[~mask])
    return out


def smoothquant_scales(act_absmax: Tensor, w_absmax: Tensor, alpha: float = 0.5) -> Tensor:
    """SmoothQuant's per-channel smoothing factors (eq. 4): ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``.

    ``act_absmax: (K,)`` the calibration maximum of each input channel, ``w_absmax: (K,)`` the maximum of each
    weight row (over the output columns of every layer that reads this input). Channels where either is 0 get
    ``s_j = 1``. Raises ``ValueError`` for ``alpha`` outside ``[0, 1]`` or negative/non-finite statistics.
    """
    alpha = check_float("alpha", alpha, min_value=0.0, max_value=1.0)
    for name, t in (("act_absmax", act_absmax), ("w_absmax", w_absmax)):
        check_tensor(name, t, ndim=1, floating=True)
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise ValueError(f"{name} must be finite and non-negative")
    if act_absmax.shape != w_absmax.shape:
        raise ValueError(f"act_absmax and w_absmax must have one shape, got {act_absmax.shape} and {w_absmax.shape}")
    a, w = act_absmax.double(), w_absmax.double()
    s = a.pow(alpha) / w.pow(1 - alpha)
    return torch.where((a > 0) & (w > 0), s, torch.ones_like(s)).to(act_absmax.dtype)
