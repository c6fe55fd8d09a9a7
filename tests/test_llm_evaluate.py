"""The book's one evaluation path, ``refimpl.llm.perplexity.evaluate_many``: cache configurations as the rows of
one batch (``RowCaches``), each row equal to a run of its configuration alone, for KIVI and eviction caches.

(The full-precision guarantee, step by step equals one causal pass, is in ``test_llm.py``.)
"""

from __future__ import annotations

import math

import pytest
import torch

from refimpl.caches import cache_factory
from refimpl.eviction import H2OCache, ScissorhandsCache
from refimpl.eviction.experiments import kept_positions
from refimpl.kivi import KIVICache
from refimpl.llm import load_model
from refimpl.llm.cache import FullCache
from refimpl.llm.corpus import eval_ids
from refimpl.llm.perplexity import RowCaches, evaluate, evaluate_many


@pytest.fixture(scope="module")
def model_and_ids():
    model, tokenizer = load_model()  # the runs below are single-threaded (threads=1): many small operations
    return model, eval_ids(40, tokenizer)


# ---- rows of a batch ----------------------------------------------------------------------------------------


def test_row_caches_routes_rows_and_checks_batch() -> None:
    g = torch.Generator().manual_seed(0)
    k, v, q = (torch.randn(2, 3, 5, 16, generator=g) for _ in range(3))
    rows = RowCaches([FullCache(), KIVICache(4, 8, 0)])
    rows.update(k, v, torch.arange(5))
    single = KIVICache(4, 8, 0)
    single.update(k[1:], v[1:], torch.arange(5))
    out = rows.attend(torch.randn(2, 3, 5, 16), torch.arange(5), 0.25)
    assert out.shape == (2, 3, 5, 16) and len(rows) == 5
    kk, _ = rows.keys_values()
    assert torch.equal(kk[0:1], k[0:1]) and torch.equal(kk[1:2], single.keys_values()[0])
    assert rows.nbytes() == rows.caches[0].nbytes() + single.nbytes()
    with pytest.raises(ValueError, match="batch size 2"):
        rows.update(k[:1], v[:1], torch.arange(5))
    with pytest.raises(ValueError, match="caches must be a non-empty"):
        RowCaches([])
    with pytest.raises(TypeError, match="caches must be KVCache objects"):
        RowCaches([FullCache(), "kivi"])
    with pytest.raises(ValueError, match="caches must map at least one label"):
        evaluate_many(None, torch.arange(4), {})  # type: ignore[arg-type]


def test_row_caches_of_eviction_caches_equal_separate_caches():
    g = torch.Generator().manual_seed(0)
    make = lambda: [FullCache(), H2OCache(budget=6), ScissorhandsCache(budget=20, recent=4, drop_fraction=0.25)]
    batch, alone = RowCaches(make()), make()
    pos = 0
    for n in [4, 1, 1, 1, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]:
        k, v = torch.randn(3, 3, n, 8, generator=g), torch.randn(3, 3, n, 8, generator=g)
        q = torch.randn(3, 9, n, 8, generator=g)
        p = torch.arange(pos, pos + n)
        batch.update(k, v, p)
        out = batch.attend(q, p, 0.3)
        for i, c in enumerate(alone):
            c.update(k[i : i + 1], v[i : i + 1], p)
            assert torch.equal(out[i : i + 1], c.attend(q[i : i + 1], p, 0.3))
        pos += n
    assert batch.nbytes() == sum(c.nbytes() for c in alone)
    assert len(batch) == pos and [len(m) for m in batch.caches] == [len(c) for c in alone]
    with pytest.raises(ValueError, match="batch size 3"):
        batch.update(k[:1], v[:1], torch.tensor([pos]))
    with pytest.raises(ValueError, match="different numbers of tokens"):
        batch.keys_values()  # the rows evicted differently: read batch.caches[i]
    with pytest.raises(ValueError, match="different token positions"):
        batch.key_positions()
    with pytest.raises(ValueError, match="caches must be a non-empty"):
        RowCaches([])  # the same misuse raises the same error whichever technique's caches are the rows


def test_evaluate_many_bad_inputs_before_the_model_runs():
    ids = torch.arange(10)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        evaluate_many(None, ids[:1], {"full": FullCache})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"ids must be one text \(N,\) or S texts \(S, N\), got shape \(1, 2, 5\)"):
        evaluate_many(None, ids.view(1, 2, 5), {"full": FullCache})  # type: ignore[arg-type]


# ---- on the model --------------------------------------------------------------------------------------------


@pytest.mark.model
def test_kivi_rows_equal_separate_evaluations(model_and_ids) -> None:
    model, ids = model_and_ids
    policies = {
        "full": FullCache,
        "kivi2": lambda: KIVICache(2, group_size=8, residual_length=16),
        "kivi2_keys_per_token": lambda: KIVICache(2, group_size=8, residual_length=16, key_axis="token"),
    }
    together = evaluate_many(model, ids, policies, prefill=28, threads=1)
    for name, make in policies.items():
        alone = evaluate(model, ids, make, prefill=28, threads=1)
        got = together[name]
        assert got.n_tokens == alone.n_tokens == ids.shape[0] - 1
        assert got.cache_bytes == alone.cache_bytes
        # Same computation; only the batched matmuls round differently (which may flip a 2-bit code).
        tol = 1e-3 if name == "full" else 2e-2
        torch.testing.assert_close(got.nll_per_token, alone.nll_per_token, rtol=0, atol=tol)
    # 2-bit quantization actually happened and changed the predictions.
    assert (together["kivi2"].nll_per_token - together["full"].nll_per_token).abs().max() > 1e-3


@pytest.mark.model
@pytest.mark.slow
def test_eviction_rows_equal_evaluate(model_and_ids):
    model, ids = model_and_ids
    configs = [
        ("full", {}),
        ("scissorhands", {"budget": 14, "history_window": 8, "recent": 4, "drop_fraction": 0.3}),
        ("h2o", {"budget": 10}),
        ("streamingllm", {"budget": 10}),
        ("window", {"budget": 10}),
    ]
    prefill = 16
    factories = {name: cache_factory(name, model.config, **kw) for name, kw in configs}
    together = evaluate_many(model, ids, factories, prefill=prefill, threads=1)
    runs = list(together.values())
    for (name, kw), run in zip(configs, runs):
        ref = evaluate(model, ids, cache_factory(name, model.config, **kw), prefill=prefill, threads=1)
        torch.testing.assert_close(run.nll_per_token, ref.nll_per_token, rtol=1e-4, atol=1e-4)
        assert run.peak_cache_bytes == ref.peak_cache_bytes, name
    # A quantized cache turns float rounding into whole quantization steps (a value on a rounding boundary),
    # so batched rows match evaluate() only up to that; alone in its batch it matches exactly.
    quant = [
        ("scissorhands", {"budget": 14, "recent": 4, "drop_fraction": 0.3, "bits": 4}),
        ("kivi4", {"residual_length": 8, "group_size": 8}),  # shares the full-precision prefill (attend first)
    ]
    for name, kw in quant:
        (run,) = evaluate_many(model, ids, {name: cache_factory(name, **kw)}, prefill=prefill, threads=1).values()
        ref = evaluate(model, ids, cache_factory(name, **kw), prefill=prefill, threads=1)
        torch.testing.assert_close(run.nll_per_token, ref.nll_per_token, rtol=1e-6, atol=1e-6)
        assert run.peak_cache_bytes == ref.peak_cache_bytes < runs[0].peak_cache_bytes / 2
    by_name = together
    window_sizes = [round(t) for t in by_name["window"].cache_tokens]
    assert window_sizes == [10] * (len(ids) - prefill)  # cut to the budget right after the prefill
    assert by_name["window"].decode_perplexity() > by_name["full"].decode_perplexity()
    held = kept_positions(by_name["window"].caches[0])  # (H_kv, T): the last 10 positions fed
    assert held.tolist() == [list(range(len(ids) - 11, len(ids) - 1))] * model.config.n_kv_heads
    # The prefill is shared, so its NLL is the same for every full-precision configuration.
    assert torch.equal(runs[1].nll_per_token[:prefill], runs[0].nll_per_token[:prefill])


@pytest.mark.model
@pytest.mark.slow
def test_several_texts_are_rows_too(model_and_ids):
    """``ids: (S, N)``: every configuration on every text, each row equal to that text evaluated alone."""
    model, ids = model_and_ids
    texts = torch.stack([ids[:20], ids[20:40]])  # two disjoint slices
    factories = {"full": FullCache, "h2o": lambda: H2OCache(budget=8)}
    together = evaluate_many(model, texts, factories, prefill=8, threads=1)
    for label, make in factories.items():
        got = together[label]
        alone = [evaluate(model, text, make, prefill=8, threads=1) for text in texts]
        assert got.nll_per_token.shape == (2, 19) and got.n_tokens == 38
        for s in range(2):
            torch.testing.assert_close(got.nll_per_token[s], alone[s].nll_per_token, rtol=1e-4, atol=1e-4)
            assert torch.equal(kept_positions(got.caches[3].caches[s]), kept_positions(alone[s].caches[3]))
        assert got.cache_bytes == sum(a.cache_bytes for a in alone)
        assert got.peak_cache_bytes == sum(a.peak_cache_bytes for a in alone)  # both texts grow in step
        decoded = torch.cat([a.nll_per_token[8:] for a in alone])
        assert got.decode_perplexity() == pytest.approx(math.exp(float(decoded.mean())), rel=1e-4)
        per_slice = torch.stack([a.nll_per_token[8:].mean() for a in alone])  # (S,) decoded NLL of each text
        torch.testing.assert_close(got.slice_nll(), per_slice, rtol=1e-4, atol=1e-4)
        assert alone[0].slice_nll(0).shape == (1,)
        with pytest.raises(ValueError, match=r"start must be in \[0, 19\)"):
            got.slice_nll(19)
    # different texts: the same cache gives different losses
    assert not torch.allclose(together["full"].nll_per_token[0], together["full"].nll_per_token[1])


class _BrokenPromise(FullCache):
    """Claims the full-precision prefill (inherited ``prefill_key``) but attends differently, and observes."""

    needs_attention = True

    def observe(self, weights: torch.Tensor, q_positions: torch.Tensor) -> None:
        pass

    def attend(self, q: torch.Tensor, q_positions: torch.Tensor, scale: float) -> torch.Tensor:
        return 2 * super().attend(q, q_positions, scale)


@pytest.mark.model
def test_a_shared_prefill_checks_every_member_that_attends(model_and_ids) -> None:
    """The shared prefill computes the promised output once and again only for members that observe attention
    weights; such a member that breaks the promise is caught, not silently given the first member's output."""
    model, ids = model_and_ids
    with pytest.raises(RuntimeError, match="different prefill attention outputs"):
        evaluate_many(model, ids[:12], {"full": FullCache, "broken": _BrokenPromise}, prefill=8, threads=1)
