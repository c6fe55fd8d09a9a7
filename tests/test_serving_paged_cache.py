"""Tests of refimpl.serving.paged_cache: attention over gathered blocks equals FullCache attention, block
accounting (no leak, capacity never exceeded, copy-on-write of shared blocks) and the errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.llm.cache import FullCache, grouped_attention
from refimpl.serving.paged_cache import BlockAllocator, OutOfBlocksError, PagedKVPool

H_KV, G, D, LAYERS = 2, 3, 8, 2
SCALE = D**-0.5


def pool_for(num_blocks: int, block_size: int) -> PagedKVPool:
    return PagedKVPool(LAYERS, num_blocks, block_size, H_KV, D, dtype=torch.float64)


def blocks_in_use(pool: PagedKVPool) -> int:
    return pool.num_blocks - pool.num_free_blocks


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 20), min_size=1, max_size=4),
    block_size=st.integers(1, 8),
    chunk=st.integers(1, 7),
    seed=st.integers(0, 2**16),
)
def test_paged_attention_equals_full_cache(lengths, block_size, chunk, seed):
    """Sequences prefilled in interleaved chunks (so their blocks interleave in the pool), then one batched
    decode step at per-row positions: every layer's output equals a FullCache per sequence."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    need = sum(-(-(n + 1) // block_size) for n in lengths)
    pool = pool_for(need + 2, block_size)
    full = {s: [FullCache() for _ in range(LAYERS)] for s in range(len(lengths))}
    for s in full:
        pool.add_sequence(s)
    done = [0] * len(lengths)
    while any(done[s] < n for s, n in enumerate(lengths)):  # round-robin chunks
        for s, n in enumerate(lengths):
            t = min(chunk, n - done[s])
            if t == 0:
                continue
            pool.prepare([s], t)
            pos = torch.arange(done[s], done[s] + t)
            for layer, cache in enumerate(pool.caches()):
                k, v, q = rnd(1, H_KV, t, D), rnd(1, H_KV, t, D), rnd(1, H_KV * G, t, D)
                cache.update(k, v, pos)
                full[s][layer].update(k, v, pos)
                got = cache.attend(q, pos, SCALE)
                torch.testing.assert_close(got, full[s][layer].attend(q, pos, SCALE), rtol=1e-12, atol=1e-12)
            done[s] += t
    assert blocks_in_use(pool) == sum(-(-n // block_size) for n in lengths)
    assert pool.tokens_stored() == sum(lengths)
    # one decode step for all sequences together, each at its own position
    seqs = list(range(len(lengths)))
    pool.prepare(seqs, 1)
    pos = torch.tensor(lengths)[:, None]  # (B, 1)
    for layer, cache in enumerate(pool.caches()):
        b = len(seqs)
        k, v, q = rnd(b, H_KV, 1, D), rnd(b, H_KV, 1, D), rnd(b, H_KV * G, 1, D)
        cache.update(k, v, pos)
        got = cache.attend(q, pos, SCALE)
        for s in seqs:
            ref_cache = full[s][layer]
            ref_cache.update(k[s : s + 1], v[s : s + 1], pos[s])
            want = ref_cache.attend(q[s : s + 1], pos[s], SCALE)
            torch.testing.assert_close(got[s : s + 1], want, rtol=1e-12, atol=1e-12)
        # the KVCache interface's generic path (keys_values + key_positions) agrees too, padding included
        kk, vv = cache.keys_values()
        assert kk.shape == (b, H_KV, max(lengths) + 1, D) == vv.shape
        ref, _ = grouped_attention(q[:1], kk[:1], vv[:1], pos[0], cache.key_positions()[:1], SCALE)
        torch.testing.assert_close(got[:1], ref, rtol=1e-12, atol=1e-12)
    for s in seqs:
        pool.free_sequence(s)
    assert pool.num_free_blocks == pool.num_blocks  # nothing leaks
    assert all(pool.allocator.ref_count(b) == 0 for b in range(pool.num_blocks))


@settings(max_examples=40, deadline=None)
@given(
    steps=st.lists(st.lists(st.integers(0, 6), min_size=1, max_size=4), min_size=1, max_size=4),
    block_size=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_packed_steps_of_unequal_counts_equal_full_cache(steps, block_size, seed):
    """Steps that add a different number of tokens to each sequence (a prefill chunk beside single decode tokens,
    0: the sequence sits the step out), packed as one ``(1, N)`` row: every layer's output, per sequence, equals
    a FullCache of that sequence alone."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    n_seq = max(len(c) for c in steps)
    total = [sum(c[s] for c in steps if s < len(c)) for s in range(n_seq)]
    pool = pool_for(sum(-(-n // block_size) for n in total) + 1, block_size)
    full = {s: [FullCache() for _ in range(LAYERS)] for s in range(n_seq)}
    for s in full:
        pool.add_sequence(s)
    for counts in steps:
        seqs = [s for s, c in enumerate(counts) if c]
        if not seqs:
            continue
        n = [counts[s] for s in seqs]
        pool.prepare(seqs, n)
        starts = [pool.lengths[s] - c for s, c in zip(seqs, n)]
        pos = torch.cat([torch.arange(a, a + c) for a, c in zip(starts, n)])  # (N,), packed
        for layer, cache in enumerate(pool.caches()):
            k, v, q = rnd(1, H_KV, len(pos), D), rnd(1, H_KV, len(pos), D), rnd(1, H_KV * G, len(pos), D)
            cache.update(k, v, pos)
            got = cache.attend(q, pos, SCALE)  # (1, H_q, N, D)
            at = 0
            for s, a, c in zip(seqs, starts, n):
                ref = full[s][layer]
                ref.update(k[..., at : at + c, :], v[..., at : at + c, :], torch.arange(a, a + c))
                want = ref.attend(q[..., at : at + c, :], torch.arange(a, a + c), SCALE)
                torch.testing.assert_close(got[..., at : at + c, :], want, rtol=1e-12, atol=1e-12)
                at += c
    assert pool.tokens_stored() == sum(total)
    for s in range(n_seq):
        pool.free_sequence(s)
    assert pool.num_free_blocks == pool.num_blocks


def test_reserve_allocates_blocks_ahead_and_prepare_uses_them():
    pool = pool_for(4, 2)
    pool.add_sequence("a")
    pool.reserve("a", 5)  # 3 blocks, no token stored
    assert (pool.num_free_blocks, pool.tokens_stored(), pool.blocks_needed("a", 5)) == (1, 0, 0)
    pool.prepare(["a"], 3)
    pool.prepare(["a"], 2)
    assert (pool.num_free_blocks, pool.lengths["a"]) == (1, 5)
    with pytest.raises(OutOfBlocksError, match="needs 2 blocks, 1 of 4 are free"):
        pool.reserve("a", 10)
    with pytest.raises(ValueError, match="n_tokens"):
        pool.reserve("a", 4)  # fewer than it holds
    with pytest.raises(ValueError, match="one count per sequence"):
        pool.prepare(["a"], [1, 2])
    with pytest.raises(ValueError, match="n_new"):
        pool.prepare(["a"], [0])
    pool.free_sequence("a")
    assert pool.num_free_blocks == 4


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(st.tuples(st.sampled_from(["add", "grow", "fork", "free"]), st.integers(0, 5), st.integers(1, 9))),
    num_blocks=st.integers(1, 12),
    block_size=st.integers(1, 4),
)
def test_blocks_never_leak_and_capacity_is_never_exceeded(ops, num_blocks, block_size):
    """Random adds, appends, forks and frees: the free list and reference counts always match the block
    tables, an allocation beyond the free blocks fails without side effects, and freeing everything frees all."""
    pool = pool_for(num_blocks, block_size)
    for op, s, n in ops:
        if op == "add" and s not in pool.tables:
            pool.add_sequence(s)
        elif op == "fork" and s in pool.tables and n not in pool.tables:
            pool.fork(s, n, n % (pool.lengths[s] + 1))  # a prefix of the parent, from none to all of it
        elif op == "free" and s in pool.tables:
            pool.free_sequence(s)
        elif op == "grow" and s in pool.tables:
            before = (pool.num_free_blocks, {k: list(t) for k, t in pool.tables.items()}, dict(pool.lengths))
            need = pool.blocks_needed(s, n)
            if need > pool.num_free_blocks:
                with pytest.raises(OutOfBlocksError, match="needs"):
                    pool.prepare([s], n)
                assert before == (pool.num_free_blocks, pool.tables, pool.lengths)  # all or nothing
            else:
                pool.prepare([s], n)
                assert pool.num_free_blocks == before[0] - need
        # invariants: every block's reference count is the number of tables holding it, the rest are free
        refs = [0] * num_blocks
        for s2, table in pool.tables.items():
            assert len(table) == -(-pool.lengths[s2] // block_size)
            for b in table:
                refs[b] += 1
        assert refs == [pool.allocator.ref_count(b) for b in range(num_blocks)]
        assert pool.num_free_blocks == refs.count(0)
        assert pool.slots_allocated() <= pool.capacity_tokens
    for s in list(pool.tables):
        pool.free_sequence(s)
    assert pool.num_free_blocks == num_blocks


def test_fork_shares_blocks_and_copies_the_partly_filled_last_block_on_write():
    pool = pool_for(8, 4)
    pool.add_sequence("a")
    pool.prepare(["a"], 6)  # blocks: one full, one with 2 of 4 slots
    keys = torch.arange(6 * H_KV * D, dtype=torch.float64).view(1, H_KV, 6, D)
    for cache in pool.caches():
        cache.update(keys, -keys, torch.arange(6))
    pool.fork("a", "b")
    assert pool.num_free_blocks == 6  # nothing copied yet
    assert pool.blocks_needed("b", 1) == 1  # writing into the shared half-full block copies it
    pool.prepare(["b"], 1)
    assert pool.tables["a"][0] == pool.tables["b"][0] and pool.tables["a"][1] != pool.tables["b"][1]
    new = torch.full((1, H_KV, 1, D), 99.0, dtype=torch.float64)
    for cache in pool.caches():
        cache.update(new, new, torch.tensor([6]))
    for layer in range(LAYERS):
        a = pool.k[layer][pool.slots("a")]  # (6, H_kv, D)
        b = pool.k[layer][pool.slots("b")]
        torch.testing.assert_close(a, keys[0].transpose(0, 1))  # the parent is untouched
        torch.testing.assert_close(b[:6], a)
        assert bool((b[6] == 99.0).all())
    pool.free_sequence("a")
    assert pool.num_free_blocks == 6  # a's own block is freed; the shared full block is still held by "b"
    pool.free_sequence("b")
    assert pool.num_free_blocks == 8


def test_nbytes_and_len_count_allocated_blocks():
    pool = pool_for(4, 4)
    cache = pool.caches()[0]
    assert cache.nbytes() == 0 and len(cache) == 0
    pool.add_sequence(0)
    pool.prepare([0], 5)
    assert cache.nbytes() == 2 * 4 * H_KV * D * 8 * 2  # two blocks of 4 slots, keys and values, float64
    assert len(cache) == 5


def test_allocator_errors():
    alloc = BlockAllocator(2)
    b0, b1 = alloc.allocate(), alloc.allocate()
    assert (b0, b1) == (0, 1) and alloc.num_free == 0
    with pytest.raises(OutOfBlocksError, match="all 2 blocks"):
        alloc.allocate()
    alloc.release(b0)
    with pytest.raises(ValueError, match="double release"):
        alloc.release(b0)
    with pytest.raises(ValueError, match="only an allocated block"):
        alloc.share(b0)
    with pytest.raises(ValueError, match="block"):
        alloc.release(7)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockAllocator(0)


def test_pool_errors():
    pool = pool_for(4, 2)
    cache = pool.caches()[0]
    k = torch.zeros(1, H_KV, 1, D, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="no step is prepared"):
        cache.update(k, k, torch.tensor([0]))
    with pytest.raises(KeyError, match="unknown sequence 'x'"):
        pool.prepare(["x"], 1)
    pool.add_sequence("s")
    with pytest.raises(ValueError, match="already exists"):
        pool.add_sequence("s")
    with pytest.raises(ValueError, match="distinct"):
        pool.prepare(["s", "s"], 1)
    with pytest.raises(ValueError, match="n_new"):
        pool.prepare(["s"], 0)
    with pytest.raises(ValueError, match="at least one"):
        pool.prepare([], 1)
    with pytest.raises(OutOfBlocksError, match="needs 5 blocks, 4 of 4 are free"):
        pool.prepare(["s"], 9)
    pool.prepare(["s"], 1)
    with pytest.raises(RuntimeError, match="call update"):
        cache.keys_values()
    with pytest.raises(ValueError, match=r"must be rows \(1, n_new\) \(equal counts only\) or packed \(1, 1\)"):
        cache.update(torch.zeros(2, H_KV, 1, D, dtype=torch.float64), k, torch.tensor([0]))
    with pytest.raises(ValueError, match=r"shape \(B, H_kv=2, T, D=8\)"):
        cache.update(torch.zeros(1, H_KV + 1, 1, D, dtype=torch.float64), k, torch.tensor([0]))
    with pytest.raises(ValueError, match="v must have the shape of k"):
        cache.update(k, torch.zeros(1, H_KV, 2, D, dtype=torch.float64), torch.tensor([0]))
    with pytest.raises(ValueError, match="new tokens' positions"):
        cache.update(k, k, torch.tensor([3]))
    cache.update(k, k, torch.tensor([0]))
    with pytest.raises(RuntimeError, match="already updated"):
        cache.update(k, k, torch.tensor([0]))
    for s in list(pool.tables):
        pool.free_sequence(s)
    assert pool.num_free_blocks == 4


def test_fork_of_a_prefix_shares_its_blocks_and_attention_matches_a_full_cache():
    """A child forked from the first 6 of 10 tokens (block 4: one full block shared, one partly-filled block
    copied on write) then appending its own tokens attends exactly like a FullCache holding its tokens."""
    gen = torch.Generator().manual_seed(3)
    pool = pool_for(8, 4)
    pool.add_sequence("p")
    pool.prepare(["p"], 10)
    k, v = (torch.randn(1, H_KV, 10, D, generator=gen, dtype=torch.float64) for _ in range(2))
    for cache in pool.caches():
        cache.update(k, v, torch.arange(10))
    pool.fork("p", "c", 6)
    assert pool.tables["c"] == pool.tables["p"][:2] and pool.lengths["c"] == 6
    assert pool.blocks_needed("c", 3) == 2  # the copy of the shared half-used block, and one more block
    pool.prepare(["c"], 3)
    k2, v2, q = (torch.randn(1, H_KV * g, 3, D, generator=gen, dtype=torch.float64) for g in (1, 1, G))
    ref = FullCache()
    ref.update(k[:, :, :6], v[:, :, :6], torch.arange(6))
    ref.update(k2, v2, torch.arange(6, 9))
    for cache in pool.caches():
        cache.update(k2, v2, torch.arange(6, 9))
        got = cache.attend(q, torch.arange(6, 9), SCALE)
        torch.testing.assert_close(got, ref.attend(q, torch.arange(6, 9), SCALE), rtol=1e-12, atol=1e-12)
    # the parent's tokens 6..9 are untouched by the child's writes
    torch.testing.assert_close(pool.k[0][pool.slots("p")], k[0].transpose(0, 1))
    with pytest.raises(ValueError, match="n_tokens"):
        pool.fork("p", "d", 11)
    for seq in ("p", "c"):
        pool.free_sequence(seq)
    assert pool.num_free_blocks == 8
