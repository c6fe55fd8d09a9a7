"""Tests of refimpl.quant's integer and FP8 grids: against naive float64 references, error bounds, idempotence,
packing and byte counts (hypothesis), and bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.quant import (
    FP8_FORMATS,
    dequantize_fp8,
    dequantize_int,
    fake_quantize_int,
    fp8_grid,
    quantize_fp8,
    quantize_int,
    unpack_codes,
)
from refimpl.quant.integer import _grouped, codes_on_grid


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _naive_int(x: list[list[float]], bits: int, gran: str, g: int, symmetric: bool) -> list[list[float]]:
    """Independent float64 reference with Python floats: groups cut by hand (the last one shorter when ``g`` does
    not divide the width), absmax or min/max statistics."""
    rows, k = len(x), len(x[0])
    if gran == "tensor":
        groups = [[(r, c) for r in range(rows) for c in range(k)]]
    elif gran in ("channel", "token"):
        groups = [[(r, c) for c in range(k)] for r in range(rows)]
    else:
        groups = [[(r, c) for c in range(j, min(j + g, k))] for r in range(rows) for j in range(0, k, g)]  # c // g
    out = [[0.0] * k for _ in range(rows)]
    for grp in groups:
        vals = [x[r][c] for r, c in grp]
        if symmetric:
            qmax = 2 ** (bits - 1) - 1
            s = max(abs(v) for v in vals) / qmax
            rec = [min(max(round(v / s), -qmax), qmax) * s if s else 0.0 for v in vals]
        else:
            z = min(vals)
            s = (max(vals) - z) / (2**bits - 1)
            rec = [round((v - z) / s) * s + z if s else z for v in vals]
        for (r, c), v in zip(grp, rec):
            out[r][c] = v
    return out


@pytest.mark.parametrize("bits", (2, 4, 8))
@pytest.mark.parametrize("gran", ("tensor", "channel", "token", "group"))
@pytest.mark.parametrize("symmetric", (True, False))
def test_int_matches_naive_float64(bits: int, gran: str, symmetric: bool) -> None:
    x = _randn(6, 32, seed=bits, dtype=torch.float64)
    x[2, 5] = 9.0  # an outlier
    got = fake_quantize_int(x, bits, gran, 8, symmetric, stat_dtype=None)
    want = torch.tensor(_naive_int(x.tolist(), bits, gran, 8, symmetric), dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from((2, 4, 8)),
    gran=st.sampled_from(("tensor", "channel", "token", "group")),
    symmetric=st.booleans(),
    rows=st.integers(1, 5),
    n_groups=st.integers(1, 4),
    g=st.sampled_from((4, 8, 16)),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_int_error_bound_idempotence_bytes(
    bits: int, gran: str, symmetric: bool, rows: int, n_groups: int, g: int, scale: float, seed: int
) -> None:
    x = _randn(rows, n_groups * g, seed=seed) * scale
    q = quantize_int(x, bits, gran, g, symmetric)
    xr = dequantize_int(q)
    # |x - x'| <= s / 2 with the stored (fp16) scale of each element's group
    n_rows, n_grp = q.scale.shape
    s = q.scale.float().repeat_interleave(rows // n_rows, 0).repeat_interleave(x.shape[1] // n_grp, 1)
    if gran == "tensor":
        s = q.scale.float().expand_as(x)
    assert bool(((x - xr).abs() <= s / 2 * (1 + 1e-5) + 1e-30).all())
    # idempotence: the reconstruction lies on its own grid, so rounding it with the same statistics gives back
    # the same codes. Re-quantizing from scratch is exact only for absmax grids: an asymmetric grid's fp16 zero
    # point (rounded down) and scale (rounded up) need not put a code at both ends, so fresh statistics differ.
    zero = torch.zeros_like(q.scale) if q.zero is None else q.zero
    on_grid = codes_on_grid(_grouped(xr, gran, q.group_size)[0], q.scale, zero, bits, symmetric)
    assert torch.equal(on_grid, unpack_codes(q.codes, bits))
    q2 = quantize_int(xr, bits, gran, g, symmetric)
    torch.testing.assert_close(dequantize_int(q2), xr, rtol=1e-3, atol=0)
    if symmetric:
        assert torch.equal(unpack_codes(q2.codes, bits), unpack_codes(q.codes, bits))
        assert torch.equal(dequantize_int(q2), xr), "symmetric grids are exactly idempotent"
    # bytes: packed codes + fp16 scale (+ fp16 zero point) per group
    n_groups_total = 1 if gran == "tensor" else rows * (n_groups if gran == "group" else 1)
    assert q.nbytes() == x.numel() * bits // 8 + n_groups_total * 2 * (1 if symmetric else 2)
    assert math.isclose(q.bits_per_element(), 8 * q.nbytes() / x.numel())


@pytest.mark.parametrize("bits", (2, 4, 8))
@pytest.mark.parametrize("symmetric", (True, False))
@pytest.mark.parametrize(("k", "g"), [(40, 16), (24, 16), (36, 32), (576, 128)])
def test_int_partial_last_group_equals_naive(bits: int, symmetric: bool, k: int, g: int) -> None:
    """``partial_group=True``: column ``j`` in group ``j // g``, the last group ``k % g`` wide (GPTQ's g_idx)."""
    x = _randn(5, k, seed=k + bits, dtype=torch.float64)
    x[3, k - 1] = 7.0  # an outlier in the short group
    q = quantize_int(x, bits, "group", g, symmetric, stat_dtype=None, partial_group=True)
    want = torch.tensor(_naive_int(x.tolist(), bits, "group", g, symmetric), dtype=torch.float64)
    torch.testing.assert_close(dequantize_int(q), want, rtol=0, atol=1e-12)
    n_groups = -(-k // g)
    assert q.scale.shape == (5, n_groups) and q.tail is not None and q.tail.shape == (5, 1, (k % g) * bits // 8)
    stats = 5 * n_groups * 8 * (1 if symmetric else 2)  # fp64 statistics here
    assert q.nbytes() == x.numel() * bits // 8 + stats, "codes of every column once, plus one grid per group"
    with pytest.raises(ValueError, match="partial_group=True"):
        quantize_int(x, bits, "group", g, symmetric)


def test_int_partial_group_opt_in_only_changes_non_dividing_widths() -> None:
    x = _randn(4, 64, seed=3)
    q, qp = quantize_int(x, 4, "group", 16), quantize_int(x, 4, "group", 16, partial_group=True)
    assert qp.tail is None and torch.equal(qp.codes, q.codes) and qp.nbytes() == q.nbytes()
    x = _randn(4, 18, seed=4)
    with pytest.raises(ValueError, match="whole bytes"):
        quantize_int(x, 2, "group", 16, partial_group=True)  # a last group of two 2-bit codes: half a byte
    assert quantize_int(x, 4, "group", 16, partial_group=True).tail.shape == (4, 1, 1)
    with pytest.raises(ValueError, match="at most K"):
        quantize_int(x, 4, "group", 32, partial_group=True)


def test_int_constant_and_zero_groups_exact() -> None:
    x = torch.zeros(2, 8)
    x[1] = 0.5
    assert torch.equal(fake_quantize_int(x, 4, "token", symmetric=False), x), "asymmetric: s = 0, exact"
    assert torch.equal(fake_quantize_int(x[:1], 4, "token", symmetric=True), x[:1]), "all zeros: exact"


def test_int_bad_inputs() -> None:
    x = torch.randn(4, 12)
    with pytest.raises(ValueError, match="bits"):
        quantize_int(x, 3)
    with pytest.raises(ValueError, match="group_size must divide K = x.shape\\[1\\] = 12"):
        quantize_int(x, 4, "group", 8)
    with pytest.raises(ValueError, match="group_size"):
        quantize_int(x, 4, "group", 0)
    with pytest.raises(ValueError, match="granularity"):
        quantize_int(x, 4, "row")
    with pytest.raises(ValueError, match="whole bytes"):
        quantize_int(torch.randn(3, 3), 4, "tensor")
    with pytest.raises(ValueError, match="dimensions"):
        quantize_int(torch.randn(8), 4)
    with pytest.raises(ValueError, match="empty"):
        quantize_int(torch.randn(0, 8), 4, "token")
    with pytest.raises(TypeError, match="floating"):
        quantize_int(torch.ones(2, 8, dtype=torch.int32), 4, "token")
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[1, 2] = bad
        with pytest.raises(ValueError, match="finite"):
            quantize_int(y, 8, "token")


# ----------------------------------------------------------------------------------------------------------
# FP8


def _naive_fp8(v: float, grid: list[float]) -> float:
    """Round ``v`` to the nearest value of the non-negative ``grid`` (sign apart), ties to the even bit pattern
    (the grid's index is the bit pattern of the positive codes)."""
    a = abs(v)
    best = min(range(len(grid)), key=lambda i: (abs(grid[i] - a), i % 2))
    return math.copysign(grid[best], v)


@pytest.mark.parametrize("fmt", sorted(FP8_FORMATS))
def test_fp8_grid_formula(fmt: str) -> None:
    e, m, bias = (4, 3, 7) if fmt == "e4m3" else (5, 2, 15)
    grid = fp8_grid(fmt).tolist()
    # values from the sign/exponent/mantissa formula (OCP FP8 spec): subnormals at exponent field 0
    want = set()
    for ef in range(2**e):
        for mf in range(2**m):
            v = (mf / 2**m) * 2.0 ** (1 - bias) if ef == 0 else (1 + mf / 2**m) * 2.0 ** (ef - bias)
            want.add(v)
    if fmt == "e4m3":
        want.discard(480.0)  # S.1111.111 is NaN in E4M3 (no infinities)
    else:
        want = {v for v in want if v < 2.0**16}  # exponent field 31: inf / NaN
    assert grid == sorted(want)
    assert grid[-1] == (448.0 if fmt == "e4m3" else 57344.0)


@pytest.mark.parametrize("fmt", sorted(FP8_FORMATS))
@pytest.mark.parametrize("gran", ("tensor", "token"))
def test_fp8_matches_naive_rounding(fmt: str, gran: str) -> None:
    x = _randn(5, 64, seed=1, dtype=torch.float64) * torch.logspace(-3, 2, 64, dtype=torch.float64)
    q = quantize_fp8(x, fmt, gran)
    grid = fp8_grid(fmt).tolist()
    s = q.scale.double().expand(5, 1) if gran == "tensor" else q.scale.double()
    scaled = (x / s).tolist()
    want = torch.tensor([[_naive_fp8(v, grid) for v in row] for row in scaled], dtype=torch.float64) * s
    torch.testing.assert_close(dequantize_fp8(q), want, rtol=0, atol=0)
    assert q.nbytes() == x.numel() + 4 * q.scale.numel()


@settings(max_examples=40, deadline=None)
@given(fmt=st.sampled_from(sorted(FP8_FORMATS)), seed=st.integers(0, 2**16), mag=st.floats(1e-4, 1e4))
def test_fp8_relative_error_and_idempotence(fmt: str, seed: int, mag: float) -> None:
    x = _randn(4, 32, seed=seed) * mag
    q = quantize_fp8(x, fmt, "token")
    xr = dequantize_fp8(q)
    m = 3 if fmt == "e4m3" else 2
    tiny = fp8_grid(fmt)[(fp8_grid(fmt) > 0)].min().item() * 2 ** (m)  # smallest normal
    normal = (x / q.scale).abs() >= tiny
    rel = ((x - xr).abs() / x.abs())[normal]
    assert bool((rel <= 2.0 ** -(m + 1) * (1 + 1e-6)).all()), "half an ulp, relative"
    torch.testing.assert_close(dequantize_fp8(quantize_fp8(xr, fmt, "token")), xr, rtol=1e-6, atol=0)


def test_fp8_bad_inputs() -> None:
    with pytest.raises(ValueError, match="fmt"):
        quantize_fp8(torch.randn(2, 4), "e3m4")
    with pytest.raises(ValueError, match="granularity"):
        quantize_fp8(torch.randn(2, 4), "e4m3", "group")
    with pytest.raises(ValueError, match="finite"):
        quantize_fp8(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="dimensions"):
        quantize_fp8(torch.randn(4))
