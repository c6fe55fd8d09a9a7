"""Counted IO of the tiled loops against their closed forms; causal block skipping; measured memory;
the benchmark's --quick run."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.attention import (
    AttentionTiling,
    IOCounter,
    block_sizes_for_sram,
    flash1_forward_io,
    flash2_backward_io,
    flash2_forward_io,
    flash_attention,
    flash_attention_backward,
    flash_attention_forward,
    naive_attention,
    peak_memory,
    sram_footprint,
    standard_attention_io,
)
from refimpl.attention.memory import allocation_events
from tests.strategies_attention import attention_tilings, make_qkv, tiling_qkv

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_counts(counter: IOCounter, expected) -> None:
    got_r = {k: v for k, v in counter.reads.items() if v}
    got_w = {k: v for k, v in counter.writes.items() if v}
    assert got_r == {k: v for k, v in expected.reads.items() if v}
    assert got_w == {k: v for k, v in expected.writes.items() if v}
    assert counter.total == expected.total


# ------------------------------------------------------------------ loop counts == closed forms


@settings(max_examples=40, deadline=None)
@given(t=attention_tilings())
def test_fa2_forward_and_backward_counts_equal_closed_forms(t):
    q, k, v = tiling_qkv(t, dtype=torch.float32)
    io = IOCounter()
    o, lse = flash_attention_forward(q, k, v, t.causal, None, t.block_q, t.block_k, io=io)
    assert_counts(io, flash2_forward_io(t))
    io_b = IOCounter()
    flash_attention_backward(q, k, v, o, lse, torch.ones_like(o), t.causal, None, t.block_q, t.block_k, io=io_b)
    assert_counts(io_b, flash2_backward_io(t))


@settings(max_examples=30, deadline=None)
@given(t=attention_tilings())
def test_fa1_forward_counts_equal_closed_form(t):
    q, k, v = tiling_qkv(t, dtype=torch.float32)
    io = IOCounter()
    flash_attention_forward(q, k, v, t.causal, None, t.block_q, t.block_k, loop_order="fa1", io=io)
    assert_counts(io, flash1_forward_io(t))


@settings(max_examples=25, deadline=None)
@given(t=attention_tilings(), return_lse=st.booleans())
def test_standard_attention_counts_equal_closed_form(t, return_lse):
    q, k, v = tiling_qkv(t, dtype=torch.float32)
    io = IOCounter()
    naive_attention(q, k, v, t.causal, return_lse=return_lse, io=io)
    assert_counts(io, standard_attention_io(t.batch, t.heads_q, t.n_q, t.n_k, t.d, return_lse))


@pytest.mark.parametrize(("n", "d"), [(64, 8), (256, 16), (1000, 64)])
def test_standard_attention_is_4_nd_plus_4_n_squared_per_head(n, d):
    assert standard_attention_io(1, 1, n, n, d).total == 4 * n * d + 4 * n * n


@pytest.mark.parametrize(("t", "block", "d"), [(1, 4, 2), (5, 8, 4), (16, 3, 8)])
def test_causal_fa2_forward_closed_form_for_divisible_sizes(t, block, d):
    # N = T B with B_r = B_c = B: query block i reads i + 1 key blocks, so K and V are each read
    # B d (1 + 2 + ... + T) = d N (T + 1) / 2 elements, about half of the T N d read without the mask.
    n = t * block
    q, k, v = make_qkv(1, 1, 1, n, n, d, dtype=torch.float32)
    io = IOCounter()
    flash_attention_forward(q, k, v, True, None, block, block, io=io)
    assert io.reads["K"] == io.reads["V"] == d * n * (t + 1) // 2
    assert io.reads["Q"] == io.writes["O"] == n * d and io.writes["L"] == n
    full = flash2_forward_io(AttentionTiling(1, 1, 1, n, n, d, block, block))
    assert full.reads["K"] == t * n * d


# ------------------------------------------------------------------ asymptotics (FlashAttention Theorem 2)


@pytest.mark.parametrize("d", [16, 32, 64, 128])
@pytest.mark.parametrize("m_over_d", [64, 128, 256])
def test_sram_blocks_fit_and_fa2_io_is_theta_n2_d2_over_m(d, m_over_d):
    m = m_over_d * d  # SRAM elements
    block_q, block_k = block_sizes_for_sram(m, d)
    assert sram_footprint(block_q, block_k, d) <= m
    assert block_q >= m // (6 * d), "B_r = Theta(M / d)"
    for n in (4096, 16384):
        total = flash2_forward_io(AttentionTiling(1, 1, 1, n, n, d, block_q, block_k)).total
        ratio = total / (n * n * d * d / m)
        # K and V are read ceil(N / B_r) times: 2 N d ceil(N / B_r) ~ 2 (5d + 2) N^2 d / M ~ 10 N^2 d^2 / M.
        assert 10 <= ratio <= 14, (d, m, n, ratio)
    # Doubling the SRAM halves the traffic (up to rounding of the block size and the linear Q, O terms).
    big = flash2_forward_io(AttentionTiling(1, 1, 1, 16384, 16384, d, *block_sizes_for_sram(2 * m, d))).total
    small = flash2_forward_io(AttentionTiling(1, 1, 1, 16384, 16384, d, block_q, block_k)).total
    assert 1.8 <= small / big <= 2.2


def test_counted_traffic_scales_quadratically_in_n_for_fixed_sram():
    d, m = 8, 8 * 64
    block_q, block_k = block_sizes_for_sram(m, d)
    counts = []
    for n in (128, 256):
        io = IOCounter()
        q, k, v = make_qkv(1, 1, 1, n, n, d, dtype=torch.float32)
        flash_attention_forward(q, k, v, False, None, block_q, block_k, io=io)
        counts.append(io.total)
    assert 3.5 < counts[1] / counts[0] < 4.0  # Theta(N^2) plus a linear term


def test_block_sizes_for_sram_validates():
    with pytest.raises(ValueError, match="sram_elements must be >= 5\\*d \\+ 2"):
        block_sizes_for_sram(100, 64)
    with pytest.raises(TypeError, match="d must be an int"):
        block_sizes_for_sram(1000, 2.0)
    with pytest.raises(ValueError, match="heads_kv must divide heads_q"):
        AttentionTiling(1, 3, 2, 10, 10, 4, 2, 2)
    with pytest.raises(ValueError, match="block_k must be >= 1"):
        AttentionTiling(1, 2, 1, 10, 10, 4, 2, 0)
    with pytest.raises(ValueError, match="n_q must be >= 0"):
        standard_attention_io(1, 1, -1, 3, 4)


# ------------------------------------------------------------------ causal block skipping


@settings(max_examples=30, deadline=None)
@given(n_q=st.integers(1, 40), n_k=st.integers(1, 40), block_q=st.integers(1, 12), block_k=st.integers(1, 12))
def test_causal_visits_exactly_the_tiles_with_a_visible_entry(n_q, n_k, block_q, block_k):
    q, k, v = make_qkv(1, 1, 1, n_q, n_k, 2, dtype=torch.float32)
    offset = n_k - n_q
    needed, diagonal = set(), set()
    for qb, i0 in enumerate(range(0, n_q, block_q)):
        i1 = min(i0 + block_q, n_q)
        for kb, j0 in enumerate(range(0, n_k, block_k)):
            j1 = min(j0 + block_k, n_k)
            if j0 <= i1 - 1 + offset:  # some query of the block sees some key of the block
                needed.add((qb, kb))
                if j1 - 1 > i0 + offset:  # but not every one
                    diagonal.add((qb, kb))
    io = IOCounter()
    o, lse = flash_attention_forward(q, k, v, True, None, block_q, block_k, io=io)
    assert [(t.q_block, t.k_block) for t in io.visits] == sorted(needed)  # FA2 order: query block outer
    assert {(t.q_block, t.k_block) for t in io.visits if t.masked} == diagonal
    io_b = IOCounter()
    flash_attention_backward(q, k, v, o, lse, torch.ones_like(o), True, None, block_q, block_k, io=io_b)
    assert [(t.k_block, t.q_block) for t in io_b.visits] == sorted((kb, qb) for qb, kb in needed)


def test_causal_square_visits_t_t_plus_1_over_2_tiles_and_records_statistics():
    t, block = 6, 4
    q, k, v = make_qkv(1, 1, 1, t * block, t * block, 4, dtype=torch.float32)
    io = IOCounter(record=True)
    o, lse = flash_attention_forward(q, k, v, True, None, block, block, io=io)
    assert len(io.visits) == t * (t + 1) // 2
    assert sum(v.masked for v in io.visits) == t  # only the diagonal tiles need an element-wise mask
    last = {}
    for visit in io.visits:
        assert visit.row_max.shape == (block,) and visit.row_sum.shape == (block,)
        if visit.q_block in last:  # the running max never decreases
            assert (visit.row_max >= last[visit.q_block].row_max).all()
        last[visit.q_block] = visit
    for qb, visit in last.items():  # final statistics give the log-sum-exp
        lse_rows = lse[0, 0, qb * block : (qb + 1) * block]
        assert torch.allclose(visit.row_max + visit.row_sum.log(), lse_rows)


# ------------------------------------------------------------------ measured memory


def test_peak_memory_replays_allocations_exactly():
    def fn():
        a = torch.empty(1000)  # 4000 B
        b = torch.empty(2000)  # 8000 B, 12000 B held
        del a
        c = torch.empty(500)  # 10000 B held
        return b, c

    assert peak_memory(fn) == 12000
    events = allocation_events(fn)
    assert sum(size for _, size in events) == 0  # everything made inside was freed once the result was dropped
    with pytest.raises(TypeError, match="fn must be callable"):
        peak_memory(3)


def test_naive_memory_is_quadratic_tiled_is_linear():
    d, block = 16, 128  # few tiles: the profiler that records the allocations is slow per operation
    naive, tiled = [], []
    for n in (256, 512, 1024):
        q, k, v = make_qkv(1, 1, 1, n, n, d, dtype=torch.float32)
        naive.append(peak_memory(lambda: naive_attention(q, k, v)))  # noqa: B023
        tiled.append(peak_memory(lambda: flash_attention_forward(q, k, v, False, None, block, block)))  # noqa: B023
        # Standard attention holds S and P, N^2 floats each.
        assert naive[-1] >= 2 * n * n * 4
        # The tiled forward: O and L plus a bounded number of tile-sized temporaries.
        out_bytes = (n * d + n) * 4
        assert tiled[-1] <= out_bytes + 16 * (block * block + block * d) * 4
    assert 3.8 < naive[2] / naive[1] < 4.2
    assert tiled[2] / tiled[1] < 2.2


def test_backward_memory_tiled_linear_naive_quadratic():
    d, block = 16, 256
    tiled, naive = [], []
    for n in (1024, 2048):
        q, k, v = (t.requires_grad_() for t in make_qkv(1, 1, 1, n, n, d, dtype=torch.float32))
        tiled.append(peak_memory(lambda: flash_attention(q, k, v, True, None, block, block).sum().backward()))  # noqa: B023
        naive.append(peak_memory(lambda: naive_attention(q, k, v, True).sum().backward()))  # noqa: B023
        assert tiled[-1] < naive[-1] / 4
    assert naive[1] / naive[0] > 3.5
    assert tiled[1] / tiled[0] < 2.3


# ------------------------------------------------------------------ the benchmark runs


def test_benchmark_quick_prints_parseable_ratios(run_benchmark):
    _, lines = run_benchmark("bench_attention", ["--quick"])
    for key in (
        "flash_vs_naive_time_ratio",
        "flash_vs_naive_peak_memory_ratio",
        "flash_vs_naive_fwd_bwd_time_ratio",
        "flash_vs_naive_fwd_bwd_peak_memory_ratio",
    ):
        value = float(lines[key])
        assert math.isfinite(value) and value > 0, key


def test_gpu_benchmark_exits_clearly_without_cuda(capsys, load_benchmark):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device exists; the GPU benchmark would run for real")
    bench = load_benchmark("bench_attention_gpu")
    with pytest.raises(SystemExit) as exc:
        bench.main(["--quick"])
    assert exc.value.code != 0
    assert "no CUDA device" in capsys.readouterr().err
