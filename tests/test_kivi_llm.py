"""KIVI on the book's LLM (needs the SmolLM2 GGUF file): K/V collection and channel statistics, and the
benchmark's quick mode. (KIVI caches as rows of the batched evaluation: ``test_llm_evaluate.py``.)"""

from __future__ import annotations

import pytest
import torch

from refimpl.kivi.experiment import channel_magnitude, collect_kv

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llm():
    from refimpl.llm import load_model
    from refimpl.llm.corpus import eval_ids

    try:
        model, tokenizer = load_model()
    except FileNotFoundError as err:  # pragma: no cover - the Makefile installs the file
        pytest.skip(f"SmolLM2 GGUF file not installed: {err}")
    return model, eval_ids(40, tokenizer)


@pytest.mark.model
def test_collect_kv_and_channel_magnitude(llm) -> None:
    model, ids = llm
    kv = collect_kv(model, ids[:20])
    cfg = model.config
    assert len(kv) == cfg.n_layers
    for k, v in kv:
        assert k.shape == v.shape == (1, cfg.n_kv_heads, 20, cfg.head_dim)
        assert bool(torch.isfinite(k).all()) and bool(torch.isfinite(v).all())
    k = kv[3][0]
    mag = channel_magnitude(k)
    # Independent loop over heads and channels.
    ref = torch.tensor([float(k[0, h, :, c].abs().mean()) for h in range(k.shape[1]) for c in range(k.shape[3])])
    torch.testing.assert_close(mag, ref)
    with pytest.raises(ValueError, match="dimensions"):
        channel_magnitude(torch.randn(3, 4))


@pytest.mark.model
def test_benchmark_quick_prints_numbers(run_benchmark, llm) -> None:
    status, values = run_benchmark("bench_kivi", ["--quick"])
    assert status == 0
    names = ("kivi2_bytes_ratio", "kivi2_bits_per_element", "kivi2_ppl_increase", "kivi2_ppl_increase_se")
    for name in (*names, "kivi4_ppl_increase", "kivi2_decode_bits", "ppl_windows"):
        assert name in values, values
        float(values[name])
