"""Tests of refimpl.eviction.analysis and experiments: sparsity and persistence against naive loops."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.eviction.analysis import (
    AttentionRecorder,
    important_sets,
    lagged_overlap,
    persistence_ratio,
    random_sets,
    set_size_ratio,
    top_mass,
)
from refimpl.llm.cache import grouped_attention


def causal_attention_rows(shape, t, seed, sharp=3.0):
    """Random causal attention ``(*shape, T, T)``: softmax of random scores over the visible keys."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, t, t, generator=g, dtype=torch.float64) * sharp
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    return torch.softmax(s.masked_fill(~mask, -math.inf), dim=-1)


@settings(max_examples=30, deadline=None)
@given(t=st.integers(2, 24), frac=st.floats(0.05, 1.0), seed=st.integers(0, 2**16))
def test_top_mass_matches_loop(t, frac, seed):
    a = causal_attention_rows((2,), t, seed)
    got = top_mass(a, frac)
    for h in range(2):
        for row in range(t):
            k = max(1, math.ceil(frac * (row + 1)))
            ref = sorted(a[h, row, : row + 1].tolist(), reverse=True)[:k]
            assert abs(float(got[h, row]) - sum(ref)) < 1e-12


def test_top_mass_extremes():
    t = 10
    uniform = torch.tril(torch.ones(t, t)) / torch.arange(1, t + 1).view(-1, 1)
    assert torch.allclose(top_mass(uniform, 1.0), torch.ones(t))
    one_hot = torch.zeros(t, t)
    one_hot[:, 0] = 1.0
    assert torch.allclose(top_mass(one_hot, 0.1), torch.ones(t))
    # uniform row t keeps ceil(0.5 (t+1)) / (t+1)
    ref = torch.tensor([math.ceil(0.5 * (r + 1)) / (r + 1) for r in range(t)])
    assert torch.allclose(top_mass(uniform, 0.5), ref)
    with pytest.raises(ValueError, match="fraction must be > 0"):
        top_mass(uniform, 0.0)
    with pytest.raises(ValueError, match="square"):
        top_mass(torch.zeros(3, 4), 0.5)


@settings(max_examples=30, deadline=None)
@given(t=st.integers(3, 20), seed=st.integers(0, 2**16), lag=st.integers(1, 5))
def test_persistence_and_overlap_match_sets(t, seed, lag):
    a = causal_attention_rows((), t, seed)
    imp = important_sets(a)
    sets = [{j for j in range(r + 1) if float(a[r, j]) >= 1.0 / (r + 1)} for r in range(t)]
    assert [set(torch.nonzero(imp[r]).flatten().tolist()) for r in range(t)] == sets
    ratio = persistence_ratio(imp)
    for r in range(t - 1):
        later = {j for s in range(r + 1, t) for j in sets[s] if j <= r}
        if later:
            assert abs(float(ratio[r]) - len(sets[r] & later) / len(later)) < 1e-12
        else:
            assert math.isnan(float(ratio[r]))
    if lag < t:
        ov = lagged_overlap(imp, lag)
        for r in range(t - lag):
            later = {j for j in sets[r + lag] if j <= r}
            expect = len(sets[r] & later) / len(later) if later else math.nan
            assert (math.isnan(expect) and math.isnan(float(ov[r]))) or abs(float(ov[r]) - expect) < 1e-12
    sizes = set_size_ratio(imp)
    assert torch.allclose(sizes, torch.tensor([len(s) / (r + 1) for r, s in enumerate(sets)], dtype=torch.float64))


def test_random_sets_sizes_visibility_and_baseline():
    t = 48
    a = causal_attention_rows((6,), t, 0)
    imp = important_sets(a)
    rnd = random_sets(imp, torch.Generator().manual_seed(0))
    assert torch.equal(rnd.sum(-1), imp.sum(-1))
    assert not bool((rnd & ~torch.ones(t, t, dtype=torch.bool).tril()).any())
    # Averaged over many draws, the overlap of random sets approaches |I_t|/(t+1) (the analytic baseline).
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([lagged_overlap(random_sets(imp, g), 1) for _ in range(200)])
    mean = draws.nanmean(0)[..., t // 2 :]
    expect = set_size_ratio(imp)[..., t // 2 : t - 1]
    assert float((mean - expect).abs().mean()) < 0.03
    with pytest.raises(ValueError, match="lag must be < T"):
        lagged_overlap(imp, t)


def test_persistence_of_a_fixed_set_is_one_and_random_is_not():
    """Rows that always favour tokens {0, 3}: persistence 1, far above a random set of the same size."""
    t = 40
    a = torch.zeros(t, t, dtype=torch.float64)
    for r in range(t):
        fav = [j for j in (0, 3) if j <= r]
        a[r, : r + 1] = 0.01 / (r + 1)
        a[r, fav] += (1 - a[r, : r + 1].sum()) / len(fav)
    imp = important_sets(a)
    ratio = persistence_ratio(imp)
    assert torch.allclose(ratio[4:], torch.ones(t - 5, dtype=torch.float64))
    base = persistence_ratio(random_sets(imp, torch.Generator().manual_seed(0)))
    assert float(base[20:].nanmean()) < 0.5


def test_recorder_records_the_attention_it_computes():
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 2, 7, 4, generator=g), torch.randn(1, 2, 7, 4, generator=g)
    q = torch.randn(1, 6, 7, 4, generator=g)
    pos = torch.arange(7)
    rec, rec_q = AttentionRecorder(), AttentionRecorder(per_query_head=True)
    for r in (rec, rec_q):
        r.update(k[:, :, :5], v[:, :, :5], pos[:5])
        r.attend(q[:, :, :5], pos[:5], 0.5)
        r.update(k[:, :, 5:], v[:, :, 5:], pos[5:])
        r.attend(q[:, :, 5:], pos[5:], 0.5)
    _, w = grouped_attention(q, k, v, pos, pos, 0.5)  # (1, 6, 7, 7)
    torch.testing.assert_close(rec_q.attention(), w)
    torch.testing.assert_close(rec.attention(), w.view(1, 2, 3, 7, 7).mean(2))
    with pytest.raises(RuntimeError, match="nothing recorded"):
        AttentionRecorder().attention()
