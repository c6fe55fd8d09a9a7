"""Eviction caches inside SmolLM2-135M: the batched sweep equals refimpl.llm.perplexity.evaluate; the benchmark.

These load the 135M-parameter model (a few seconds) and decode a few dozen steps per configuration, so they are
marked ``slow`` and ``model``; together they take about 20 s on an idle 2-core CPU.
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


def test_evaluate_policies_equals_evaluate(model_and_ids):
    from refimpl.eviction.experiments import evaluate_policies
    from refimpl.llm import evaluate

    model, ids = model_and_ids
    configs = [
        ("full", {}),
        ("scissorhands", {"budget": 14, "history_window": 8, "recent": 4, "drop_fraction": 0.3}),
        ("h2o", {"budget": 10}),
        ("streamingllm", {"budget": 10, "rope_base": model.config.rope_base}),
        ("streamingllm", {"budget": 10, "positions": "original"}),
        ("window", {"budget": 10}),
    ]
    prefill = 16
    runs = evaluate_policies(model, ids, configs, prefill=prefill)
    for (name, kw), run in zip(configs, runs):
        ref = evaluate(model, ids, name, prefill=prefill, cache_kwargs=kw)
        torch.testing.assert_close(run.nll_per_token, ref.nll_per_token, rtol=1e-4, atol=1e-4)
        assert run.peak_bytes == ref.peak_cache_bytes, name
    # A quantized cache turns float rounding into whole quantization steps (a value on a rounding boundary),
    # so batched rows match evaluate() only up to that; alone in its batch it matches exactly.
    quant = [
        ("scissorhands", {"budget": 14, "recent": 4, "drop_fraction": 0.3, "bits": 4}),
        ("kivi4", {"residual_length": 8, "group_size": 8}),  # another module's cache: its own prefill group
    ]
    for name, kw in quant:
        (run,) = evaluate_policies(model, ids, [(name, kw)], prefill=prefill)
        ref = evaluate(model, ids, name, prefill=prefill, cache_kwargs=kw)
        torch.testing.assert_close(run.nll_per_token, ref.nll_per_token, rtol=1e-6, atol=1e-6)
        assert run.peak_bytes == ref.peak_cache_bytes < runs[0].peak_bytes / 2
    by_name = {r.name: r for r in runs}
    assert by_name["window"].sizes == [10] * (len(ids) - prefill)  # cut to the budget right after the prefill
    assert by_name["window"].perplexity() > by_name["full"].perplexity()
    # The prefill is shared, so its NLL is the same for every full-precision configuration.
    assert torch.equal(runs[1].nll_per_token[:prefill], runs[0].nll_per_token[:prefill])
    # StreamingLLM's positions in the cache differ from the original ones once tokens were evicted.
    in_cache, original = runs[3].nll_per_token[prefill:], runs[4].nll_per_token[prefill:]
    assert float((in_cache - original).abs().max()) > 1e-4


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
    for key in ("scissorhands_ppl_increase_at_5x", "window_ppl_increase_at_5x", "full_ppl"):
        assert key in values and float(values[key]) == pytest.approx(out[key], abs=1e-4)
    assert float(values["scissorhands_cache_compression"]) > 1
