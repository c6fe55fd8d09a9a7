"""Tests of refimpl.eviction.policies: the eviction caches against a naive reference and their invariants."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.caches import make_caches
from refimpl.eviction import (
    EvictionCache,
    H2OCache,
    ScissorhandsCache,
    SlidingWindowCache,
    StreamingLLMCache,
    kv_head_attention,
)
from refimpl.llm.cache import FullCache

POLICIES = ["scissorhands", "h2o", "streamingllm", "window"]


def small_kwargs(name: str, budget: int) -> dict:
    """Constructor arguments valid for small budgets (the paper defaults need budget >= 15)."""
    if name == "scissorhands":
        return {"budget": budget, "history_window": 5, "recent": 2, "drop_fraction": 0.25}
    if name == "streamingllm":
        return {"budget": budget, "sink_tokens": 2, "rope_base": 10000.0}
    return {"budget": budget}


def make(name: str, **kwargs) -> EvictionCache:
    return make_caches(name, 1, **kwargs)[0]


# ---- a synthetic driver: random steps through attend(), or synthetic attention through observe() ----------


def drive_attend(cache, chunks, b=2, h_q=4, h_kv=2, d=8, seed=0, dtype=torch.float64):
    """Feed random k, v, q in chunks of ``chunks[i]`` tokens through ``update``/``attend``; return outputs."""
    g = torch.Generator().manual_seed(seed)
    outs, pos = [], 0
    for n in chunks:
        k = torch.randn(b, h_kv, n, d, generator=g, dtype=dtype)
        v = torch.randn(b, h_kv, n, d, generator=g, dtype=dtype)
        q = torch.randn(b, h_q, n, d, generator=g, dtype=dtype)
        p = torch.arange(pos, pos + n)
        cache.update(k, v, p)
        outs.append(cache.attend(q, p, 1.0 / math.sqrt(d)))
        pos += n
    return outs


def dyadic_weights(cache, q_pos, h_q, g):
    """Synthetic attention ``(B, H_q, T_new, T)`` on the cache's tokens: multiples of 2^-10, zero where a
    query cannot see a token (so float32 sums and group means are exact and ties are exact)."""
    kp = cache.key_positions()  # (B, H_kv, T)
    b, h_kv, t = kp.shape
    grp = h_q // h_kv
    w = torch.randint(0, 64, (b, h_q, len(q_pos), t), generator=g).double() / 1024
    vis = kp.repeat_interleave(grp, dim=1).unsqueeze(2) <= q_pos.view(1, 1, -1, 1)  # (B, H_q, T_new, T)
    return (w * vis).float()


class NaivePolicy:
    """Reference: one Python list of tokens per (sequence, KV head), decisions by sorting (priority, position).

    Implements the same rules as the module docstring, independently: statistics in float64 per token, the
    group mean per KV head, the uniform level 1/t per query row, eviction after each step.
    """

    def __init__(self, name, b, h_kv, **kw):
        self.name, self.kw = name, kw
        self.budget = kw["budget"]
        if name == "scissorhands":
            self.w, self.recent = kw["history_window"], kw["recent"]
            self.m = max(1, int(kw["drop_fraction"] * self.budget))
            self.sinks = 0
        elif name == "h2o":
            self.recent, self.m, self.sinks = kw.get("recent", self.budget // 2), 1, 0
        elif name == "streamingllm":
            self.sinks = kw["sink_tokens"]
            self.recent, self.m = self.budget - self.sinks, 1
        else:
            self.recent, self.m, self.sinks = self.budget, 1, 0
        self.heads = {(i, j): [] for i in range(b) for j in range(h_kv)}  # token dicts in position order
        self.rows = 0

    def add(self, positions):
        for toks in self.heads.values():
            toks.extend({"pos": p, "score": 0.0, "flags": {}} for p in positions)

    def observe(self, weights, q_pos):
        b, h_q, t_new, _ = weights.shape
        h_kv = len({j for (_, j) in self.heads})
        grp = h_q // h_kv
        for (i, j), toks in self.heads.items():
            for r in range(t_new):
                row = [sum(float(weights[i, j * grp + gg, r, c]) for gg in range(grp)) / grp for c in range(len(toks))]
                vis = [tok["pos"] <= int(q_pos[r]) for tok in toks]
                t = sum(vis)
                for c, tok in enumerate(toks):
                    tok["score"] += row[c]
                    tok["flags"][self.rows + r] = vis[c] and row[c] < 1.0 / t
        self.rows += t_new
        for key, toks in self.heads.items():
            if len(toks) > self.budget:
                self.heads[key] = self._evict(toks, max(len(toks) - self.budget, self.m))

    def priority(self, tok):
        if self.name == "scissorhands":
            return -sum(f for r, f in tok["flags"].items() if r >= self.rows - self.w)
        if self.name == "h2o":
            return tok["score"]
        return tok["pos"]

    def _evict(self, toks, n_drop):
        n = len(toks)
        cand = [c for c, tok in enumerate(toks) if c < n - self.recent and tok["pos"] >= self.sinks]
        cand.sort(key=lambda c: (self.priority(toks[c]), toks[c]["pos"]))
        drop = set(cand[:n_drop])
        return [tok for c, tok in enumerate(toks) if c not in drop]

    def kept(self, i, j):
        return [tok["pos"] for tok in self.heads[(i, j)]]


# ---- against the naive reference --------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(POLICIES),
    budget=st.integers(6, 12),
    chunks=st.lists(st.integers(1, 4), min_size=3, max_size=14),
    grp=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 2**16),
)
def test_matches_naive_reference(name, budget, chunks, grp, seed):
    """Kept positions after every step equal those of an independent per-head Python implementation."""
    b, h_kv = 2, 2
    h_q = h_kv * grp
    kw = small_kwargs(name, budget)
    cache, ref = make(name, **kw), NaivePolicy(name, b, h_kv, **kw)
    g = torch.Generator().manual_seed(seed)
    pos = 0
    for n in chunks:
        p = torch.arange(pos, pos + n)
        cache.update(torch.randn(b, h_kv, n, 4), torch.randn(b, h_kv, n, 4), p)
        ref.add(p.tolist())
        w = dyadic_weights(cache, p, h_q, g)
        cache.observe(w, p)
        ref.observe(w, p)
        kp = cache.key_positions()
        for i in range(b):
            for j in range(h_kv):
                assert kp[i, j].tolist() == ref.kept(i, j), (name, i, j, pos)
        pos += n


def test_scissorhands_hand_computed_argmin():
    """B=4, r=1, w=3, m=1: the evicted token is the argmax of unimportant steps (ties: the older one)."""
    c = ScissorhandsCache(budget=4, history_window=3, recent=1, drop_fraction=0.0)
    k = torch.zeros(1, 1, 1, 2)
    # Steps 0..3 fill the cache (no eviction: 4 tokens <= budget). Rows are written by hand, one KV head.
    rows = {
        0: [1.0],
        1: [0.8, 0.2],  # t=2, level 0.5: token 1 unimportant
        2: [0.1, 0.1, 0.8],  # t=3, level 1/3: tokens 0, 1 unimportant
        3: [0.5, 0.1, 0.2, 0.2],  # t=4, level 1/4: tokens 1, 2, 3 unimportant
    }
    for t, row in rows.items():
        c.update(k, k, torch.tensor([t]))
        c.observe(torch.tensor(row).view(1, 1, 1, -1), torch.tensor([t]))
    # History window w=3 holds steps 1..3: counts token0: 1 (step 2), token1: 3, token2: 1, token3: 1.
    assert c.unimportance()[0, 0].tolist() == [1, 3, 1, 1]
    assert c.key_positions()[0, 0].tolist() == [0, 1, 2, 3]
    # Step 4: 5 tokens > B. Row: level 1/5 = 0.2; below: tokens 1 (0.05), 2 (0.05). Window = steps 2..4:
    # token0: 1 (step 2) + 0 + 0 = 1; token1: 1 + 1 + 1 = 3; token2: 0 + 1 + 1 = 2; token3: 0 + 1 + 0 = 1;
    # token4 is the protected most recent. argmax of unimportance = token 1 -> evicted.
    c.update(k, k, torch.tensor([4]))
    c.observe(torch.tensor([0.3, 0.05, 0.05, 0.3, 0.3]).view(1, 1, 1, -1), torch.tensor([4]))
    assert c.key_positions()[0, 0].tolist() == [0, 2, 3, 4]
    # Step 5: level 1/5 = 0.2; below: token0 (0.1), token3 (0.1). Window = steps 3..5:
    # token0: 0 + 0 + 1 = 1; token2: 1 + 1 + 0 = 2; token3: 1 + 0 + 1 = 2; token4 (not recent now): 0.
    # Tie between tokens 2 and 3 at 2: the older (token 2) goes.
    c.update(k, k, torch.tensor([5]))
    c.observe(torch.tensor([0.1, 0.4, 0.1, 0.2, 0.2]).view(1, 1, 1, -1), torch.tensor([5]))
    assert c.key_positions()[0, 0].tolist() == [0, 3, 4, 5]


def test_h2o_hand_computed_argmin():
    """B=3, recent=1: the evicted token has the smallest accumulated attention outside the recent window."""
    c = H2OCache(budget=3, recent=1)
    k = torch.zeros(1, 1, 1, 2)
    rows = [[1.0], [0.25, 0.75], [0.5, 0.25, 0.25], [0.5, 0.125, 0.25, 0.125]]
    for t, row in enumerate(rows):
        c.update(k, k, torch.tensor([t]))
        c.observe(torch.tensor(row).view(1, 1, 1, -1), torch.tensor([t]))
    # Scores before eviction: [2.25, 1.125, 0.5, 0.125]; token 3 is recent; argmin of {0, 1, 2} = token 2.
    assert c.key_positions()[0, 0].tolist() == [0, 1, 3]
    assert c._priority()[0, 0].tolist() == [2.25, 1.125, 0.125]


def test_gqa_granularity_per_kv_head():
    """Two KV heads whose query groups attend to different tokens keep different tokens."""
    c = H2OCache(budget=2, recent=1)
    k = torch.zeros(1, 2, 1, 2)
    for t in range(3):
        c.update(k, k, torch.tensor([t]))
        w = torch.zeros(1, 4, 1, t + 1)
        w[:, :2, 0, 0] = 1.0  # query heads 0, 1 (KV head 0) look at token 0
        w[:, 2:, 0, min(1, t)] = 1.0  # query heads 2, 3 (KV head 1) look at token 1
        c.observe(w, torch.tensor([t]))
    assert c.key_positions()[0].tolist() == [[0, 2], [1, 2]]


def test_kv_head_attention_is_group_mean():
    g = torch.Generator().manual_seed(1)
    w = torch.rand(2, 6, 3, 5, generator=g, dtype=torch.float64)
    ref = torch.stack([w[:, 3 * j : 3 * j + 3].mean(1) for j in range(2)], dim=1)
    torch.testing.assert_close(kv_head_attention(w, 2), ref, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="multiple of h_kv"):
        kv_head_attention(w, 4)


# ---- invariants through real attention ----------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(POLICIES),
    budget=st.integers(6, 16),
    chunks=st.lists(st.integers(1, 5), min_size=1, max_size=16),
    grp=st.sampled_from([1, 3]),
    seed=st.integers(0, 2**16),
)
def test_budget_recent_sinks_and_positions(name, budget, chunks, grp, seed):
    """Never above budget between steps; the protected tokens are held; each kept row is its original k, v."""
    b, h_kv, d = 2, 2, 4
    cache = make(name, **small_kwargs(name, budget))
    g = torch.Generator().manual_seed(seed)
    all_k, all_v, pos = [], [], 0
    for n in chunks:
        k, v = torch.randn(b, h_kv, n, d, generator=g), torch.randn(b, h_kv, n, d, generator=g)
        p = torch.arange(pos, pos + n)
        cache.update(k, v, p)
        cache.attend(torch.randn(b, h_kv * grp, n, d, generator=g), p, 0.5)
        all_k.append(k)
        all_v.append(v)
        pos += n
        kp = cache.key_positions()  # (B, H_kv, T)
        assert len(cache) <= budget and kp.shape[-1] == len(cache)
        assert bool((kp[..., 1:] > kp[..., :-1]).all()), "positions stay in increasing order"
        recent = set(range(max(pos - cache.recent, 0), pos))
        sinks = set(range(min(cache.sink_tokens, pos)))
        for row in kp.reshape(-1, kp.shape[-1]).tolist():
            assert recent <= set(row), f"recent tokens {sorted(recent)} missing from {row}"
            assert sinks <= set(row)
        kk, vv = cache.keys_values()
        ref_k = torch.cat(all_k, dim=2).gather(2, kp.unsqueeze(-1).expand(-1, -1, -1, d))
        ref_v = torch.cat(all_v, dim=2).gather(2, kp.unsqueeze(-1).expand(-1, -1, -1, d))
        assert torch.equal(kk, ref_k) and torch.equal(vv, ref_v)
        assert cache.tokens_seen - cache.tokens_evicted == len(cache)


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(POLICIES),
    chunks=st.lists(st.integers(1, 6), min_size=1, max_size=8),
    extra=st.integers(0, 5),
    seed=st.integers(0, 2**16),
)
def test_budget_at_least_length_equals_full_cache(name, chunks, extra, seed):
    """With B >= sequence length nothing is evicted and attention outputs equal the full cache's: exactly the
    same arithmetic as the base class's attention over every token, and the fused attention FullCache runs
    up to float64 rounding."""
    n = sum(chunks)
    budget = max(n + extra, 16)
    kw = small_kwargs(name, budget) if name != "scissorhands" else {"budget": budget}
    out = drive_attend(make(name, **kw), chunks, seed=seed)
    ref = drive_attend(_UnfusedFullCache(), chunks, seed=seed)
    fused = drive_attend(FullCache(), chunks, seed=seed)
    for a, r, f in zip(out, ref, fused):
        assert torch.equal(a, r)
        torch.testing.assert_close(a, f, rtol=1e-12, atol=1e-12)


class _UnfusedFullCache(FullCache):
    """Every token, attended by the base class's :func:`~refimpl.llm.cache.grouped_attention` (no observer)."""

    needs_attention = True


@pytest.mark.parametrize("name", POLICIES)
def test_nbytes_are_the_tensors_held(name):
    cache = make(name, **small_kwargs(name, 8))
    assert cache.nbytes() == 0
    drive_attend(cache, [5, 1, 1, 3, 1, 1], b=2, h_kv=2, d=8, dtype=torch.float32)
    kk, vv = cache.keys_values()
    t = len(cache)
    assert cache.nbytes() == 2 * 2 * 2 * t * 8 * 4
    # The storage really is that size (no hidden capacity): the held tensors own exactly these bytes.
    held = sum(x.untyped_storage().nbytes() for x in cache._store.values())
    assert held == cache.nbytes()
    assert {x.untyped_storage().data_ptr() for x in (kk, vv)} == {
        x.untyped_storage().data_ptr() for x in cache._store.values()
    }


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantized_storage_bytes_and_error(bits):
    """Codes + fp16 scale/zero per group of 32 channels; reconstruction within half a step of each group."""
    from refimpl.kivi.quant import quantize

    cache = ScissorhandsCache(budget=16, history_window=8, recent=2, drop_fraction=0.25, bits=bits, group_size=32)
    g = torch.Generator().manual_seed(0)
    b, h, d = 1, 2, 64
    ks = []
    for t in range(24):
        k = torch.randn(b, h, 1, d, generator=g)
        ks.append(k)
        cache.update(k, k, torch.tensor([t]))
        cache.attend(torch.randn(b, 2 * h, 1, d, generator=g), torch.tensor([t]), 0.125)
    t_held = len(cache)
    # per token and head: D * bits / 8 bytes of codes + (D / 32) groups * 2 stats * 2 bytes, for k and v
    per_token = 2 * (d * bits // 8 + (d // 32) * 2 * 2)
    assert cache.nbytes() == b * h * t_held * per_token
    held = sum(x.untyped_storage().nbytes() for x in cache._store.values())
    assert held == cache.nbytes()
    kk, _ = cache.keys_values()
    kp = cache.key_positions()
    orig = torch.cat(ks, dim=2).gather(2, kp.unsqueeze(-1).expand(-1, -1, -1, d))
    q = quantize(orig, bits, 32, "token")
    bound = q.scale.float().repeat_interleave(32, dim=-1) / 2 + 1e-6  # (B, H, T, D)
    assert bool(((kk - orig).abs() <= bound).all())
    assert float((kk - orig).abs().max()) > 0  # really quantized


def test_unimportance_matches_log_with_ring_wraparound():
    """A prefill longer than w, then steps: the count is over exactly the last w query rows."""
    w = 3
    c = ScissorhandsCache(budget=64, history_window=w, recent=1, drop_fraction=0.0)
    g = torch.Generator().manual_seed(3)
    log = []  # (row weights over positions 0..63, t)
    pos = 0
    for n in [5, 1, 2, 1, 4]:
        p = torch.arange(pos, pos + n)
        c.update(torch.zeros(1, 1, n, 2), torch.zeros(1, 1, n, 2), p)
        wts = dyadic_weights(c, p, 1, g)  # (1, 1, n, T)
        c.observe(wts, p)
        for r in range(n):
            log.append((wts[0, 0, r].double(), int(p[r]) + 1))
        pos += n
    ref = torch.zeros(pos, dtype=torch.long)
    for row, t in log[-w:]:
        vis = torch.arange(pos) < t
        ref += (vis & (row < 1.0 / t)).long()
    assert c.unimportance()[0, 0].tolist() == ref.tolist()


def test_prefill_equals_steps_statistics():
    """Statistics do not depend on chunking: one prefill of T tokens equals T single steps (no eviction)."""
    g = torch.Generator().manual_seed(5)
    k = torch.randn(1, 2, 12, 4, generator=g)
    q = torch.randn(1, 4, 12, 4, generator=g)
    for cls, kw in [(ScissorhandsCache, {"history_window": 7}), (H2OCache, {})]:
        one, many = cls(budget=20, **kw), cls(budget=20, **kw)
        one.update(k, k, torch.arange(12))
        one.attend(q, torch.arange(12), 0.5)
        for t in range(12):
            many.update(k[:, :, t : t + 1], k[:, :, t : t + 1], torch.tensor([t]))
            many.attend(q[:, :, t : t + 1], torch.tensor([t]), 0.5)
        for name in one._state:
            torch.testing.assert_close(one._state[name], many._state[name], rtol=1e-5, atol=1e-6)


def test_scissorhands_drops_m_at_once():
    c = ScissorhandsCache(budget=20, history_window=50, recent=3, drop_fraction=0.5)
    assert c.drop == 10
    sizes = []
    g = torch.Generator().manual_seed(0)
    for t in range(45):
        kk = torch.randn(1, 1, 1, 4, generator=g)
        c.update(kk, kk, torch.tensor([t]))
        c.attend(torch.randn(1, 1, 1, 4, generator=g), torch.tensor([t]), 1.0)
        sizes.append(len(c))
    assert max(sizes) == 20 and min(sizes[20:]) == 11  # 21 held at the step, 10 dropped


# ---- bad inputs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", POLICIES)
def test_missing_budget_is_a_clear_error(name):
    with pytest.raises(ValueError, match="budget"):
        make_caches(name, 2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="cache name"):
        make_caches("lru", 2, budget=8)
    with pytest.raises(ValueError, match="budget must cover the protected"):
        ScissorhandsCache(budget=8, recent=10)
    with pytest.raises(ValueError, match="budget must cover the protected"):
        H2OCache(budget=4, recent=6)
    with pytest.raises(ValueError, match="history_window must be >= 1"):
        ScissorhandsCache(budget=64, history_window=0)
    with pytest.raises(ValueError, match="history_window must be >= 1"):
        ScissorhandsCache(budget=64, history_window=-3)
    with pytest.raises(ValueError, match="drop_fraction must be <= 1"):
        ScissorhandsCache(budget=64, drop_fraction=1.5)
    with pytest.raises(ValueError, match="budget must be >= 1"):
        SlidingWindowCache(budget=0)
    with pytest.raises(TypeError, match="budget must be an int"):
        SlidingWindowCache(budget=0.5)
    with pytest.raises(ValueError, match="exceed sink_tokens"):
        StreamingLLMCache(budget=4, sink_tokens=4)
    with pytest.raises(ValueError, match="rope_base=model.config.rope_base"):
        StreamingLLMCache(budget=8)
    with pytest.raises(ValueError, match="positions"):
        StreamingLLMCache(budget=8, positions="rolling", rope_base=1e4)
    with pytest.raises(ValueError, match="rope_base must be > 1.0"):
        StreamingLLMCache(budget=8, rope_base=0.5)
    with pytest.raises(ValueError, match="bits must be one of"):
        H2OCache(budget=8, bits=3)
    with pytest.raises(ValueError, match="group_size"):
        H2OCache(budget=8, bits=4, group_size=3)


def test_bad_steps():
    c = H2OCache(budget=8)
    k = torch.zeros(1, 1, 2, 4)
    with pytest.raises(RuntimeError, match="empty"):
        c.keys_values()
    with pytest.raises(ValueError, match="strictly increasing"):
        c.update(k, k, torch.tensor([3, 3]))
    c.update(k, k, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="follow the cached"):
        c.update(k, k, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="keep"):
        c.update(torch.zeros(2, 1, 1, 4), torch.zeros(2, 1, 1, 4), torch.tensor([2]))
    with pytest.raises(ValueError, match="weights must be"):
        c.observe(torch.zeros(1, 1, 1, 5), torch.tensor([1]))
    with pytest.raises(ValueError, match="multiple of group_size"):
        H2OCache(budget=8, bits=4, group_size=32).update(k[:, :, :1], k[:, :, :1], torch.tensor([0]))


def test_weight_at_uniform_level_is_important():
    """The criterion is ``a < 1/t`` for unimportant: a weight exactly at 1/t counts as important."""
    c = ScissorhandsCache(budget=8, history_window=4, recent=1, drop_fraction=0.0)
    k = torch.zeros(1, 1, 4, 2)
    c.update(k, k, torch.arange(4))
    w = torch.zeros(1, 1, 4, 4)
    w[0, 0, 3] = torch.tensor([0.25, 0.25, 0.125, 0.375])  # row 3: t = 4, level 1/4
    w[0, 0, :3] = torch.tril(torch.ones(3, 4)) / torch.arange(1, 4).view(-1, 1)  # uniform rows: all important
    c.observe(w, torch.arange(4))
    assert c.unimportance()[0, 0].tolist() == [0, 0, 1, 0]


# ---- StreamingLLM's positions inside the cache (Xiao et al. 2024, sec. 3.2) -------------------------------


def _rope(x, positions, base):
    """Independent RoPE ("rotate half" layout) of ``x: (..., T, D)`` at ``positions: (T,)``, in float64."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (D/2,)
    ang = positions.double()[:, None] * inv[None, :]  # (T, D/2)
    c, s = ang.cos(), ang.sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


@settings(max_examples=25, deadline=None)
@given(
    sinks=st.integers(0, 3),
    window=st.integers(2, 6),
    chunks=st.lists(st.integers(1, 4), min_size=1, max_size=10),
    grp=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_streamingllm_attends_at_positions_in_the_cache(sinks, window, chunks, grp, seed):
    """Default ``positions="in_cache"``: each step equals attention with keys rotated at their index in the cache
    and queries at the index their token takes (the released pos_shift code), computed here from unrotated
    keys; ``positions="original"`` equals attention at the original positions. They agree until the first
    eviction and differ after it when sinks are kept (a contiguous window only shifts every distance by 0)."""
    b, h_kv, d, base = 1, 2, 8, 500.0
    h_q, budget = h_kv * grp, sinks + window
    g = torch.Generator().manual_seed(seed)
    caches = {
        "in_cache": StreamingLLMCache(budget, sinks, rope_base=base),
        "original": StreamingLLMCache(budget, sinks, positions="original"),
    }
    k0_all, v_all, pos, evicted = [], [], 0, False
    for n in chunks:
        k0 = torch.randn(b, h_kv, n, d, generator=g, dtype=torch.float64)  # before RoPE
        v = torch.randn(b, h_kv, n, d, generator=g, dtype=torch.float64)
        q0 = torch.randn(b, h_q, n, d, generator=g, dtype=torch.float64)
        p = torch.arange(pos, pos + n)
        k0_all.append(k0)
        v_all.append(v)
        held = caches["in_cache"].key_positions()[0, 0].tolist() if pos else []
        held = held + p.tolist()  # what this step attends over: the kept tokens and the new ones
        out = {}
        for name, c in caches.items():
            c.update(_rope(k0, p, base), v, p)  # the model rotates at the original positions
            out[name] = c.attend(_rope(q0, p, base), p, 0.5)
        kk0, vv = torch.cat(k0_all, dim=2)[:, :, held], torch.cat(v_all, dim=2)[:, :, held]
        t = len(held)
        for name, q_at, k_at in (
            ("in_cache", torch.arange(t - n, t), torch.arange(t)),
            ("original", p, torch.tensor(held)),
        ):
            q, k = _rope(q0, q_at, base), _rope(kk0, k_at, base).repeat_interleave(grp, dim=1)
            sc = q @ k.transpose(-1, -2) * 0.5
            sc = sc.masked_fill(torch.tensor(held)[None, :] > p[:, None], float("-inf"))
            want = torch.softmax(sc, -1) @ vv.repeat_interleave(grp, dim=1)
            # 1e-6: the cache re-rotates with the model's RoPE table, which is float32
            torch.testing.assert_close(out[name], want, rtol=1e-6, atol=1e-6)
        if not evicted or sinks == 0:
            torch.testing.assert_close(out["in_cache"], out["original"], rtol=1e-6, atol=1e-6)
        elif held[sinks] > sinks:  # a gap between the sinks and the window: distances differ
            assert float((out["in_cache"] - out["original"]).abs().max()) > 1e-5
        evicted = evicted or t > budget
        pos += n


# ---- the book's defaults and the realised compression ------------------------------------------------------


def test_scissorhands_default_drops_one_token_per_step():
    """The default drop amount is m = 1 (``drop_fraction=0``), the value the chapter picks on ``eval`` and
    confirms on ``heldout``: once full, the cache holds exactly B tokens after every decode step (no
    saw-tooth), while ``drop_fraction=0.4`` drops ``int(0.4 B)`` at once."""
    assert ScissorhandsCache(budget=32).drop == 1
    assert ScissorhandsCache(budget=32, drop_fraction=0.4).drop == 12
    g = torch.Generator().manual_seed(0)
    sizes = {0.0: [], 0.4: []}
    for frac, held in sizes.items():
        c = ScissorhandsCache(budget=20, history_window=8, drop_fraction=frac)
        for t in range(60):
            kv = torch.randn(1, 1, 1, 4, generator=g)
            c.update(kv, kv, torch.tensor([t]))
            c.attend(torch.randn(1, 1, 1, 4, generator=g), torch.tensor([t]), 0.5)
            held.append(len(c))
    assert sizes[0.0][20:] == [20] * 40
    assert min(sizes[0.4][20:]) == 20 - 8 + 1 and max(sizes[0.4]) == 20  # saw-tooth from B - m + 1 to B


def test_realised_compression_is_the_ratio_of_mean_tokens_held():
    from types import SimpleNamespace

    from refimpl.eviction.experiments import realised_compression

    full = SimpleNamespace(cache_tokens=[4.0, 5.0, 6.0, 7.0], mean_cache_tokens=5.5)
    run = SimpleNamespace(cache_tokens=[2.0, 2.0, 2.0, 2.0], mean_cache_tokens=2.0)
    assert realised_compression(run, full) == 5.5 / 2.0
    with pytest.raises(ValueError, match="one evaluation"):
        realised_compression(SimpleNamespace(cache_tokens=[2.0], mean_cache_tokens=2.0), full)
    with pytest.raises(ValueError, match="must hold tokens"):
        realised_compression(SimpleNamespace(cache_tokens=[0.0] * 4, mean_cache_tokens=0.0), full)
