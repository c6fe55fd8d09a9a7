"""Tests of refimpl.memo.planning: lifetime tracing, the best-fit allocator simulation, and the MILP plan
(valid, between the max-live lower bound and the allocator, optimal against brute force on small cases)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.memo.block import TransformerBlock
from refimpl.memo.planning import (
    Layout,
    TensorLife,
    best_fit_layout,
    check_layout,
    conflicts,
    first_fit_in_order,
    max_live_bytes,
    milp_layout,
    round_up,
    trace_lifetimes,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@st.composite
def lifetimes(draw, max_n: int = 6, unit: int = 512):  # noqa: ANN001, ANN201
    n = draw(st.integers(1, max_n))
    lives = []
    for _ in range(n):
        start = draw(st.integers(0, 10))
        lives.append(TensorLife("t", unit * draw(st.integers(1, 8)), start, start + draw(st.integers(1, 6))))
    return lives


def _brute_force_optimum(lives: list[TensorLife], sizes: list[int]) -> int:
    """Every optimal plan is first-fit in the order of its offsets, so the best over all orders is optimal."""
    return min(first_fit_in_order(lives, sizes, order).peak for order in itertools.permutations(range(len(lives))))


def _naive_conflicts(lives: list[TensorLife]) -> list[tuple[int, int]]:
    return [
        (i, j)
        for i, j in itertools.combinations(range(len(lives)), 2)
        if set(range(lives[i].start, lives[i].end)) & set(range(lives[j].start, lives[j].end))
    ]


@settings(max_examples=50, deadline=None)
@given(lives=lifetimes(max_n=8))
def test_conflicts_and_lower_bound_match_naive_counts(lives):
    assert conflicts(lives) == _naive_conflicts(lives)
    horizon = max(t.end for t in lives)
    naive = max(sum(t.nbytes for t in lives if t.start <= u < t.end) for u in range(horizon))
    assert max_live_bytes(lives) == naive


@settings(max_examples=40, deadline=None)
@given(lives=lifetimes(max_n=6))
def test_milp_is_valid_bounded_and_optimal(lives):
    bf = best_fit_layout(lives)
    check_layout(lives, bf)
    plan = milp_layout(lives, time_limit=10.0)
    check_layout(lives, plan)
    assert plan.info["optimal"]
    sizes = [round_up(t.nbytes, 512) for t in lives]
    assert max_live_bytes(lives, sizes) <= plan.peak <= bf.peak
    assert plan.peak == _brute_force_optimum(lives, sizes)


@settings(max_examples=50, deadline=None)
@given(lives=lifetimes(max_n=10, unit=100))
def test_best_fit_allocator_is_valid_and_allocates_exactly_the_live_bytes(lives):
    bf = best_fit_layout(lives, round_to=64)
    check_layout(lives, bf)
    sizes = [round_up(t.nbytes, 64) for t in lives]
    assert bf.info["peak_allocated"] == max_live_bytes(lives, sizes)
    assert bf.peak == sum(size for _, size in bf.info["segments"]) >= bf.info["peak_allocated"]
    assert 0.0 <= bf.info["fragmentation"] < 1.0


def test_best_fit_fragments_where_the_plan_does_not():
    # A and B live together; A dies, C (bigger than A) arrives while B lives: best fit cannot reuse A's hole.
    lives = [TensorLife("A", 512, 0, 2), TensorLife("B", 512, 0, 4), TensorLife("C", 1024, 2, 4)]
    bf = best_fit_layout(lives)
    assert bf.peak == 2048 and bf.info["peak_allocated"] == 1536
    plan = milp_layout(lives)
    check_layout(lives, plan)
    assert plan.peak == 1536 == max_live_bytes(lives)  # B on top, A then C at the bottom


def test_best_fit_splits_and_coalesces_blocks():
    lives = [
        TensorLife("big", 2048, 0, 2),
        TensorLife("a", 512, 2, 5),  # reuses the start of big's block (split)
        TensorLife("b", 512, 2, 3),
        TensorLife("c", 1024, 3, 5),  # b's block + the unused tail merge
    ]
    bf = best_fit_layout(lives)
    check_layout(lives, bf)
    assert bf.peak == 2048  # one segment, reused


def test_check_layout_catches_overlaps():
    lives = [TensorLife("a", 512, 0, 2), TensorLife("b", 512, 1, 3)]
    with pytest.raises(ValueError, match="overlap"):
        check_layout(lives, Layout([0, 256], [512, 512], 1024, "bad"))
    with pytest.raises(ValueError, match="outside"):
        check_layout(lives, Layout([0, 512], [512, 512], 512, "bad"))
    with pytest.raises(ValueError, match="needs 512 bytes"):
        check_layout(lives, Layout([0, 512], [256, 512], 1024, "bad"))
    check_layout(lives, Layout([0, 512], [512, 512], 1024, "good"))


def test_tracer_records_sizes_and_lifetimes_of_a_known_program():
    x = torch.ones(100)  # made outside: not counted

    def program(tr):  # noqa: ANN001, ANN202
        a = x * 2  # op 0: 400 bytes
        b = a + 1  # op 1: 400 bytes
        del a
        c = torch.zeros(1000)  # op 2: 4000 bytes; a was freed before it
        tr.mark("after c")
        d = b.view(10, 10)  # op 3: a view, no allocation
        return c.sum() + d.sum()  # ops 4.., small

    lives, marks = trace_lifetimes(program, min_bytes=100)
    assert [(t.name, t.nbytes) for t in lives] == [("mul", 400), ("add", 400), ("zeros", 4000)]
    a, b, c = lives
    assert (a.start, a.end) == (0, 2)  # found freed when op 2 ran
    assert b.start == 1 and b.end > 3 and c.start == 2
    assert marks == {"after c": 3}


def test_traced_block_plan_is_valid_and_between_the_bounds():
    torch.manual_seed(0)
    blk = TransformerBlock(64, 4, tile=48, dropout=0.1)
    x = torch.randn(48, 1, 64, requires_grad=True)

    def step(tr):  # noqa: ANN001, ANN202
        out = blk(x)
        tr.mark("backward")
        out.backward(torch.ones_like(out))

    lives, marks = trace_lifetimes(step)
    biggest = max(t.nbytes for t in lives)
    large = [t for t in lives if t.nbytes >= biggest // 4]
    assert 0 < marks["backward"] < max(t.end for t in lives)
    bf = best_fit_layout(large)
    plan = milp_layout(large, time_limit=20.0)
    check_layout(large, bf)
    check_layout(large, plan)
    lower = max_live_bytes(large, [round_up(t.nbytes, 512) for t in large])
    assert lower <= plan.peak <= bf.peak
    assert plan.info["binaries"] == len(conflicts(large))


def test_bad_inputs():
    with pytest.raises(ValueError, match="end"):
        TensorLife("t", 10, 5, 5)
    with pytest.raises(ValueError, match="nbytes"):
        TensorLife("t", -1, 0, 1)
    with pytest.raises(ValueError, match="multiple"):
        round_up(10, 0)
    with pytest.raises(ValueError, match="time_limit"):
        milp_layout([TensorLife("t", 1, 0, 1)], time_limit=0)
    with pytest.raises(ValueError, match="must place"):
        check_layout([TensorLife("t", 1, 0, 1)], Layout([], [], 0, "x"))
    assert milp_layout([]).peak == 0
