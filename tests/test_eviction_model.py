"""Eviction inside SmolLM2-135M: recorded attention, and the benchmark's quick mode.

These load the 135M-parameter model (a few seconds), so they are marked ``slow`` and ``model``. (Eviction caches
as rows of the batched evaluation, each equal to a run alone: ``test_llm_evaluate.py``.)
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.model]


@pytest.fixture(scope="module")
def model_and_ids(one_thread):
    from refimpl.llm import load_model
    from refimpl.llm.corpus import eval_ids

    model, tokenizer = load_model()
    return model, eval_ids(40, tokenizer)


def test_record_attention_rows_are_causal_distributions(model_and_ids):
    from refimpl.eviction.experiments import record_attention

    model, ids = model_and_ids
    a = record_attention(model, ids[:12])  # (L, H_kv, T, T)
    q = record_attention(model, ids[:12], per_query_head=True)  # (L, H_q, T, T)
    cfg = model.config
    assert a.shape == (cfg.n_layers, cfg.n_kv_heads, 12, 12) and q.shape[1] == cfg.n_heads
    torch.testing.assert_close(a.sum(-1), torch.ones(cfg.n_layers, cfg.n_kv_heads, 12), rtol=0, atol=1e-5)
    assert float(a.triu(1).abs().max()) == 0.0  # nothing attends to the future
    torch.testing.assert_close(a, q.view(cfg.n_layers, cfg.n_kv_heads, -1, 12, 12).mean(2))


def test_benchmark_quick_prints_numbers(run_benchmark):
    out, values = run_benchmark("bench_eviction", ["--quick"])
    for policy in ("scissorhands", "h2o", "streamingllm", "window"):
        for key in (f"{policy}_ppl_increase_at_5x", f"{policy}_ppl_increase_at_5x_se"):
            assert key in values and float(values[key]) == pytest.approx(out[key], rel=1e-5, abs=1e-6)
        assert float(values[f"{policy}_ppl_increase_at_5x_se"]) > 0  # three windows: a spread
        assert float(values[f"{policy}_cache_compression"]) > 1
        # a budget of 20% of a window over a context of 50% to 100% of it: between 2.5x and 5x fewer tokens
        assert 2.0 < float(values[f"{policy}_realised_compression"]) < 5.0
    assert float(values["full_ppl"]) == pytest.approx(out["full_ppl"], rel=1e-5)


def test_long_shared_prefill_of_eviction_caches_and_the_full_cache(model_and_ids):
    """The full cache and every eviction cache share one prefill pass (same prefill key); over a 256-token prefill
    their float32 attention outputs differ by rounding only, which the shared pass must accept (it raised here
    before its tolerance allowed for fp32 rounding), and the prefill NLL is the same for every row."""
    from refimpl.caches import cache_factory
    from refimpl.llm import evaluate_many, load_model
    from refimpl.llm.corpus import eval_ids

    model, _ = model_and_ids
    ids = eval_ids(258, load_model()[1])
    policies = ["scissorhands", "h2o", "streamingllm", "window"]
    factories = {"full": cache_factory("full")} | {p: cache_factory(p, model.config, budget=64) for p in policies}
    runs = evaluate_many(model, ids, factories, prefill=256)
    for p in policies:
        assert torch.equal(runs[p].nll_per_token[:256], runs["full"].nll_per_token[:256])
