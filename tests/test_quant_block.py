"""Tests of refimpl.quant's block formats (BFP, MX) and OliVe against naive per-element references, channel
reordering, byte counts and bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.quant import fake_quantize_int, fp8_grid, unpack_codes
from refimpl.quant.block import block_bits_per_element, block_fake_quantize, channel_order, fp4_e2m1_grid
from refimpl.quant.olive import abfloat_values, olive_decode, olive_encode, olive_fake_quantize


def _heavy(rows: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g, dtype=torch.float64)
    x[:, torch.randperm(k, generator=g)[: max(1, k // 32)]] *= 25  # outlier channels
    return x


def _nearest(v: float, grid: list[float]) -> float:
    """Nearest of ``sign * grid`` (saturating), ties to the even index."""
    a = min(abs(v), grid[-1])
    i = min(range(len(grid)), key=lambda j: (abs(grid[j] - a), j % 2))
    return math.copysign(grid[i], v)


def _naive_block(x: list[float], element: str) -> list[float]:
    amax = max(abs(v) for v in x)
    if amax == 0:
        return [0.0] * len(x)
    if element.startswith("int"):
        qmax = 2 ** (int(element[3:]) - 1) - 1
        e = -200
        while amax > qmax * 2.0**e:  # the smallest power of two that covers the block
            e += 1
        return [min(max(round(v / 2.0**e), -qmax), qmax) * 2.0**e for v in x]
    emax = {"fp4_e2m1": 2, "fp8_e4m3": 8}[element]
    scale = 2.0 ** (math.floor(math.log2(amax)) - emax)
    grid = fp4_e2m1_grid().tolist() if element == "fp4_e2m1" else fp8_grid("e4m3").tolist()
    return [_nearest(v / scale, grid) * scale for v in x]


@pytest.mark.parametrize("element", ["int4", "int6", "int8", "fp4_e2m1", "fp8_e4m3"])
@pytest.mark.parametrize("block", [8, 32])
def test_block_formats_match_naive(element: str, block: int) -> None:
    x = _heavy(3, 64, seed=block)
    x[1, :block] = 0  # an all-zero block
    got = block_fake_quantize(x, block, element)
    want = [sum((_naive_block(row[j : j + block], element) for j in range(0, 64, block)), []) for row in x.tolist()]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=0)


def test_mxfp4_rounds_ties_to_even_mantissa_and_saturates() -> None:
    """Scale 1 (max 7 lies in [4, 8)): every midpoint of the E2M1 grid is a tie, and 7 saturates at 6."""
    ties = [7.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -1.75, -5.0, 6.5, 0.1, 4.4]
    x = torch.tensor([ties + [0.0] * (32 - len(ties))], dtype=torch.float64)
    want = _naive_block(x[0].tolist(), "fp4_e2m1")
    assert want[:8] == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    torch.testing.assert_close(block_fake_quantize(x, 32, "fp4_e2m1")[0], torch.tensor(want, dtype=torch.float64))


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from((4, 6, 8)), block=st.sampled_from((4, 16, 32)), seed=st.integers(0, 2**16))
def test_bfp_error_bound_and_idempotence(bits: int, block: int, seed: int) -> None:
    x = _heavy(4, 64, seed)
    xr = block_fake_quantize(x, block, f"int{bits}")
    qmax = 2 ** (bits - 1) - 1
    amax = x.abs().view(4, -1, block).amax(-1, keepdim=True)
    scale = torch.exp2(torch.ceil(torch.log2(amax / qmax)))  # a power of two
    assert bool(((x - xr).abs().view(4, -1, block) <= scale / 2).all())
    assert torch.equal(block_fake_quantize(xr, block, f"int{bits}"), xr)
    # BFP is symmetric integer quantization with the scale rounded up to a power of two: its step is never
    # smaller, so over many blocks it is not more accurate (one block of a few numbers can be, by luck)
    if bits != 6:
        xl = _heavy(64, 256, seed)
        sym = fake_quantize_int(xl, bits, "group", block, stat_dtype=torch.float64)
        assert float((block_fake_quantize(xl, block, f"int{bits}") - xl).norm()) >= float((sym - xl).norm()) * 0.99


def test_mxfp4_clips_the_block_maximum() -> None:
    x = torch.tensor([[7.5] + [0.1] * 31], dtype=torch.float64)  # 7.5 / 2^(2 - 2) = 7.5 > 6: saturates
    assert float(block_fake_quantize(x, 32, "fp4_e2m1")[0, 0]) == 6.0


def test_reordering_groups_outlier_channels() -> None:
    x = _heavy(64, 256, seed=3)
    mag = x.abs().amax(0)
    perm = channel_order(mag)
    inv = torch.argsort(perm)
    normal = mag < 10  # the ordinary channels, whose blocks no longer hold an outlier
    for element in ("int4", "fp4_e2m1"):
        plain = block_fake_quantize(x, 32, element) - x
        reordered = block_fake_quantize(x[:, perm], 32, element)[:, inv] - x
        assert float(reordered[:, normal].norm()) < 0.6 * float(plain[:, normal].norm()), element
        assert float(reordered.norm()) <= float(plain.norm()), element
    assert sorted(perm.tolist()) == list(range(256))


def test_block_bits_and_bad_inputs() -> None:
    assert block_bits_per_element(32, "fp4_e2m1") == 4.25
    assert block_bits_per_element(16, "int4") == 4.5
    with pytest.raises(ValueError, match="block_size must divide K = x.shape\\[1\\] = 48"):
        block_fake_quantize(torch.randn(2, 48), 32)
    with pytest.raises(ValueError, match="element"):
        block_fake_quantize(torch.randn(2, 32), 32, "int3")
    with pytest.raises(ValueError, match="finite"):
        block_fake_quantize(torch.tensor([[1.0, float("inf")]]), 2)


# ----------------------------------------------------------------------------------------------------------
# OliVe


def _naive_olive(x: list[float], s: float) -> list[float]:
    """Pair by pair: normal pairs to int4; a pair with an outlier keeps the larger (nearest abfloat), prunes
    the other."""
    ab = abfloat_values().tolist()[1:]
    out = []
    for a, b in zip(x[0::2], x[1::2]):
        ya, yb = a / s, b / s
        if abs(ya) > 7.5 or abs(yb) > 7.5:
            big = 0 if abs(ya) >= abs(yb) else 1
            v = (ya, yb)[big]
            mag = min(ab, key=lambda m: (abs(m - abs(v)), m))
            pair = [0.0, 0.0]
            pair[big] = math.copysign(mag, v) * s
            out += pair
        else:
            out += [max(min(round(ya), 7), -7) * s, max(min(round(yb), 7), -7) * s]
    return out


def test_olive_matches_naive_and_round_trips() -> None:
    x = _heavy(8, 64, seed=4)
    x[0, 10], x[0, 11] = 300.0, -200.0  # two outliers in one pair: the larger survives
    packed, scale = olive_encode(x)
    assert packed.shape == (8, 32) and scale.dtype == torch.float16
    got = olive_decode(unpack_codes(packed, 4), scale)
    want = [_naive_olive(row, float(s)) for row, s in zip(x.tolist(), scale.double().flatten())]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(olive_fake_quantize(x), got)
    assert abfloat_values().tolist() == [0, 8, 12, 16, 24, 32, 48, 64]
    # fp32 input is encoded in fp32: the same codes and scales here, and the decode is exact in fp32
    p32, s32 = olive_encode(x.float())
    assert torch.equal(p32, packed) and torch.equal(s32, scale)
    assert torch.equal(olive_decode(unpack_codes(p32, 4), s32, torch.float32).double(), got)


def test_olive_decode_by_hand() -> None:
    # (identifier, +index 1) -> (0, 8 s); (-index 3, identifier) -> (-16 s, 0); normal (8, 15) -> (0, 7 s)
    codes = torch.tensor([[0, 1, 0b1011, 0, 8, 15]], dtype=torch.uint8)
    got = olive_decode(codes, torch.tensor([[0.5]]))
    assert got.tolist() == [[0.0, 4.0, -8.0, 0.0, 0.0, 3.5]]


def test_olive_beats_plain_int4_with_outliers() -> None:
    x = _heavy(32, 256, seed=5).float()
    err_olive = (olive_fake_quantize(x) - x).norm()
    err_int4 = (fake_quantize_int(x, 4, "channel") - x).norm()
    assert err_olive < 0.5 * err_int4


def test_olive_bad_inputs() -> None:
    with pytest.raises(ValueError, match="even"):
        olive_encode(torch.randn(2, 5))
    with pytest.raises(ValueError, match="finite"):
        olive_encode(torch.tensor([[1.0, float("nan")]]))
