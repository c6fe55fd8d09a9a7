"""Contract tests of the KV-cache interface (refimpl.llm.cache); no model file needed."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.llm.cache import FULL_PRECISION_PREFILL, FullCache, KVCache, check_step, grouped_attention, make_caches
from refimpl.llm.model import causal_attention


def naive_attention(q, k, v, q_pos, k_pos, scale):
    """Float64 reference: loop over batch, query head, query; key j visible iff k_pos[j] <= q_pos[i]."""
    b, h_q, t_q, d = q.shape
    h_kv, t_k = k.shape[1], k.shape[2]
    g = h_q // h_kv
    out = torch.zeros(b, h_q, t_q, d, dtype=torch.float64)
    w_all = torch.zeros(b, h_q, t_q, t_k, dtype=torch.float64)
    for bi in range(b):
        for h in range(h_q):
            hk = h // g
            kp = k_pos if k_pos.dim() == 1 else k_pos[bi, hk]
            for i in range(t_q):
                vis = [j for j in range(t_k) if kp[j] <= q_pos[i]]
                if not vis:
                    continue
                s = torch.tensor([float(q[bi, h, i].double() @ k[bi, hk, j].double()) * scale for j in vis])
                w = torch.softmax(s, 0)
                for w_j, j in zip(w, vis):
                    out[bi, h, i] += w_j * v[bi, hk, j].double()
                    w_all[bi, h, i, j] = w_j
    return out, w_all


# Grouped-query attention shapes: batch b, h_kv KV heads of g query heads each, t_q queries, t_k keys, head size d.
GQA_SHAPES = {
    "b": st.integers(1, 2),
    "h_kv": st.integers(1, 3),
    "g": st.integers(1, 3),
    "t_q": st.integers(1, 4),
    "t_k": st.integers(1, 6),
    "d": st.sampled_from([1, 4, 8]),
    "seed": st.integers(0, 1000),
}


def random_qkv(b, h_kv, g, t_q, t_k, d, seed):
    """``q: (b, h_kv g, t_q, d)``, ``k, v: (b, h_kv, t_k, d)`` from a seeded generator, and that generator."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h_kv * g, t_q, d, generator=gen)
    k = torch.randn(b, h_kv, t_k, d, generator=gen)
    v = torch.randn(b, h_kv, t_k, d, generator=gen)
    return q, k, v, gen


@settings(max_examples=30, deadline=None)
@given(**GQA_SHAPES, per_head=st.booleans())
def test_grouped_attention_matches_naive(b, h_kv, g, t_q, t_k, d, per_head, seed):
    q, k, v, gen = random_qkv(b, h_kv, g, t_q, t_k, d, seed)
    # cached tokens at arbitrary (e.g. evicted, unsorted) positions; queries at the latest positions
    if per_head:
        k_pos = torch.randint(0, 10, (b, h_kv, t_k), generator=gen)
    else:
        k_pos = torch.randperm(10, generator=gen)[:t_k] if t_k <= 10 else torch.arange(t_k)
    q_pos = torch.arange(10 - t_q, 10) - torch.randint(0, 4, (1,), generator=gen)
    scale = 1 / math.sqrt(d)
    out, w = grouped_attention(q, k, v, q_pos, k_pos, scale)
    ref_out, ref_w = naive_attention(q, k, v, q_pos, k_pos, scale)
    assert out.shape == (b, h_kv * g, t_q, d) and w.shape == (b, h_kv * g, t_q, t_k)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.double(), ref_w, rtol=1e-5, atol=1e-6)


def test_grouped_attention_query_without_keys_is_zero():
    q = torch.randn(1, 2, 1, 4)
    k, v = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    out, w = grouped_attention(q, k, v, torch.tensor([0]), torch.tensor([5, 6, 7]), 0.5)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(w, torch.zeros_like(w))
    assert not torch.isnan(out).any()


def fill(cache: KVCache, k: torch.Tensor, v: torch.Tensor, chunks: list[int]) -> None:
    pos = 0
    for c in chunks:
        cache.update(k[:, :, pos : pos + c], v[:, :, pos : pos + c], torch.arange(pos, pos + c))
        pos += c


@settings(max_examples=30, deadline=None)
@given(
    chunks=st.lists(st.integers(1, 7), min_size=1, max_size=8),
    capacity=st.integers(1, 8),
    b=st.integers(1, 2),
    h=st.integers(1, 3),
)
def test_full_cache_stores_every_token_in_order(chunks, capacity, b, h):
    t = sum(chunks)
    k, v = torch.randn(b, h, t, 4), torch.randn(b, h, t, 4)
    cache = FullCache(capacity=capacity)
    fill(cache, k, v, chunks)
    ck, cv = cache.keys_values()
    assert torch.equal(ck, k) and torch.equal(cv, v)
    assert torch.equal(cache.key_positions(), torch.arange(t))
    assert len(cache) == t
    assert cache.nbytes() == 2 * b * h * t * 4 * 4  # float32: keys + values of the filled part


def test_full_cache_appends_without_reallocating_within_capacity():
    cache = FullCache(capacity=16)
    k = torch.randn(1, 3, 10, 8)
    cache.update(k[:, :, :4], k[:, :, :4], torch.arange(4))
    ptr = cache.keys_values()[0].data_ptr()
    for i in range(4, 10):
        cache.update(k[:, :, i : i + 1], k[:, :, i : i + 1], torch.tensor([i]))
    assert cache.keys_values()[0].data_ptr() == ptr, "appending within capacity must not reallocate"
    cache.update(k, k, torch.arange(10, 20))  # grows (doubling) and keeps the content
    assert len(cache) == 20 and torch.equal(cache.keys_values()[0][:, :, :10], k)


def test_full_cache_dtype_and_nbytes_follow_the_input():
    cache = FullCache()
    assert cache.nbytes() == 0 and len(cache) == 0
    k = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    cache.update(k, k, torch.arange(5))
    assert cache.keys_values()[0].dtype == torch.float64
    assert cache.nbytes() == 2 * 2 * 3 * 5 * 8 * 8


def test_full_cache_attend_equals_causal_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 9, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    ref = causal_attention(q, k, v)
    cache = FullCache(capacity=2)
    cache.update(k[:, :, :5], v[:, :, :5], torch.arange(5))  # prefill of 5 tokens
    outs = [cache.attend(q[:, :, :5], torch.arange(5), 16**-0.5)]
    for t in range(5, 9):  # then 4 decode steps
        cache.update(k[:, :, t : t + 1], v[:, :, t : t + 1], torch.tensor([t]))
        outs.append(cache.attend(q[:, :, t : t + 1], torch.tensor([t]), 16**-0.5))
    torch.testing.assert_close(torch.cat(outs, dim=2), ref, rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(**GQA_SHAPES)
def test_full_cache_attend_matches_naive(b, h_kv, g, t_q, t_k, d, seed):
    """The fused attention of FullCache against the float64 loop, queries at any positions (some see no key)."""
    q, k, v, gen = random_qkv(b, h_kv, g, t_q, t_k, d, seed)
    k_pos = torch.arange(3, 3 + t_k)
    q_pos = torch.randint(0, 3 + t_k + 2, (t_q,), generator=gen)  # below 3: the query sees no key
    cache = FullCache(capacity=2)
    cache.update(k, v, k_pos)
    out = cache.attend(q, q_pos, 1 / math.sqrt(d))
    ref, _ = naive_attention(q, k, v, q_pos, k_pos, 1 / math.sqrt(d))
    assert out.shape == q.shape and not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_full_cache_subclass_that_observes_gets_the_weights():
    class Observer(FullCache):
        needs_attention = True

        def observe(self, weights, q_positions):
            self.seen = weights

    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 2, 5, 8)
    cache = Observer()
    cache.update(k, k, torch.arange(5))
    out = cache.attend(q, torch.tensor([3, 4]), 0.5)
    ref_out, ref_w = grouped_attention(q, k, k, torch.tensor([3, 4]), torch.arange(5), 0.5)
    assert torch.equal(out, ref_out) and torch.equal(cache.seen, ref_w)


def test_full_cache_truncate_rolls_back():
    torch.manual_seed(0)
    k, v = torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4)
    cache = FullCache(capacity=16)  # no growth: the rollback reuses the buffers
    cache.update(k[:, :, :6], v[:, :, :6], torch.arange(6))
    ptr = cache.keys_values()[0].data_ptr()
    cache.truncate(4)  # reject two tokens, e.g. a wrong speculative guess
    assert len(cache) == 4 and cache.nbytes() == 2 * 2 * 4 * 4 * 4
    assert torch.equal(cache.key_positions(), torch.arange(4))
    cache.update(k[:, :, 4:9], v[:, :, 4:9], torch.arange(4, 9))  # the accepted continuation
    ck, cv = cache.keys_values()
    assert torch.equal(ck, k) and torch.equal(cv, v) and torch.equal(cache.key_positions(), torch.arange(9))
    assert ck.data_ptr() == ptr, "truncating keeps the buffers"
    cache.truncate(0)
    assert len(cache) == 0 and cache.nbytes() == 0
    with pytest.raises(ValueError, match="length must be <= 0"):
        cache.truncate(1)
    with pytest.raises(ValueError, match="length must be >= 0"):
        cache.truncate(-1)
    with pytest.raises(NotImplementedError, match="truncate"):
        KVCache().truncate(0)


def test_full_cache_errors():
    cache = FullCache()
    with pytest.raises(RuntimeError, match="empty"):
        cache.keys_values()
    with pytest.raises(RuntimeError, match="empty"):
        cache.key_positions()
    cache.update(torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4), torch.arange(2))
    with pytest.raises(ValueError, match="batch and KV-head"):
        cache.update(torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4), torch.tensor([2]))


def test_make_caches_from_a_factory():
    caches = make_caches(FullCache, 4)
    assert len(caches) == 4 and all(isinstance(c, FullCache) for c in caches)
    assert len({id(c) for c in caches}) == 4, "one distinct cache per layer"
    assert make_caches(functools.partial(FullCache, capacity=3), 2)[0]._capacity == 3
    assert caches[0].prefill_key() == FULL_PRECISION_PREFILL and KVCache().prefill_key() is None
    with pytest.raises(TypeError, match="factory must be a callable"):
        make_caches("full", 2)  # the LLM knows no names: refimpl.caches maps them to factories
    with pytest.raises(TypeError, match="factory must return a KVCache"):
        make_caches(dict, 2)
    with pytest.raises(ValueError, match="n_layers must be >= 1"):
        make_caches(FullCache, 0)


def test_check_step_errors():
    k = torch.randn(1, 2, 3, 4)
    check_step(k, k, torch.arange(3))
    with pytest.raises(ValueError, match="same shape"):
        check_step(k, torch.randn(1, 2, 2, 4), torch.arange(3))
    with pytest.raises(ValueError, match="positions must have length"):
        check_step(k, k, torch.arange(2))
    with pytest.raises(ValueError, match="dimensions"):
        check_step(k[0], k[0], torch.arange(3))
