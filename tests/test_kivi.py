"""Tests of refimpl.kivi: group quantization and packing against naive references, the streaming cache
(streaming == one-shot, buffer bounds, byte accounting), attention equivalence, and bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes

from refimpl.caches import make_caches
from refimpl.eviction import ScissorhandsCache
from refimpl.kivi import (
    KIVICache,
    bits_per_element,
    dequantize,
    dequantize_groups,
    fake_quantize,
    n_quantized,
    pack_codes,
    quantize,
    quantize_groups,
    unpack_codes,
)
from refimpl.kivi.quant import check_packing
from refimpl.llm.cache import FullCache, grouped_attention

BITS = (2, 4, 8)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


# ----------------------------------------------------------------------------------------------------------
# Packing


def _naive_pack(codes: list[int], bits: int) -> list[int]:
    """Independent packer: code i of each byte at bit offset bits * i, built with Python ints."""
    per = 8 // bits
    return [sum(codes[j + i] << (bits * i) for i in range(per)) for j in range(0, len(codes), per)]


@pytest.mark.parametrize("bits", BITS)
def test_pack_matches_naive_bit_layout(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (5, 16), generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 16 * bits // 8)
    for row, prow in zip(codes.tolist(), packed.tolist()):
        assert prow == _naive_pack(row, bits)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    lead=array_shapes(min_dims=0, max_dims=3, max_side=4),  # leading dims of the codes tensor
    n_bytes=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_pack_unpack_round_trip_exact(bits: int, lead: tuple[int, ...], n_bytes: int, seed: int) -> None:
    n = n_bytes * 8 // bits
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (*lead, n), generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (*lead, n_bytes)
    assert torch.equal(unpack_codes(packed, bits), codes)


def test_pack_bad_inputs() -> None:
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.zeros(8, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_codes(torch.zeros(6, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="< 2\\*\\*bits"):
        pack_codes(torch.full((4,), 4, dtype=torch.uint8), 2)
    with pytest.raises(TypeError, match="codes"):
        pack_codes(torch.zeros(4, dtype=torch.int32), 2)
    with pytest.raises(TypeError, match="packed"):
        unpack_codes(torch.zeros(4), 2)


# ----------------------------------------------------------------------------------------------------------
# Group quantization


def _naive_quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 reference of KIVI eq. 1, one group (row of the last dim) at a time with Python scalars."""
    rows = x.reshape(-1, x.shape[-1]).tolist()
    levels = 2**bits - 1
    codes, scales, zeros = [], [], []
    for row in rows:
        z, s = min(row), (max(row) - min(row)) / levels
        codes.append([0 if s == 0 else min(max(round((v - z) / s), 0), levels) for v in row])
        scales.append(s)
        zeros.append(z)
    shape = x.shape
    return (
        torch.tensor(codes, dtype=torch.uint8).reshape(shape),
        torch.tensor(scales, dtype=torch.float64).reshape(shape[:-1]),
        torch.tensor(zeros, dtype=torch.float64).reshape(shape[:-1]),
    )


@pytest.mark.parametrize("bits", BITS)
def test_quantize_groups_matches_naive_float64(bits: int) -> None:
    x = _randn(7, 3, 32, seed=bits, dtype=torch.float64)
    codes, scale, zero = quantize_groups(x, bits, stat_dtype=None)
    ref_codes, ref_scale, ref_zero = _naive_quantize(x, bits)
    assert scale.dtype == torch.float64
    torch.testing.assert_close(zero, ref_zero, rtol=0, atol=0)
    torch.testing.assert_close(scale, ref_scale, rtol=1e-15, atol=0)
    # Codes agree except where (x - z) / s lies within rounding noise of a .5 tie (none for random data).
    assert (codes.int() - ref_codes.int()).abs().max() <= 1
    assert (codes != ref_codes).float().mean() < 1e-3


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    n_groups=st.integers(1, 6),
    g=st.sampled_from([4, 8, 16, 32]),
    offset=st.floats(-200, 200),
    spread=st.floats(1e-3, 50),
    stat=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, None]),
    seed=st.integers(0, 2**16),
)
def test_dequantization_error_at_most_half_a_step(
    bits: int, n_groups: int, g: int, offset: float, spread: float, stat: torch.dtype | None, seed: int
) -> None:
    x = (_randn(n_groups, g, seed=seed) * spread + offset).float()
    codes, scale, zero = quantize_groups(x, bits, stat_dtype=stat)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    xq = dequantize_groups(codes, scale, zero, torch.float32)
    s = scale.float().unsqueeze(-1)
    # |x - x'| <= s/2 with the *stored* statistics, up to fp32 rounding of (x - z) / s and q * s + z.
    slack = 4 * torch.finfo(torch.float32).eps * (x.abs() + zero.float().abs().unsqueeze(-1) + s * 2**bits)
    assert bool(((x - xq).abs() <= s / 2 + slack).all())
    # Stored grid covers the group: z <= min and z + (2^B - 1) s >= max (the rounding directions).
    assert bool((zero.float() <= x.amin(-1)).all())
    top = zero.float() + (2**bits - 1) * scale.float()
    assert bool((top >= x.amax(-1) - 1e-6 * x.abs().amax(-1)).all())


@pytest.mark.parametrize("stat", [torch.float16, torch.float32])
@pytest.mark.parametrize("value", [0.0, 1.5, -3.25, 0.1, 1e4])
def test_constant_group_is_finite_and_tight(stat: torch.dtype, value: float) -> None:
    x = torch.full((2, 32), value)
    codes, scale, zero = quantize_groups(x, 2, stat_dtype=stat)
    xq = dequantize_groups(codes, scale, zero)
    assert bool(torch.isfinite(xq).all()) and bool(torch.isfinite(scale).all())
    if float(torch.tensor(value, dtype=stat)) == value:  # representable: exact, scale 0
        assert torch.equal(xq, x) and bool((scale == 0).all())
    else:  # within half of the (tiny) stored scale
        assert bool(((x - xq).abs() <= scale.float().unsqueeze(-1) / 2 + 1e-6).all())
        assert float(scale.float().max()) <= 1e-3 * abs(value)


def test_quantize_groups_bad_inputs() -> None:
    with pytest.raises(ValueError, match="bits"):
        quantize_groups(torch.randn(4, 8), 3)
    with pytest.raises(TypeError, match="floating"):
        quantize_groups(torch.ones(4, 8, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="finite"):
        quantize_groups(torch.tensor([[0.0, float("inf")]]), 2)
    with pytest.raises(ValueError, match="stat_dtype"):
        quantize_groups(torch.tensor([[0.0, 1e6]]), 2, stat_dtype=torch.float16)  # beyond fp16's range
    with pytest.raises(TypeError, match="stat_dtype"):
        quantize_groups(torch.randn(4, 8), 2, stat_dtype=torch.int8)


# ----------------------------------------------------------------------------------------------------------
# Per-channel and per-token quantization of (B, H, T, D)


def _naive_axis_quantize(x: torch.Tensor, bits: int, g: int, axis: str) -> torch.Tensor:
    """Fake quantization with explicit loops over groups (float64, statistics unrounded)."""
    out = torch.empty_like(x, dtype=torch.float64)
    b, h, t, d = x.shape
    levels = 2**bits - 1
    for i in range(b):
        for j in range(h):
            if axis == "channel":
                blocks = [(slice(t0, t0 + g), slice(c, c + 1)) for t0 in range(0, t, g) for c in range(d)]
            else:
                blocks = [(slice(t0, t0 + 1), slice(c0, c0 + g)) for t0 in range(t) for c0 in range(0, d, g)]
            for ts, cs in blocks:
                grp = x[i, j, ts, cs].double()
                z, s = grp.min(), (grp.max() - grp.min()) / levels
                q = torch.zeros_like(grp) if s == 0 else ((grp - z) / s).round().clamp(0, levels)
                out[i, j, ts, cs] = q * s + z
    return out


@pytest.mark.parametrize("axis", ["channel", "token"])
@pytest.mark.parametrize("bits", BITS)
def test_axis_quantize_matches_loops(axis: str, bits: int) -> None:
    x = _randn(2, 3, 64, 32, seed=3, dtype=torch.float64)
    got = fake_quantize(x, bits, 16, axis, stat_dtype=None)
    ref = _naive_axis_quantize(x, bits, 16, axis)
    step = (x.max() - x.min()) / (2**bits - 1)
    # Equal up to flips at exact ties (one step) on a vanishing fraction of elements.
    diff = (got - ref).abs()
    assert float(diff.max()) <= float(step) and (diff > 1e-12).double().mean() < 1e-3


def test_quantized_tensor_layout_and_bytes() -> None:
    x = _randn(2, 3, 64, 32, seed=1)
    qc = quantize(x, 2, 16, "channel")
    assert qc.codes.shape == (2, 3, 4, 32, 4) and qc.scale.shape == (2, 3, 4, 32) and qc.n_tokens == 64
    qt = quantize(x, 4, 16, "token")
    assert qt.codes.shape == (2, 3, 64, 2, 8) and qt.zero.shape == (2, 3, 64, 2) and qt.n_tokens == 64
    n = x.numel()
    assert qc.nbytes() == n * 2 // 8 + 2 * 2 * (n // 16)  # 2-bit codes + fp16 scale and zero per group
    assert dequantize(qt).dtype == x.dtype and dequantize(qc).shape == x.shape


def test_per_channel_wins_on_outlier_channels() -> None:
    """Keys with a few channels of persistently large magnitude: per-channel groups isolate them, per-token
    groups stretch every token's range to reach them."""
    x = _randn(1, 2, 128, 64, seed=5)
    x[..., [3, 40]] += 20.0  # two outlier channels: large in every token, as in LLM keys
    err = {axis: float((fake_quantize(x, 2, 32, axis) - x).pow(2).mean()) for axis in ("channel", "token")}
    assert err["channel"] * 10 < err["token"], err


def test_quantize_bad_inputs() -> None:
    x = torch.randn(1, 2, 40, 64)
    with pytest.raises(ValueError, match="T % group_size"):
        quantize(x, 2, 32, "channel")
    with pytest.raises(ValueError, match="D % group_size"):
        quantize(torch.randn(1, 2, 32, 48), 2, 32, "token")
    with pytest.raises(ValueError, match="axis"):
        quantize(x, 2, 8, "row")
    with pytest.raises(ValueError, match="dimensions"):
        quantize(torch.randn(40, 64), 2, 8, "token")
    with pytest.raises(ValueError, match="multiple of 8"):
        quantize(x, 2, 2, "token")


# ----------------------------------------------------------------------------------------------------------
# The streaming cache


def _reference_kv(k, v, bits, g, r, key_axis="channel", value_axis="token"):
    """What KIVI's cache must return after all of k, v (B, H, n, D): one-shot quantization of the prefix."""

    def part(x, axis):
        n = x.shape[2]
        if axis == "channel":
            block = max(r, g)
            nq = n // block * block
        else:
            nq = max(n - r, 0)
        if nq == 0:
            return x, nq
        return torch.cat([fake_quantize(x[:, :, :nq], bits, g, axis), x[:, :, nq:]], dim=2), nq

    return part(k, key_axis), part(v, value_axis)


def _feed(cache, k, v, chunks):
    t = 0
    for n in chunks:
        cache.update(k[:, :, t : t + n], v[:, :, t : t + n], torch.arange(t, t + n))
        t += n
    return t


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    g=st.sampled_from([4, 8, 16]),
    r_groups=st.integers(0, 4),
    chunks=st.lists(st.integers(1, 40), min_size=1, max_size=8),
    key_axis=st.sampled_from(["channel", "token"]),
    value_axis=st.sampled_from(["channel", "token"]),
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_streaming_equals_one_shot_and_bounds(bits, g, r_groups, chunks, key_axis, value_axis, b, h, seed) -> None:
    r, d = r_groups * g, 16
    total = sum(chunks)
    k, v = _randn(b, h, total, d, seed=seed), _randn(b, h, total, d, seed=seed + 1)
    stream = KIVICache(bits, g, r, key_axis=key_axis, value_axis=value_axis)
    t = 0
    for n in chunks:  # decode/prefill steps of random sizes, checking the buffer bounds after each
        stream.update(k[:, :, t : t + n], v[:, :, t : t + n], torch.arange(t, t + n))
        t += n
        for s in (stream.k_stream, stream.v_stream):
            assert s.n_quantized + s.n_residual == t == len(stream)
            if s.axis == "channel":
                assert s.n_residual < max(r, g) and s.n_quantized % g == 0
            else:
                assert s.n_residual == min(t, r)
    one_shot = KIVICache(bits, g, r, key_axis=key_axis, value_axis=value_axis)
    one_shot.update(k, v, torch.arange(total))
    (k_ref, _), (v_ref, _) = _reference_kv(k, v, bits, g, r, key_axis, value_axis)
    for cache in (stream, one_shot):
        kc, vc = cache.keys_values()
        assert torch.equal(kc, k_ref) and torch.equal(vc, v_ref)
        assert torch.equal(cache.key_positions(), torch.arange(total))
    assert stream.nbytes() == one_shot.nbytes()
    if one_shot.k_stream.n_quantized:  # the same packed codes, not just the same dequantized values
        assert torch.equal(stream.k_stream.quantized().codes, one_shot.k_stream.quantized().codes)


@pytest.mark.parametrize("n", [1, 31, 127, 128, 129, 200, 256, 300])
def test_default_cache_split_follows_the_paper(n: int) -> None:
    """G=32, R=128: keys quantize n - (n mod 128) tokens, values max(n - 128, 0); any n works."""
    cache = KIVICache()
    k, v = _randn(1, 3, n, 64, seed=n), _randn(1, 3, n, 64, seed=n + 1)
    _feed(cache, k, v, [n])
    assert cache.k_stream.n_quantized == n - n % 128
    assert cache.v_stream.n_quantized == max(n - 128, 0)
    kc, vc = cache.keys_values()
    assert kc.shape == vc.shape == (1, 3, n, 64)
    assert torch.equal(kc[:, :, n - n % 128 :], k[:, :, n - n % 128 :])  # residual untouched
    assert torch.equal(vc[:, :, max(n - 128, 0) :], v[:, :, max(n - 128, 0) :])


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_nbytes_matches_independent_count(bits: int, dtype: torch.dtype) -> None:
    b, h, d, g, r = 2, 3, 64, 32, 64
    for n in (10, 64, 100, 300):
        cache = KIVICache(bits, g, r)
        _feed(cache, _randn(b, h, n, d, dtype=dtype), _randn(b, h, n, d, seed=1, dtype=dtype), [n])
        nk = n - n % r  # quantized keys
        nv = max(n - r, 0)  # quantized values
        item = torch.finfo(dtype).bits // 8
        codes = (nk + nv) * b * h * d * bits // 8
        stats = 2 * 2 * b * h * (nk // g * d + nv * d // g)  # fp16 scale + zero per group
        residual = ((n - nk) + (n - nv)) * b * h * d * item
        assert cache.nbytes() == codes + stats + residual, n


def test_bytes_ratio_long_context() -> None:
    """2-bit at G=32: codes 2/16 plus two fp16 statistics per 32 elements (1/16) of an fp16 cache."""
    n, r = 2048, 128
    k, v = _randn(1, 2, n, 64, dtype=torch.float16), _randn(1, 2, n, 64, seed=1, dtype=torch.float16)
    kivi, full = KIVICache(2, 32, r), FullCache()
    _feed(kivi, k, v, [n])
    _feed(full, k, v, [n])
    expected = (2 * n * (2 / 16 + 1 / 16) + r * (1 - 3 / 16)) / (2 * n)
    assert math.isclose(kivi.nbytes() / full.nbytes(), expected, rel_tol=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    seq=st.integers(1, 300),
    bits=st.sampled_from([2, 4]),
    g=st.sampled_from([8, 16, 32]),
    r_groups=st.integers(0, 4),
    key_axis=st.sampled_from(["channel", "token"]),
)
def test_bits_per_element_matches_cache_bytes(seq, bits, g, r_groups, key_axis) -> None:
    """The closed form given to the roofline model equals what the cache holds (fp16 tokens, fp16 stats)."""
    r, b, h, d = r_groups * g, 1, 2, 32
    cache = KIVICache(bits, g, r, key_axis=key_axis)
    _feed(cache, _randn(b, h, seq, d, dtype=torch.float16), _randn(b, h, seq, d, seed=1, dtype=torch.float16), [seq])
    per_element = bits_per_element(seq, bits, g, r, key_axis=key_axis)
    assert math.isclose(per_element * 2 * b * h * seq * d / 8, cache.nbytes(), rel_tol=1e-12)
    assert cache.k_stream.n_quantized == n_quantized(seq, g, r, key_axis)


def test_bits_per_element_limits_and_bad_inputs() -> None:
    assert bits_per_element(100, 2, 32, 128) == 16.0  # all in the residual
    assert math.isclose(bits_per_element(2**20, 2, 32, 128), 3.0, rel_tol=1e-3)  # 2 + 2 * 16 / 32
    assert math.isclose(bits_per_element(2**20, 4, 32, 128), 5.0, rel_tol=1e-3)
    with pytest.raises(ValueError, match="seq"):
        bits_per_element(0)
    with pytest.raises(ValueError, match="bits"):
        bits_per_element(10, bits=3)
    with pytest.raises(ValueError, match="axis"):
        n_quantized(10, 32, 128, "head")
    with pytest.raises(ValueError, match="n_tokens"):
        n_quantized(-1, 32, 128, "token")


@pytest.mark.parametrize("key_axis", ["channel", "token"])
def test_attention_over_cache_equals_attention_over_dequantized_cache(key_axis: str) -> None:
    """``order="quantize_then_attend"``: each step attends over the cache as stored after the step."""
    b, h_kv, h_q, d, g, r = 2, 3, 9, 32, 8, 16
    total = 70
    k, v = _randn(b, h_kv, total, d, seed=7), _randn(b, h_kv, total, d, seed=8)
    cache = KIVICache(2, g, r, key_axis=key_axis, order="quantize_then_attend")
    scale = d**-0.5
    t = 0
    for n in [23, 1, 1, 9, 1, 35]:  # prefill, then decode steps and a second chunk
        pos = torch.arange(t, t + n)
        cache.update(k[:, :, t : t + n], v[:, :, t : t + n], pos)
        t += n
        q = _randn(b, h_q, n, d, seed=t)
        got = cache.attend(q, pos, scale)
        (k_ref, _), (v_ref, _) = _reference_kv(k[:, :, :t], v[:, :, :t], 2, g, r, key_axis)
        want, _ = grouped_attention(q, k_ref, v_ref, pos, torch.arange(t), scale)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # fused vs reference attention
        # Independent float64 attention (per-head loop, explicit causal mask) over the same dequantized cache.
        for hq in range(h_q):
            hk = hq // (h_q // h_kv)
            s = q[:, hq].double() @ k_ref[:, hk].double().transpose(-1, -2) * scale  # (B, n, t)
            s = s.masked_fill(torch.arange(t)[None, None, :] > pos[None, :, None], float("-inf"))
            ref = torch.softmax(s, -1) @ v_ref[:, hk].double()
            torch.testing.assert_close(got[:, hq].double(), ref, rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    bits=st.sampled_from([2, 4]),
    g=st.sampled_from([4, 8]),
    r_groups=st.integers(0, 3),
    prefill=st.integers(1, 30),
    steps=st.lists(st.integers(1, 3), min_size=1, max_size=12),
    key_axis=st.sampled_from(["channel", "token"]),
    seed=st.integers(0, 2**16),
)
def test_default_order_attends_before_quantizing(bits, g, r_groups, prefill, steps, key_axis, seed) -> None:
    """KIVI's released code (models/llama_kivi.py) attends with the step's tokens in full precision, then
    quantizes: a step over tokens ``[t0, t)`` reads the cache as quantized after ``t0`` tokens, plus the new
    tokens exact. The prefill's attention is exact. The stored state is that of the other order."""
    r, b, h_kv, h_q, d = r_groups * g, 1, 2, 4, 8
    chunks = [prefill, *steps]
    total = sum(chunks)
    k, v = _randn(b, h_kv, total, d, seed=seed), _randn(b, h_kv, total, d, seed=seed + 1)
    first = KIVICache(bits, g, r, key_axis=key_axis)
    assert first.order == "attend_then_quantize"
    later = KIVICache(bits, g, r, key_axis=key_axis, order="quantize_then_attend")
    t0 = 0
    for n in chunks:
        t, pos = t0 + n, torch.arange(t0, t0 + n)
        q = _randn(b, h_q, n, d, seed=seed + t)
        for cache in (first, later):
            cache.update(k[:, :, t0:t], v[:, :, t0:t], pos)
        got = first.attend(q, pos, 0.5)
        (k_old, _), (v_old, _) = _reference_kv(k[:, :, :t0], v[:, :, :t0], bits, g, r, key_axis)
        k_ref, v_ref = torch.cat([k_old, k[:, :, t0:t]], dim=2), torch.cat([v_old, v[:, :, t0:t]], dim=2)
        want, _ = grouped_attention(q, k_ref, v_ref, pos, torch.arange(t), 0.5)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # fused vs reference attention
        if t0 == 0:  # the prefill attends over exact keys and values
            exact, _ = grouped_attention(q, k[:, :, :t], v[:, :, :t], pos, torch.arange(t), 0.5)
            torch.testing.assert_close(got, exact, rtol=1e-6, atol=1e-6)
        for x, y in zip(first.keys_values(), later.keys_values()):  # the same stored state
            assert torch.equal(x, y)
        assert first.nbytes() == later.nbytes()
        t0 = t


def test_orders_differ_at_every_decode_step_that_quantizes_a_value() -> None:
    """Past the window every decode step quantizes one value: the two orders attend over different values."""
    b, h, d, g, r = 1, 2, 16, 8, 16
    total, prefill = 60, 20
    k, v = _randn(b, h, total, d, seed=3), _randn(b, h, total, d, seed=4)
    caches = [KIVICache(2, g, r), KIVICache(2, g, r, order="quantize_then_attend")]
    for c in caches:
        c.update(k[:, :, :prefill], v[:, :, :prefill], torch.arange(prefill))
    for t in range(prefill, total):
        q, pos = _randn(b, h, 1, d, seed=t), torch.arange(t, t + 1)
        outs = []
        for c in caches:
            c.update(k[:, :, t : t + 1], v[:, :, t : t + 1], pos)
            outs.append(c.attend(q, pos, 0.25))
        assert not torch.equal(*outs), t  # t >= R: the value at t - R is quantized after (default) or before
    with pytest.raises(ValueError, match="order"):
        KIVICache(order="after")


def test_large_residual_is_lossless_and_quantization_changes_values() -> None:
    k, v = _randn(1, 2, 50, 32), _randn(1, 2, 50, 32, seed=1)
    cache = KIVICache(2, 16, 64)
    _feed(cache, k, v, [20, 30])
    kc, vc = cache.keys_values()
    assert torch.equal(kc, k) and torch.equal(vc, v) and cache.k_stream.n_quantized == 0
    cache = KIVICache(2, 16, 16)
    _feed(cache, k, v, [50])
    kc, vc = cache.keys_values()
    assert not torch.equal(kc, k) and not torch.equal(vc, v)


def test_constant_tensors_through_the_cache_stay_exact() -> None:
    """All-equal keys (every per-channel group constant) and values (every per-token group constant)."""
    cache = KIVICache(2, 8, 8)
    k = torch.full((1, 2, 40, 16), 0.75)
    v = torch.arange(40.0).view(1, 1, 40, 1).expand(1, 2, 40, 16).contiguous()  # constant along channels
    _feed(cache, k, v, [17, 1, 22])
    kc, vc = cache.keys_values()
    assert cache.k_stream.n_quantized == 40 and cache.v_stream.n_quantized == 32
    assert torch.equal(kc, k) and torch.equal(vc, v)  # representable in fp16, so exact, and no NaN


def test_make_caches_registry() -> None:
    c2 = make_caches("kivi2", 3, residual_length=32)
    c4 = make_caches("kivi4", 1)
    assert len(c2) == 3 and all(isinstance(c, KIVICache) for c in c2 + c4)
    assert c2[0].bits == 2 and c2[0].residual_length == 32 and c4[0].bits == 4


def test_cache_bad_inputs() -> None:
    with pytest.raises(ValueError, match="bits"):
        KIVICache(bits=3)
    with pytest.raises(ValueError, match="residual_length must be a multiple of group_size=32, got 100"):
        KIVICache(residual_length=100)
    with pytest.raises(ValueError, match="residual_length"):
        KIVICache(residual_length=-32)
    with pytest.raises(ValueError, match="group_size"):
        KIVICache(group_size=0)
    with pytest.raises(ValueError, match="multiple of 8"):
        KIVICache(bits=2, group_size=6, residual_length=12)
    with pytest.raises(ValueError, match="key_axis"):
        KIVICache(key_axis="head")
    with pytest.raises(TypeError, match="stat_dtype"):
        KIVICache(stat_dtype="fp16")
    cache = KIVICache(2, 32, 64)
    with pytest.raises(RuntimeError, match="empty"):
        cache.keys_values()
    with pytest.raises(ValueError, match="same shape"):
        cache.update(torch.randn(1, 2, 3, 64), torch.randn(1, 2, 4, 64), torch.arange(3))
    with pytest.raises(ValueError, match="positions"):
        cache.update(torch.randn(1, 2, 3, 64), torch.randn(1, 2, 3, 64), torch.arange(4))
    with pytest.raises(ValueError, match="D to be a multiple"):
        cache.update(torch.randn(1, 2, 3, 48), torch.randn(1, 2, 3, 48), torch.arange(3))
    cache.update(torch.randn(1, 2, 3, 64), torch.randn(1, 2, 3, 64), torch.arange(3))
    with pytest.raises(ValueError, match="B, H_kv, D, dtype"):
        cache.update(torch.randn(2, 2, 1, 64), torch.randn(2, 2, 1, 64), torch.arange(3, 4))
    with pytest.raises(ValueError, match="B, H_kv, D, dtype"):
        cache.update(torch.randn(1, 2, 1, 64).half(), torch.randn(1, 2, 1, 64).half(), torch.arange(3, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prefill_attention_equals_the_full_cache(dtype: torch.dtype) -> None:
    """``attend_then_quantize``: a prefill reads its own keys and values exactly, with the full cache's attention,
    so the two may share one prefill (equal ``prefill_key``); the other order promises nothing."""
    b, h_kv, h_q, t, d = 2, 3, 9, 40, 16
    k, v, q = (_randn(b, h, t, d, seed=s, dtype=dtype) for s, h in ((1, h_kv), (2, h_kv), (3, h_q)))
    outs = []
    for cache in (FullCache(), KIVICache(2, 8, 16)):
        cache.update(k, v, torch.arange(t))
        outs.append(cache.attend(q, torch.arange(t), d**-0.5))
    assert torch.equal(*outs)
    assert KIVICache(2).prefill_key() == FullCache().prefill_key()
    assert KIVICache(2, order="quantize_then_attend").prefill_key() is None


def test_keys_values_are_copies_and_attention_reads_the_working_buffer() -> None:
    """keys_values() survives later updates; the working buffer equals a fresh dequantization of the history."""
    b, h, d, g, r = 1, 2, 16, 8, 16
    k, v = _randn(b, h, 50, d, seed=5), _randn(b, h, 50, d, seed=6)
    cache = KIVICache(2, g, r)
    cache.update(k[:, :, :20], v[:, :, :20], torch.arange(20))
    before = [x.clone() for x in cache.keys_values()]
    held = cache.keys_values()
    for t in range(20, 50):
        cache.update(k[:, :, t : t + 1], v[:, :, t : t + 1], torch.arange(t, t + 1))
        for stream in (cache.k_stream, cache.v_stream):
            q = stream.quantized()
            want = torch.cat([dequantize(q), stream.residual], dim=2) if q is not None else stream.residual
            assert torch.equal(stream.tensor(), want)
    for x, y in zip(held, before):
        assert torch.equal(x, y)


@pytest.mark.parametrize(
    "make",
    [
        lambda bits, g: check_packing(bits, g),
        lambda bits, g: KIVICache(bits=bits, group_size=g, residual_length=0),
        lambda bits, g: ScissorhandsCache(budget=64, bits=bits, group_size=g),
    ],
    ids=["check_packing", "KIVICache", "ScissorhandsCache"],
)
def test_every_quantized_store_checks_bits_and_packing_alike(make) -> None:
    """One check (``kivi.quant.check_packing``) serves the quantizer, the KIVI cache and the evicting caches."""
    with pytest.raises(ValueError, match="bits"):
        make(5, 32)
    with pytest.raises(ValueError, match="group_size"):
        make(2, 0)
    with pytest.raises(ValueError, match=r"multiple of 8 to pack codes, got 3 \* 2"):
        make(2, 3)
    make(2, 4)  # 4 codes of 2 bits: one byte
