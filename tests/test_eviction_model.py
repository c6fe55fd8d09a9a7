"""Eviction inside SmolLM2-135M: recorded attention, and the benchmark's quick mode.

These load the 135M-parameter model (a few seconds), so they are marked ``slow`` and ``model``. (Eviction caches
as rows of the batched evaluation, each equal to a run alone: ``test_llm_evaluate.py``.)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.model]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_and_ids():
    from refimpl.llm import load_model
    from refimpl.llm.corpus import eval_ids

    model, tokenizer = load_model()
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # many small operations: one thread is faster on a shared 2-core machine
    yield model, eval_ids(40, tokenizer)
    torch.set_num_threads(before)


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


def test_benchmark_quick_prints_numbers(capsys):
    spec = importlib.util.spec_from_file_location("bench_eviction", ROOT / "benchmarks" / "bench_eviction.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    before = torch.get_num_threads()
    try:
        out = bench.main(["--quick"])
    finally:
        torch.set_num_threads(before)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if not ln.startswith("#")]
    values = dict(ln.split(": ") for ln in lines)
    for key in ("scissorhands_ppl_increase_at_5x", "window_ppl_increase_at_5x", "full_ppl"):
        assert key in values and float(values[key]) == pytest.approx(out[key], abs=1e-4)
    assert float(values["scissorhands_cache_compression"]) > 1
