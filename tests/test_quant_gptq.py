"""Tests of refimpl.quant.gptq: Algorithm 1 (lazy blocks, Cholesky rows) equals a straightforward float64
implementation of the sequential OBS update with an explicitly downdated inverse Hessian; GPTQ beats
round-to-nearest on the calibration objective; bad inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.quant import dequantize_int, fake_quantize_int, gptq, gptq_hessian, unpack_codes


def _data(rows: int, cols: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    # correlated inputs with a few large channels, as in an LLM layer
    x = (
        torch.randn(tokens, cols, generator=g, dtype=torch.float64)
        @ torch.randn(cols, cols, generator=g, dtype=torch.float64)
        * 0.3
    )
    x[:, 0] *= 10
    return w, x


def _reference(
    w: torch.Tensor, h: torch.Tensor, bits: int, g: int | None, symmetric: bool, damp: float
) -> torch.Tensor:
    """The paper's eq. 2-3, column by column, in float64: quantize w_j, spread its error over the remaining
    columns with H_F^-1, then remove j from the inverse Hessian explicitly (no Cholesky, no blocks)."""
    W = w.clone()
    n = W.shape[1]
    H = h.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diag(H).mean() * torch.eye(n, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    qmax = 2 ** (bits - 1) - 1
    grid = None
    for j in range(n):
        if (g is None and j == 0) or (g is not None and j % g == 0):
            block = W[:, j : j + (n if g is None else g)]
            if symmetric:
                s = block.abs().amax(1) / qmax
                grid = (s, torch.zeros_like(s))
            else:
                lo, hi = block.amin(1), block.amax(1)
                grid = ((hi - lo) / (2**bits - 1), lo)
        s, z = grid
        if symmetric:
            q = (W[:, j] / s).round().clamp(-qmax, qmax) * s
        else:
            q = ((W[:, j] - z) / s).round().clamp(0, 2**bits - 1) * s + z
        Q[:, j] = q
        err = (W[:, j] - q) / Hinv[j, j]
        W[:, j:] -= err[:, None] * Hinv[j, j:][None, :]  # delta_F (eq. 2)
        Hinv = Hinv - Hinv[:, j : j + 1] @ Hinv[j : j + 1, :] / Hinv[j, j]  # H_{-j}^-1 (eq. 3)
    return Q


@settings(max_examples=12, deadline=None)
@given(
    bits=st.sampled_from((2, 4, 8)),
    group=st.sampled_from((None, 8, 16)),
    blocks=st.integers(1, 3),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gptq_equals_sequential_reference(
    bits: int, group: int | None, blocks: int, symmetric: bool, seed: int
) -> None:
    w, x = _data(6, 32, 64, seed)
    h = gptq_hessian(x)
    block = (group or 8) * blocks if blocks < 3 else (group or 8) // 2  # blocks of several groups, or half a group
    q = gptq(w, h, bits, group, symmetric, block_size=block, damp=0.01, stat_dtype=None)
    torch.testing.assert_close(dequantize_int(q), _reference(w, h, bits, group, symmetric, 0.01), rtol=0, atol=1e-9)


@pytest.mark.parametrize("symmetric", (True, False))
@pytest.mark.parametrize(("cols", "group", "block"), [(40, 16, 16), (40, 16, 32), (24, 16, 128), (40, 16, 8)])
def test_gptq_partial_last_group_equals_sequential_reference(
    cols: int, group: int, block: int, symmetric: bool
) -> None:
    """A last group of ``cols % group`` columns (the authors' ``g_idx = j // groupsize``) gets its own grid."""
    w, x = _data(6, cols, 64, cols + block)
    h = gptq_hessian(x)
    q = gptq(w, h, 4, group, symmetric, block_size=block, stat_dtype=None, partial_group=True)
    torch.testing.assert_close(dequantize_int(q), _reference(w, h, 4, group, symmetric, 0.01), rtol=0, atol=1e-9)
    assert q.scale.shape == (6, -(-cols // group)) and q.tail is not None
    assert q.nbytes() == 6 * cols // 2 + 6 * -(-cols // group) * 8 * (1 if symmetric else 2), "fp64 statistics"
    with pytest.raises(ValueError, match="partial_group=True"):
        gptq(w, h, 4, group, symmetric, block_size=block)


def test_gptq_beats_rtn_on_the_calibration_objective() -> None:
    w, x = _data(16, 64, 256, 7)
    for bits, group in ((4, 16), (4, None), (2, 16)):
        q = dequantize_int(gptq(w, gptq_hessian(x), bits, group, block_size=32))
        rtn = fake_quantize_int(w, bits, "group" if group else "channel", group or 64, symmetric=False)
        err_gptq = ((x @ (w - q).t()) ** 2).sum()
        err_rtn = ((x @ (w - rtn).t()) ** 2).sum()
        assert err_gptq < 0.8 * err_rtn, (bits, group, float(err_gptq / err_rtn))


def test_gptq_codes_are_packed_and_dead_inputs_zeroed() -> None:
    w, x = _data(4, 16, 32, 1)
    x[:, 5] = 0  # a dead input channel: H_55 = 0
    q = gptq(w, gptq_hessian(x), 4, 8, block_size=8)
    assert q.codes.shape == (4, 2, 4) and q.nbytes() == 4 * 16 // 2 + 2 * 4 * 2 * 2
    assert unpack_codes(q.codes, 4).max() < 16
    assert float(dequantize_int(q)[:, 5].abs().max()) <= float(q.scale.abs().max()) / 2 + 1e-9, "w_5 -> 0"


def test_gptq_bad_inputs() -> None:
    w, x = _data(4, 16, 32, 2)
    h = gptq_hessian(x)
    with pytest.raises(ValueError, match="hessian must be"):
        gptq(w, h[:8, :8])
    with pytest.raises(ValueError, match="group_size must divide d_col = w.shape\\[-1\\] = 16"):
        gptq(w, h, 4, 6)
    with pytest.raises(ValueError, match="block_size must be a multiple or a divisor of group_size = 8"):
        gptq(w, h, 4, 8, block_size=12)
    with pytest.raises(ValueError, match="bits"):
        gptq(w, h, 3, 8)
    with pytest.raises(ValueError, match="damp"):
        gptq(w, h, 4, 8, damp=-1.0)
    bad = h.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        gptq(w, bad, 4, 8)
    with pytest.raises(ValueError, match="finite"):
        gptq_hessian(torch.tensor([[float("inf"), 1.0]]))


def test_gptq_batch_equals_one_by_one() -> None:
    pairs = [_data(5, 16, 40, seed) for seed in range(3)]
    ws = torch.stack([w for w, _ in pairs])
    hs = torch.stack([gptq_hessian(x) for _, x in pairs])
    hs[1, 3, :] = 0  # one matrix with a dead input
    hs[1, :, 3] = 0
    batched = gptq(ws, hs, 4, 8, block_size=8)
    assert isinstance(batched, list) and len(batched) == 3
    for b in range(3):
        one = gptq(ws[b], hs[b], 4, 8, block_size=8)
        assert torch.equal(batched[b].codes, one.codes) and torch.equal(batched[b].scale, one.scale)
    with pytest.raises(ValueError, match="hessian must be"):
        gptq(ws, hs[:2], 4, 8)
