"""GPTQ: error-compensating rounding of a weight matrix with a calibration Hessian (Frantar et al., ICLR 2023).

A linear layer ``W: (d_row, d_col)`` (output rows, input columns; the book stores weights ``(in, out)`` so it
passes ``W^T``) reads calibration inputs ``X: (d_col, N)``. GPTQ minimizes the layer's output error
``||W X - Q X||_2^2`` (eq. 1) one column at a time: quantize column ``j`` to ``q``, then move the remaining
columns to absorb its error, the Optimal Brain Surgeon update (eq. 2-3) with ``H = 2 X X^T``:

    delta_F = - (w_j - q_j) / [H_F^-1]_jj * (H_F^-1)_{j,:},      H_{-j}^-1 = H^-1 - H^-1_{:,j} H^-1_{j,:} / [H^-1]_jj

GPTQ's three changes (sec. 3-4, Algorithm 1): every row uses the same column order (so ``H^-1`` is shared);
the updates are applied lazily, ``B`` columns at a time, with the rest of the matrix updated once per block;
and the rows ``(H_F^-1)_{j,:} / sqrt([H_F^-1]_jj)`` of all the sequentially reduced inverses are exactly the
rows of the upper Cholesky factor ``U`` of ``H^-1``, so no inverse is ever updated: the column error is
``E_j = (w_j - q_j) / U_jj`` and the update ``W_{:, j:} -= E_j U_{j, j:}``. A damping ``lambda = damp *
mean(diag H)`` is added to ``H`` (the authors' ``percdamp = 0.01``).

Groups (sec. 5, "groupsize"): a group's scale and zero point are computed from the group's *current*
(already updated) columns when the algorithm reaches its first column, as in the authors' code.
"""

from __future__ import annotations

import torch
from torch import Tensor

from refimpl._checks import check_choice, check_float, check_positive_int, check_tensor
from refimpl._dtypes import accumulation_dtype
from refimpl.quant.integer import BITS, IntQuantized, group_size_for, group_statistics, pack_on_grid

__all__ = ["gptq", "gptq_hessian"]


def gptq_hessian(x: Tensor) -> Tensor:
    """``H = 2 X X^T`` (GPTQ eq. 1's Hessian) from calibration inputs ``x: (N, d_col)`` (tokens as rows), fp64."""
    check_tensor("x", x, ndim=2, floating=True)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x must be finite, got inf or NaN")
    xd = x.double()
    return 2 * xd.t() @ xd  # (d_col, d_col)


def gptq(
    w: Tensor,
    hessian: Tensor,
    bits: int = 4,
    group_size: int | None = 128,
    symmetric: bool = False,
    block_size: int = 128,
    damp: float = 0.01,
    stat_dtype: torch.dtype | None = torch.float16,
    partial_group: bool = False,
) -> IntQuantized | list[IntQuantized]:
    """Quantize ``w: (d_row, d_col)`` with GPTQ (Algorithm 1) given ``hessian: (d_col, d_col)``.

    A batch ``w: (L, d_row, d_col)``, ``hessian: (L, d_col, d_col)`` (e.g. one matrix of every layer) runs
    the same column loop for all ``L`` at once and returns a list. ``group_size=None``: one grid per row (per
    channel), from the original weights; else groups of ``group_size`` columns (``block_size`` must be a
    multiple or a divisor of it, so that a group starts where its columns are up to date);
    ``partial_group=True`` lets the last group be shorter when
    ``group_size`` does not divide ``d_col`` (column ``j`` in group ``j // group_size``, the authors'
    ``g_idx``). Returns the packed :class:`~refimpl.quant.integer.IntQuantized` (granularity "channel" or
    "group") of ``w``. Dead inputs (``H_jj = 0``) get zero weight, as in the authors' code. Raises
    ``ValueError`` naming the argument for bad shapes, bits, group or block sizes, a negative ``damp`` or a
    non-finite Hessian.
    """
    check_tensor("w", w, ndim=(2, 3), floating=True)
    check_tensor("hessian", hessian, ndim=w.dim(), floating=True)
    check_choice("bits", bits, BITS)
    *lead, rows, n = w.shape
    if hessian.shape != (*lead, n, n):
        raise ValueError(
            f"hessian must be (d_col, d_col) = ({n}, {n}) per matrix for w of shape {tuple(w.shape)}, "
            f"got {tuple(hessian.shape)}"
        )
    if not bool(torch.isfinite(hessian).all()) or not bool(torch.isfinite(w).all()):
        raise ValueError("w and hessian must be finite, got inf or NaN")
    block_size = check_positive_int("block_size", block_size)
    damp = check_float("damp", damp, min_value=0.0)
    granularity = "channel" if group_size is None else "group"
    g = group_size_for(n, rows, bits, granularity, group_size or n, partial_group, k_name="d_col = w.shape[-1]")
    if group_size is not None and block_size % g and g % block_size:
        raise ValueError(f"block_size must be a multiple or a divisor of group_size = {g}, got {block_size}")

    cdt = accumulation_dtype(w.dtype)
    W = w.to(cdt).reshape(-1, rows, n).clone()  # (L, d_row, d_col), updated in place
    H = hessian.to(cdt).reshape(-1, n, n).clone()
    eye = torch.eye(n, dtype=H.dtype)
    dead = torch.diagonal(H, dim1=1, dim2=2) == 0  # (L, d_col)
    H = torch.where(dead[:, :, None] & dead[:, None, :] & eye.bool(), torch.ones_like(H), H)
    W = W.masked_fill(dead[:, None, :], 0)
    H = H + damp * torch.diagonal(H, dim1=1, dim2=2).mean(-1)[:, None, None] * eye
    # H^-1 = U^T U, factored in the weights' compute dtype (fp32 for fp32 weights, as the authors' code)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    n_groups = -(-n // g)  # the last one shorter with partial_group
    batch = W.shape[0]
    scale = torch.empty(batch, rows, n_groups, dtype=stat_dtype or w.dtype)
    zero = torch.zeros_like(scale)
    if group_size is None:  # per channel: the grid of the original row
        scale[..., 0], zero[..., 0] = group_statistics(W, bits, stat_dtype, symmetric)
    qmin, qmax = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    # Columns as rows, (L, d_col, d_row), so that column j and the columns after it are contiguous memory.
    Wt = W.transpose(1, 2).contiguous()
    Qt = torch.empty_like(Wt)  # the quantized weights, column by column
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = Wt[:, i1:i2].clone()  # (L, B, d_row): the block, updated column by column
        E1 = torch.zeros_like(W1)
        U1 = U[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if j % g == 0:  # a new group: its grid from its current columns (per channel: set above)
                if group_size is not None:
                    # a group inside the block: its current columns are in W1; a group of several blocks
                    # starts at a block start, where the lazy updates have brought all later columns up to date
                    cols = W1[:, i : i + g] if block_size % g == 0 else Wt[:, j : j + g]
                    scale[..., j // g], zero[..., j // g] = group_statistics(
                        cols.transpose(1, 2), bits, stat_dtype, symmetric
                    )
                s, z = scale[..., j // g].to(cdt), zero[..., j // g].to(cdt)  # (L, d_row)
                s_safe = torch.where(s > 0, s, torch.ones_like(s))
            # q_j = quant(w_j) on the group's grid (as refimpl.quant.integer.codes_on_grid)
            q = ((W1[:, i] - z) / s_safe).round_().clamp_(qmin, qmax).mul_(s).add_(z)  # (L, d_row)
            Qt[:, j] = q
            err = (W1[:, i] - q) / U1[:, i, i, None]  # E_j = (w_j - q_j) / U_jj
            W1[:, i:] -= U1[:, i, i:, None] * err[:, None, :]  # W_{:, j:} -= E_j U_{j, j:} inside the block
            E1[:, i] = err
        Wt[:, i2:] -= U[:, i1:i2, i2:].transpose(1, 2) @ E1  # the lazy batch update of all later columns
    Q = Qt.transpose(1, 2)  # (L, d_row, d_col)
    # Q is on each group's grid, so rounding it again gives its codes exactly
    out = [pack_on_grid(Q[b], scale[b], zero[b], bits, granularity, g, symmetric, w.dtype) for b in range(batch)]
    return out if lead else out[0]
