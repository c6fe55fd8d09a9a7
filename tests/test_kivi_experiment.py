"""KIVI experiments on a tiny random Llama: per-layer cache configurations (:class:`LayerFactory`) and the
attribution of a quantized cache's error to layers and KV heads (:func:`attention_error`), checked against a
naive recomputation from the exact queries, keys and values."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.kivi import KIVICache
from refimpl.kivi.experiment import AttentionErrorProbe, LayerFactory, attention_error
from refimpl.llm.cache import FullCache, make_caches
from refimpl.llm.config import LlamaConfig
from refimpl.llm.model import Llama
from refimpl.llm.perplexity import evaluate, evaluate_many
from tests.models import random_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(seed: int = 0, n_layers: int = 3) -> Llama:
    """A random Llama in float64: 4 query heads over 2 KV heads of 16 channels (a multiple of KIVI's G = 8)."""
    cfg = LlamaConfig(
        n_layers=n_layers, d_model=32, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=48, vocab_size=40,
        rope_base=1e4, norm_eps=1e-5, max_seq_len=96,
    )  # fmt: skip
    return random_llama(cfg, seed, scale=0.5, dtype=torch.float64)


def _ids(n: int, s: int = 1, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, 40, (s, n), generator=torch.Generator().manual_seed(seed))
    return ids[0] if s == 1 else ids


class _Recorder(FullCache):
    """A full cache that keeps every query it attends with: ``(B, H_q, T, D)`` after a one-shot pass."""

    def attend(self, q, q_positions, scale):  # noqa: ANN001, ANN201
        self.q = q
        return super().attend(q, q_positions, scale)


def _naive_attention_error(model: Llama, ids: torch.Tensor, prefill: int, make) -> torch.Tensor:  # noqa: ANN001
    """(L, H_kv) relative error, recomputed from the exact q, k, v of one causal pass: the decode step at
    position t reads KIVI's state after t tokens (quantized in one shot) plus token t exact, i.e. the released
    order; float64 attention with an explicit loop over query heads."""
    cfg = model.config
    recs = [_Recorder() for _ in range(cfg.n_layers)]
    model.hidden(ids[None, :-1], recs, 0)
    n, g = ids.shape[0] - 1, cfg.n_heads // cfg.n_kv_heads
    out = torch.zeros(cfg.n_layers, cfg.n_kv_heads)
    for layer, rec in enumerate(recs):
        (k, v), q = rec.keys_values(), rec.q
        err = torch.zeros(cfg.n_kv_heads, dtype=torch.float64)
        ref = torch.zeros(cfg.n_kv_heads, dtype=torch.float64)
        for t in range(prefill, n):
            cache = make()
            cache.update(k[:, :, :t], v[:, :, :t], torch.arange(t))  # one shot == streamed (test_kivi.py)
            kq, vq = cache.keys_values()
            kq, vq = torch.cat([kq, k[:, :, t : t + 1]], 2), torch.cat([vq, v[:, :, t : t + 1]], 2)
            for h in range(cfg.n_heads):
                qh = q[:, h, t : t + 1]  # (1, 1, D)
                exact = torch.softmax(qh @ k[:, h // g, : t + 1].mT * model.blocks[0].scale, -1) @ v[:, h // g, : t + 1]
                approx = torch.softmax(qh @ kq[:, h // g].mT * model.blocks[0].scale, -1) @ vq[:, h // g]
                err[h // g] += float((approx - exact).pow(2).sum())
                ref[h // g] += float(exact.pow(2).sum())
        out[layer] = (err / ref).sqrt()
    return out


@settings(max_examples=8, deadline=None)
@given(
    prefill=st.integers(1, 30),
    bits=st.sampled_from([2, 4]),
    r=st.sampled_from([0, 8, 16]),
    key_axis=st.sampled_from(["channel", "token"]),
    seed=st.integers(0, 100),
)
def test_attention_error_matches_naive_recomputation(prefill, bits, r, key_axis, seed) -> None:  # noqa: ANN001
    model = tiny_llama(seed)
    ids = _ids(40, seed=seed)

    def make() -> KIVICache:
        return KIVICache(bits, 8, r, key_axis=key_axis)

    got = attention_error(model, ids, make, prefill)
    want = _naive_attention_error(model, ids, prefill, make)
    assert got.per_head.shape == (3, 2) and got.per_layer.shape == (3,)
    torch.testing.assert_close(got.per_head.float(), want, rtol=1e-5, atol=1e-7)
    assert bool((got.per_head > 0).all()), "2 or 4 bits change every head's output"
    per_layer = (got.err_sq.sum(1) / got.ref_sq.sum(1)).sqrt()
    assert torch.equal(got.per_layer, per_layer)


def test_attention_error_is_zero_for_an_exact_cache_and_sums_texts() -> None:
    model = tiny_llama(3)
    ids = _ids(30, s=2, seed=5)
    assert float(attention_error(model, ids, FullCache, 10).err_sq.abs().max()) == 0.0
    both = attention_error(model, ids, lambda: KIVICache(2, 8, 8), 10)
    parts = [attention_error(model, row, lambda: KIVICache(2, 8, 8), 10) for row in ids]
    torch.testing.assert_close(both.err_sq, parts[0].err_sq + parts[1].err_sq, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(both.ref_sq, parts[0].ref_sq + parts[1].ref_sq, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="prefill"):
        attention_error(model, ids, FullCache, 29)


def test_probe_follows_the_exact_model() -> None:
    """The probe's run predicts exactly what the full-precision run predicts, whatever cache it measures."""
    model = tiny_llama(4)
    ids = _ids(30, seed=2)
    runs = evaluate_many(
        model, ids, {"full": FullCache, "probe": lambda: AttentionErrorProbe(KIVICache(2, 8, 0), start=5)}, prefill=5
    )
    torch.testing.assert_close(runs["probe"].nll_per_token, runs["full"].nll_per_token, rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="cache"):
        AttentionErrorProbe("kivi")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="start"):
        AttentionErrorProbe(FullCache(), start=-1)


def test_layer_factory_gives_each_layer_its_cache() -> None:
    model = tiny_llama(5)
    make = LayerFactory(3, lambda: KIVICache(2, 8, 0), {1: FullCache})
    for _ in range(2):  # one object serves several rows
        caches = make_caches(make, 3)
        assert [type(c) for c in caches] == [KIVICache, FullCache, KIVICache]
    ids = _ids(30, s=2, seed=7)
    mixed = LayerFactory(3, lambda: KIVICache(2, 8, 0), {0: FullCache, 2: FullCache})
    runs = evaluate_many(model, ids, {"mixed": mixed, "all": lambda: KIVICache(2, 8, 0)}, prefill=6)
    kinds = [type(layer.caches[0]) for layer in runs["mixed"].caches]
    assert kinds == [FullCache, KIVICache, FullCache]
    # Each row of the batched run equals that row alone with the same per-layer configuration.
    alone = evaluate(model, ids[1], LayerFactory(3, lambda: KIVICache(2, 8, 0), {0: FullCache, 2: FullCache}), 6)
    torch.testing.assert_close(runs["mixed"].nll_per_token[1], alone.nll_per_token, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(runs["mixed"].nll_per_token, runs["all"].nll_per_token)
    with pytest.raises(ValueError, match="layer"):
        LayerFactory(3, FullCache, {3: FullCache})
    with pytest.raises(TypeError, match="overrides"):
        LayerFactory(3, FullCache, {0: "full"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="n_layers"):
        LayerFactory(0, FullCache, {})
