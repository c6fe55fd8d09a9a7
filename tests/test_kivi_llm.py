"""KIVI on the book's LLM (needs the SmolLM2 GGUF file): side-by-side evaluation equals the harness run per
policy, K/V collection and channel statistics, and the benchmark's quick mode."""

from __future__ import annotations

import pytest
import torch

from refimpl.kivi import KIVICache
from refimpl.kivi.experiment import RowCaches, channel_magnitude, collect_kv, evaluate_side_by_side
from refimpl.llm.cache import FullCache

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
def test_side_by_side_equals_separate_evaluations(llm) -> None:
    from refimpl.llm import evaluate

    model, ids = llm
    policies = {
        "full": FullCache,
        "kivi2": lambda: KIVICache(2, group_size=8, residual_length=16),
        "kivi2_keys_per_token": lambda: KIVICache(2, group_size=8, residual_length=16, key_axis="token"),
    }
    together = evaluate_side_by_side(model, ids, policies, prefill=28)
    for name, make in policies.items():
        alone = evaluate(model, ids, [make() for _ in range(model.config.n_layers)], prefill=28)
        got = together[name]
        assert got.n_tokens == alone.n_tokens == ids.shape[0] - 1
        assert got.cache_bytes == alone.cache_bytes
        # Same computation; only the batched matmuls round differently (which may flip a 2-bit code).
        tol = 1e-3 if name == "full" else 2e-2
        torch.testing.assert_close(got.nll_per_token, alone.nll_per_token, rtol=0, atol=tol)
    # 2-bit quantization actually happened and changed the predictions.
    assert (together["kivi2"].nll_per_token - together["full"].nll_per_token).abs().max() > 1e-3


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
    with pytest.raises(ValueError, match="caches"):
        RowCaches([])
    with pytest.raises(ValueError, match="policies"):
        evaluate_side_by_side(None, torch.arange(4), {})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dimensions"):
        channel_magnitude(torch.randn(3, 4))


@pytest.mark.model
def test_benchmark_quick_prints_numbers(run_benchmark, llm) -> None:
    status, values = run_benchmark("bench_kivi", ["--quick"])
    assert status == 0
    for name in ("kivi2_bytes_ratio", "kivi2_bits_per_element", "kivi2_ppl_increase", "kivi4_ppl_increase"):
        assert name in values, values
        float(values[name])
