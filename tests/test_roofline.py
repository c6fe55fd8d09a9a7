"""Tests of the roofline cost model: ceilings, closed forms, GQA-aware KV bytes, SwiGLU sizing, bounds, CLI."""

from __future__ import annotations

import dataclasses
import itertools
import math
import subprocess
import sys

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.roofline import (
    Hardware,
    Operator,
    Workload,
    analyze,
    arithmetic_intensity,
    attainable_performance,
    bound,
    expected_experts_touched,
    get_model,
    kv_cache_bytes,
    list_hardware,
    list_models,
    load_hardware,
    max_batch,
    memory_footprint,
    normalize_dtype,
    operator_cost,
    ridge_point,
    roofline_time,
    weight_bytes,
)
from refimpl.roofline.__main__ import main
from refimpl.roofline.hardware import HARDWARE_YAML
from refimpl.roofline.models import resolve_model
from refimpl.roofline.ops import matmul

GPUS = ["a100-40gb", "a100-80gb", "h100-sxm", "h200"]
DATASHEET_MODELS = ["llama-2-7b", "llama-3-8b", "mixtral-8x7b"]


# ----------------------------------------------------------------------------------------------- hardware


def test_hardware_yaml_entries_have_source_and_date():
    raw = yaml.safe_load(HARDWARE_YAML.read_text())
    assert set(GPUS) <= set(raw) and "cpu" in raw
    for name in GPUS:
        src = raw[name]["source"]
        assert src["title"] and src["url"].startswith("https://") and str(src["date"]), name
        hw = load_hardware(name)
        assert not hw.measured and hw.date and "https://" in hw.source
        for dtype, sparse in hw.peak_flops_sparse.items():
            # the 2:4-sparse figure is labelled separately and is exactly twice the dense one on these parts
            assert sparse == pytest.approx(2 * hw.peak(dtype)), (name, dtype)
        assert hw.host_link_bandwidth < hw.memory_bandwidth


def test_issue_numbers_for_a100_40gb():
    hw = load_hardware("a100-40gb")
    assert hw.peak("fp16") == 312e12 and hw.peak("bf16") == 312e12
    assert hw.memory_bandwidth == 1555e9
    assert hw.memory_capacity == 40 * 2**30
    assert hw.ridge_point("fp16") == pytest.approx(312e12 / 1555e9)


def test_hardware_orderings():
    a40, a80, h100, h200 = (load_hardware(n) for n in GPUS)
    assert a40.memory_bandwidth < a80.memory_bandwidth < h100.memory_bandwidth < h200.memory_bandwidth
    assert a40.memory_capacity < a80.memory_capacity == h100.memory_capacity < h200.memory_capacity
    assert h100.peak("bf16") > 3 * a80.peak("bf16")
    assert "fp8" in h100.peak_flops and "fp8" not in a40.peak_flops


def test_list_and_unknown_hardware():
    assert list_hardware() == [*GPUS, "cpu"]
    with pytest.raises(ValueError, match="hardware must be one of .*a100-40gb"):
        load_hardware("tpu-v9")
    with pytest.raises(ValueError, match="dtype must be one of .*'fp8'"):
        load_hardware("a100-40gb").peak("fp8")  # the A100 has no fp8 Tensor Cores


def test_normalize_dtype():
    torch = pytest.importorskip("torch")
    assert normalize_dtype(torch.float16) == normalize_dtype("half") == normalize_dtype("FP16") == "fp16"
    assert normalize_dtype(torch.bfloat16) == "bf16" and normalize_dtype("float32") == "fp32"
    with pytest.raises(ValueError, match="dtype must be one of"):
        normalize_dtype("fp7")


def test_hardware_validation():
    with pytest.raises(ValueError, match="memory_bandwidth must be > 0"):
        Hardware("x", {"fp32": 1e12}, memory_bandwidth=0.0, memory_capacity=1e9)
    with pytest.raises(ValueError, match="dtype must be one of"):
        Hardware("x", {"fp9": 1e12}, memory_bandwidth=1e9, memory_capacity=1e9)
    with pytest.raises(ValueError, match="peak_flops"):
        Hardware("x", {}, memory_bandwidth=1e9, memory_capacity=1e9)


# ----------------------------------------------------------------------------------- roofline primitives

ceilings = st.tuples(st.floats(1e9, 1e16), st.floats(1e9, 1e13))


@settings(max_examples=50, deadline=None)
@given(ceil=ceilings, intensity=st.floats(0.0, 1e5))
def test_attainable_performance_is_the_lower_ceiling(ceil, intensity):
    peak, bw = ceil
    p = attainable_performance(intensity, peak, bw)
    assert p <= peak * (1 + 1e-12) and p <= bw * intensity * (1 + 1e-12)
    assert p == pytest.approx(min(peak, bw * intensity), rel=1e-12)


@settings(max_examples=50, deadline=None)
@given(ceil=ceilings, flops=st.floats(1.0, 1e15), nbytes=st.floats(1.0, 1e13))
def test_time_is_flops_over_attainable(ceil, flops, nbytes):
    peak, bw = ceil
    t = roofline_time(flops, nbytes, peak, bw)
    assert t == pytest.approx(flops / attainable_performance(flops / nbytes, peak, bw), rel=1e-9)
    b = bound(flops, nbytes, peak, bw)
    assert (b == "compute") == (flops / nbytes >= ridge_point(peak, bw) * (1 - 1e-12)) or math.isclose(
        flops / nbytes, ridge_point(peak, bw), rel_tol=1e-9
    )


@pytest.mark.parametrize("name", GPUS)
def test_bound_flips_at_the_ridge(name):
    hw = load_hardware(name)
    ridge = hw.ridge_point("bf16")
    nbytes = 1e9
    for factor, expected in [(0.99, "memory"), (1.01, "compute")]:
        op = Operator("op", flops=ridge * factor * nbytes, bytes_read=nbytes, bytes_written=0.0)
        cost = operator_cost(op, hw.peak("bf16"), hw.memory_bandwidth)
        assert cost.bound == expected, factor
    # exactly at the ridge (one second of peak compute over one second of bandwidth) it counts as compute
    at_ridge = Operator("op", flops=hw.peak("bf16"), bytes_read=hw.memory_bandwidth, bytes_written=0.0)
    assert operator_cost(at_ridge, hw.peak("bf16"), hw.memory_bandwidth).bound == "compute"
    # at the ridge both ceilings give the same time
    at = roofline_time(ridge * nbytes, nbytes, hw.peak("bf16"), hw.memory_bandwidth)
    assert at == pytest.approx(nbytes / hw.memory_bandwidth) == pytest.approx(ridge * nbytes / hw.peak("bf16"))


def test_intensity_edge_cases():
    assert arithmetic_intensity(0.0, 0.0) == 0.0
    assert arithmetic_intensity(5.0, 0.0) == math.inf
    assert attainable_performance(math.inf, 10.0, 1.0) == 10.0
    assert bound(0.0, 10.0, 10.0, 1.0) == "memory"
    with pytest.raises(ValueError, match="nbytes must be >= 0"):
        arithmetic_intensity(1.0, -1.0)


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 512), k=st.integers(1, 8192), n=st.integers(1, 8192), w=st.sampled_from([0.5, 1, 2, 4]))
def test_matmul_closed_form(m, k, n, w):
    op = matmul("x", m, k, n, act_bytes=2, weight_bytes=w)
    assert op.flops == 2 * m * k * n
    assert op.bytes == 2 * m * k + w * k * n + 2 * m * n
    assert op.weight_bytes == w * k * n and op.activation_bytes == 2 * m * k + 2 * m * n


def test_operator_validation():
    with pytest.raises(ValueError, match="op.flops must be >= 0"):
        Operator("op", flops=-1.0, bytes_read=1.0, bytes_written=1.0)
    with pytest.raises(ValueError, match="weight_bytes must be <= bytes_read"):
        Operator("op", flops=1.0, bytes_read=1.0, bytes_written=1.0, weight_bytes=2.0)
    with pytest.raises(ValueError, match="kind must be one of"):
        Operator("op", flops=1.0, bytes_read=1.0, bytes_written=1.0, kind="magic")


# ------------------------------------------------------------------------------------------------ models

# Parameter counts published on the models' Hugging Face pages (safetensors metadata).
PUBLISHED_PARAMS = {"llama-2-7b": 6_738_415_616, "llama-3-8b": 8_030_261_248, "mixtral-8x7b": 46_702_792_704}


@pytest.mark.parametrize("name", DATASHEET_MODELS)
def test_param_counts_match_published(name):
    assert get_model(name).n_params() == PUBLISHED_PARAMS[name]


def test_mixtral_active_params():
    m = get_model("mixtral-8x7b")
    # 2 of 8 experts: the "12.9B active parameters" of the Mixtral paper
    assert m.n_active_params() == pytest.approx(12.9e9, rel=0.01)
    assert m.n_params() - m.n_active_params() == m.n_layers * 6 * m.expert_params()


def test_smollm2_datasheet_entry_matches_gguf_metadata():
    """The cost model's SmolLM2 entry is the shape the LLM reads from the GGUF file (one definition, no drift)."""
    from refimpl.llm import read_config
    from refimpl.model_config import ModelConfig

    cfg, m = read_config(), get_model("smollm2-135m")
    assert isinstance(cfg, ModelConfig)  # the LLM's config is the shared shape, analyzable as is
    shape = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in ("name", "source")]
    assert {f: getattr(m, f) for f in shape} == {f: getattr(cfg, f) for f in shape}
    assert m.tie_embeddings and m.n_params() == cfg.n_params()
    assert m.n_params() == pytest.approx(135e6, rel=0.01)  # the "135M" of its name
    assert resolve_model(cfg) is cfg


def test_unknown_model_and_bad_config():
    assert set(DATASHEET_MODELS) | {"smollm2-135m", "tinyllama-1.1b", "gpt3-175b"} == set(list_models())
    with pytest.raises(ValueError, match="model must be one of .*llama-2-7b"):
        get_model("gpt-5")
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        dataclasses.replace(get_model("llama-2-7b"), n_kv_heads=5)
    with pytest.raises(ValueError, match="experts_per_token must be <="):
        dataclasses.replace(get_model("mixtral-8x7b"), experts_per_token=9)


# --------------------------------------------------------------------------------------------- analyzer


def test_done_when_llama2_decode_on_a100_is_memory_bound_and_time_follows_from_bytes():
    a = analyze("llama-2-7b", "a100-40gb", Workload(stage="decode", batch=1, seq=1024, dtype="fp16"))
    assert a.bound == "memory" and all(r.bound == "memory" for r in a.rows)
    # every operator is memory-bound, so the step time is exactly the bytes over 1555 GB/s
    assert a.time == pytest.approx(a.bytes / 1555e9, rel=1e-12)
    # and those bytes are the weights plus the KV cache (activations are < 0.1%)
    m = get_model("llama-2-7b")
    kv = kv_cache_bytes(m, Workload(batch=1, seq=1024))
    weights_read = weight_bytes(m) - (m.vocab_size - 1) * m.d_model * 2  # embedding: one row gathered
    assert a.bytes == pytest.approx(weights_read + kv, rel=1e-3)
    assert a.bytes > weights_read + kv
    assert 8e-3 < a.time < 10e-3  # ~14 GB at 1.555 TB/s


def test_prefill_is_compute_bound_on_a100():
    a = analyze("llama-2-7b", "a100-40gb", Workload(stage="prefill", batch=1, seq=1024))
    assert a.bound == "compute"
    for name in ["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]:
        assert a.row(name).bound == "compute"
    for name in ["attn_norm", "silu_mul", "kv_cache_write"]:
        assert a.row(name).bound == "memory"
    # prefill FLOPs ~ 2 * params * tokens (plus attention)
    m = get_model("llama-2-7b")
    linear = sum(r.op.flops * r.op.count for r in a.rows if r.op.kind == "matmul")
    non_embedding = m.n_params() - m.embedding_params()
    assert linear == pytest.approx(2 * non_embedding * 1024 + 2 * m.d_model * m.vocab_size, rel=1e-4)


@pytest.mark.parametrize("batch", [1, 2, 8, 32, 64])
def test_decode_gemv_intensity_is_about_batch(batch):
    # GEMM of B tokens with a (k, n) weight at 2 bytes: I = B k n / (B k + k n + B n) = B / (1 + B/n + B/k)
    a = analyze("llama-2-7b", "h100-sxm", Workload(stage="decode", batch=batch, seq=512, dtype="bf16"))
    for name, (k, n) in {"q_proj": (4096, 4096), "gate_proj": (4096, 11008), "down_proj": (11008, 4096)}.items():
        intensity = a.row(name).op.intensity
        assert intensity == pytest.approx(batch / (1 + batch / n + batch / k), rel=1e-12)
        assert intensity == pytest.approx(batch, rel=0.035)  # within B/k + B/n of B
    # halving the weight bytes (8-bit weights) doubles it
    q8 = analyze("llama-2-7b", "h100-sxm", Workload(stage="decode", batch=batch, seq=512, dtype="bf16", weight_bits=8))
    assert q8.row("gate_proj").op.intensity == pytest.approx(2 * batch, rel=0.05)


def test_decode_turns_compute_bound_past_the_ridge():
    hw = load_hardware("a100-40gb")
    ridge = hw.ridge_point("fp16")  # ~200 FLOP/B
    below = analyze("llama-2-7b", hw, Workload(stage="decode", batch=int(0.8 * ridge), seq=128))
    above = analyze("llama-2-7b", hw, Workload(stage="decode", batch=int(1.3 * ridge), seq=128))
    assert below.row("gate_proj").bound == "memory" and above.row("gate_proj").bound == "compute"
    # attention reads every sequence's own KV cache: its intensity does not grow with batch
    assert above.row("attention").bound == "memory"
    assert above.row("attention").op.intensity == pytest.approx(below.row("attention").op.intensity)


def test_kv_bytes_account_for_gqa():
    l2, l3 = get_model("llama-2-7b"), get_model("llama-3-8b")
    # well-known sizes: 0.5 MiB per token for Llama-2-7B (MHA), 128 KiB for Llama-3-8B (8 KV heads), fp16
    assert kv_cache_bytes(l2, Workload(batch=1, seq=1)) == 2**19
    assert kv_cache_bytes(l3, Workload(batch=1, seq=1)) == 2**17
    assert kv_cache_bytes(l3, Workload(batch=4, seq=4096)) == 4 * 4096 * 2**17
    # the decode step reads exactly the cache (attention) and writes one token's entries
    a = analyze(l3, "h100-sxm", Workload(stage="decode", batch=4, seq=4096))
    att, wr = a.row("attention"), a.row("kv_cache_write")
    assert att.op.kv_bytes * att.op.count == kv_cache_bytes(l3, Workload(batch=4, seq=4096)) == a.memory.kv_cache
    assert wr.op.kv_bytes * wr.op.count == kv_cache_bytes(l3, Workload(batch=4, seq=1))
    # the same model with MHA reads H / H_kv = 4 times more KV bytes
    mha = dataclasses.replace(l3, n_kv_heads=l3.n_heads)
    b = analyze(mha, "h100-sxm", Workload(stage="decode", batch=4, seq=4096))
    assert b.row("attention").op.kv_bytes == 4 * att.op.kv_bytes
    assert b.row("k_proj").op.flops == 4 * a.row("k_proj").op.flops


def test_kv_bits_and_budget():
    base = analyze("llama-2-7b", "h100-sxm", Workload(stage="decode", batch=16, seq=4096))
    kivi = analyze("llama-2-7b", "h100-sxm", Workload(stage="decode", batch=16, seq=4096, kv_bits=2))
    evict = analyze("llama-2-7b", "h100-sxm", Workload(stage="decode", batch=16, seq=4096, kv_budget=1024))
    assert kivi.memory.kv_cache == base.memory.kv_cache / 8
    assert kivi.row("attention").op.kv_bytes == base.row("attention").op.kv_bytes / 8
    assert evict.memory.kv_cache == base.memory.kv_cache / 4
    assert evict.row("attention").op.flops < base.row("attention").op.flops / 3.9
    assert base.time > kivi.time and base.time > evict.time
    # weights are unaffected
    assert kivi.memory.weights == base.memory.weights
    # prefill computes over the whole prompt even with a budget
    p1 = analyze("llama-2-7b", "h100-sxm", Workload(stage="prefill", batch=1, seq=4096, kv_budget=1024))
    p2 = analyze("llama-2-7b", "h100-sxm", Workload(stage="prefill", batch=1, seq=4096))
    assert p1.flops == p2.flops


def test_mlp_is_sized_by_ffn_dim_with_three_matrices():
    m = get_model("llama-2-7b")
    a = analyze(m, "a100-80gb", Workload(stage="prefill", batch=2, seq=64))
    M, d, F = 2 * 64, m.d_model, m.ffn_dim
    for name in ["gate_proj", "up_proj", "down_proj"]:
        assert a.row(name).op.flops == 2 * M * d * F
        assert a.row(name).op.weight_bytes == d * F * 2
    silu = a.row("silu_mul").op
    assert silu.bytes_read == 2 * M * F * 2 and silu.bytes_written == M * F * 2
    assert a.row("up_proj").op.bytes_written == M * F * 2  # the MLP activation is M x d_ff, not M x d
    bigger = analyze(dataclasses.replace(m, ffn_dim=2 * F), "a100-80gb", Workload(stage="prefill", batch=2, seq=64))
    assert bigger.row("silu_mul").op.bytes == 2 * silu.bytes


def test_weight_bits_scale_weight_traffic():
    a16 = analyze("llama-2-7b", "a100-80gb", Workload(stage="decode", batch=1, seq=128))
    a4 = analyze("llama-2-7b", "a100-80gb", Workload(stage="decode", batch=1, seq=128, weight_bits=4))
    w16 = sum(r.op.weight_bytes * r.op.count for r in a16.rows)
    w4 = sum(r.op.weight_bytes * r.op.count for r in a4.rows)
    norms = (2 * 32 + 1) * 4096 * 2  # norm vectors stay in the activation dtype
    assert w4 - norms == pytest.approx((w16 - norms) / 4)
    assert 3.0 < a16.time / a4.time < 4.0


def test_weight_bytes_read_in_decode_equal_the_weights():
    # Independent count: a decode step reads every weight once, except the embedding table (B rows gathered).
    for name in ["llama-2-7b", "llama-3-8b", "smollm2-135m"]:
        m = get_model(name)
        for batch in [1, 3]:
            a = analyze(m, "h100-sxm", Workload(stage="decode", batch=batch, seq=256, dtype="bf16"))
            read = sum(r.op.weight_bytes * r.op.count for r in a.rows)
            table = m.vocab_size * m.d_model * 2
            expected = weight_bytes(m) + batch * m.d_model * 2 - (0 if m.tie_embeddings else table)
            assert read == pytest.approx(expected, rel=1e-12), name


def test_flash_attention_io():
    kw = dict(stage="prefill", batch=1, seq=2048)
    fa = analyze("llama-2-7b", "a100-40gb", Workload(flash_attention=True, **kw))
    naive = analyze("llama-2-7b", "a100-40gb", Workload(flash_attention=False, **kw))
    scores = 32 * 2048 * 2048 * 2  # (H, T, S) fp16 per layer
    assert naive.row("qk_matmul").op.bytes_written == scores
    assert naive.row("softmax").op.bytes == 2 * scores
    assert naive.row("sv_matmul").op.bytes_read > scores
    assert "qk_matmul" not in [r.op.name for r in fa.rows]
    # FlashAttention moves only Q, K, V and O: S / (4 D) = 4 times fewer bytes than the score matrix alone
    assert fa.row("attention").op.bytes == 4 * 2048 * 4096 * 2
    assert fa.row("attention").op.bytes == scores / (2048 / (4 * 128))
    assert naive.memory.activations == 2 * scores > 3 * fa.memory.activations  # softmax: scores in and out
    # causal prefill: FlashAttention skips the masked half of the pairs
    ratio = fa.row("attention").op.flops / (naive.row("qk_matmul").op.flops + naive.row("sv_matmul").op.flops)
    assert ratio == pytest.approx(0.5, rel=0.02)
    assert fa.row("attention").op.flops == 32 * (4 * 128 + 5) * 2048 * 2049 // 2  # s(s+1)/2 pairs per head
    assert fa.time < naive.time


def test_expected_experts_touched_matches_enumeration():
    # exact expectation by enumerating every routing of `tokens` tokens to k-subsets of E experts
    for E, k, tokens in [(4, 1, 2), (4, 2, 2), (5, 2, 3), (3, 2, 3)]:
        subsets = list(itertools.combinations(range(E), k))
        counts = [len(set().union(*r)) for r in itertools.product(subsets, repeat=tokens)]
        assert expected_experts_touched(E, k, tokens) == pytest.approx(sum(counts) / len(counts), rel=1e-12)
    assert expected_experts_touched(8, 2, 1) == pytest.approx(2)
    assert expected_experts_touched(8, 2, 10_000) == pytest.approx(8)


def test_moe_decode_reads_active_experts_then_all():
    mx = get_model("mixtral-8x7b")
    one = analyze(mx, "h200", Workload(stage="decode", batch=1, seq=512, dtype="bf16"))
    many = analyze(mx, "h200", Workload(stage="decode", batch=256, seq=512, dtype="bf16"))
    per_expert = mx.d_model * mx.ffn_dim * 2
    assert one.row("expert_up_proj").op.weight_bytes == pytest.approx(2 * per_expert)
    assert many.row("expert_up_proj").op.weight_bytes == pytest.approx(8 * per_expert, rel=1e-6)
    assert one.row("expert_up_proj").op.flops == 2 * 1 * 2 * mx.d_model * mx.ffn_dim
    top1 = analyze(mx, "h200", Workload(stage="decode", batch=1, seq=512, dtype="bf16", active_experts=1))
    assert top1.row("expert_up_proj").op.flops == one.row("expert_up_proj").op.flops / 2
    assert top1.time < one.time
    # all experts live in memory: 46.7B parameters at 2 bytes do not fit an 80 GiB H100
    assert one.memory.weights == pytest.approx(2 * mx.n_params(), rel=1e-6)
    assert max_batch(mx, "h100-sxm", Workload(seq=512, dtype="bf16")) == 0
    assert max_batch(mx, "h200", Workload(seq=512, dtype="bf16")) > 0


@settings(max_examples=25, deadline=None)
@given(
    model=st.sampled_from(DATASHEET_MODELS),
    hardware=st.sampled_from(GPUS),
    stage=st.sampled_from(["prefill", "decode"]),
    batch=st.integers(1, 64),
    seq=st.integers(1, 8192),
    flash=st.booleans(),
)
def test_totals_and_units_are_consistent(model, hardware, stage, batch, seq, flash):
    a = analyze(model, hardware, Workload(stage=stage, batch=batch, seq=seq, flash_attention=flash, dtype="bf16"))
    hw = load_hardware(hardware)
    assert a.time == pytest.approx(sum(a.time_by_operator().values()), rel=1e-12)
    assert a.time == pytest.approx(sum(a.time_by_bound().values()), rel=1e-12)
    assert a.time >= a.flops / hw.peak("bf16") * (1 - 1e-12)
    assert a.time >= a.bytes / hw.memory_bandwidth * (1 - 1e-12)
    for r in a.rows:
        assert r.time == pytest.approx(max(r.op.flops / hw.peak("bf16"), r.op.bytes / hw.memory_bandwidth))
        assert r.attainable_flops <= hw.peak("bf16") * (1 + 1e-12)
    assert a.layer_time * a.model.n_layers < a.time
    # doubling the bandwidth never slows anything, and halves every memory-bound operator's time
    fast = dataclasses.replace(hw, memory_bandwidth=2 * hw.memory_bandwidth)
    b = analyze(model, fast, Workload(stage=stage, batch=batch, seq=seq, flash_attention=flash, dtype="bf16"))
    assert b.time <= a.time
    for ra, rb in zip(a.rows, b.rows):
        if ra.bound == "memory" and rb.bound == "memory":
            assert rb.time == pytest.approx(ra.time / 2)
    # more work never takes less time
    c = analyze(
        model, hardware, Workload(stage=stage, batch=batch + 1, seq=seq + 1, flash_attention=flash, dtype="bf16")
    )
    assert c.time >= a.time and c.memory.total > a.memory.total


@settings(max_examples=25, deadline=None)
@given(seq=st.integers(1, 32768), kv_bits=st.sampled_from([16, 8, 4, 2.5]), hw=st.sampled_from(GPUS))
def test_max_batch_is_the_largest_that_fits(seq, kv_bits, hw):
    b = max_batch("llama-3-8b", hw, Workload(seq=seq, kv_bits=kv_bits, dtype="bf16"))
    cap = load_hardware(hw).memory_capacity
    if b > 0:
        assert memory_footprint("llama-3-8b", Workload(batch=b, seq=seq, kv_bits=kv_bits, dtype="bf16")).total <= cap
    assert memory_footprint("llama-3-8b", Workload(batch=b + 1, seq=seq, kv_bits=kv_bits, dtype="bf16")).total > cap


def test_max_batch_grows_with_kv_compression():
    base = max_batch("llama-2-7b", "a100-80gb", Workload(seq=4096))
    assert max_batch("llama-2-7b", "a100-80gb", Workload(seq=4096, kv_bits=4)) > 3.5 * base
    assert max_batch("llama-2-7b", "a100-80gb", Workload(seq=4096), memory_fraction=0.5) < base


def test_bad_inputs():
    with pytest.raises(ValueError, match="batch must be >= 1, got -1"):
        analyze("llama-2-7b", "a100-40gb", Workload(batch=-1))
    with pytest.raises(ValueError, match="seq must be >= 1, got 0"):
        analyze("llama-2-7b", "a100-40gb", Workload(seq=0))
    with pytest.raises(TypeError, match="batch must be an int"):
        analyze("llama-2-7b", "a100-40gb", Workload(batch=1.5))
    with pytest.raises(ValueError, match="dtype must be one of"):
        analyze("llama-2-7b", "a100-40gb", Workload(dtype="fp12"))
    with pytest.raises(ValueError, match="dtype must be one of .* for hardware 'a100-40gb'"):
        analyze("llama-2-7b", "a100-40gb", Workload(dtype="fp8"))
    with pytest.raises(ValueError, match="stage must be one of"):
        analyze("llama-2-7b", "a100-40gb", Workload(stage="train"))
    with pytest.raises(ValueError, match="model must be one of"):
        analyze("llama-9", "a100-40gb")
    with pytest.raises(ValueError, match="hardware must be one of"):
        analyze("llama-2-7b", "a100-20gb")
    with pytest.raises(ValueError, match="kv_bits must be in"):
        analyze("llama-2-7b", "a100-40gb", Workload(kv_bits=0))
    with pytest.raises(ValueError, match="active_experts must be <= 8"):
        analyze("mixtral-8x7b", "h200", Workload(active_experts=9))
    with pytest.raises(ValueError, match="active_experts must be <= 1"):
        analyze("llama-2-7b", "h200", Workload(active_experts=2))
    with pytest.raises(ValueError, match="kv_budget must be >= 1"):
        analyze("llama-2-7b", "h200", Workload(kv_budget=0))
    with pytest.raises(ValueError, match="memory_fraction must be <= 1.0"):
        max_batch("llama-2-7b", "h200", memory_fraction=1.5)
    with pytest.raises(ValueError, match="name must be one of"):
        analyze("llama-2-7b", "h200").row("conv2d")


# -------------------------------------------------------------------------------------------------- CLI


def _parse(text: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in text.strip().splitlines() if ": " in line)


def test_cli_prints_the_four_lines(capsys):
    assert main(["--model", "llama-2-7b", "--hardware", "a100-40gb", "--batch", "1", "--seq", "1024"]) == 0
    out = _parse(capsys.readouterr().out)
    dec = analyze("llama-2-7b", "a100-40gb", Workload(stage="decode", batch=1, seq=1024))
    pre = analyze("llama-2-7b", "a100-40gb", Workload(stage="prefill", batch=1, seq=1024))
    assert float(out["decode_step_ms"]) == pytest.approx(dec.time * 1e3, rel=1e-5)
    assert float(out["prefill_ms"]) == pytest.approx(pre.time * 1e3, rel=1e-5)
    assert float(out["kv_cache_gb"]) == pytest.approx(
        kv_cache_bytes("llama-2-7b", Workload(batch=1, seq=1024)) / 1e9, rel=1e-5
    )
    assert float(out["weights_gb"]) == pytest.approx(weight_bytes("llama-2-7b") / 1e9, rel=1e-5)
    assert out["decode_bound"] == "memory" and out["prefill_bound"] == "compute"


def test_cli_help_and_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for name in [*list_models(), *list_hardware()]:
        assert name in help_text
    with pytest.raises(SystemExit) as e:
        main(["--model", "llama-9", "--hardware", "a100-40gb"])
    assert e.value.code == 2 and "invalid choice: 'llama-9'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--model", "llama-2-7b", "--hardware", "a100-40gb", "--batch", "-3"])
    assert e.value.code == 2 and "batch must be >= 1, got -3" in capsys.readouterr().err


def test_cli_as_a_module():
    cmd = [sys.executable, "-m", "refimpl.roofline", "--model", "llama-3-8b", "--hardware", "h100-sxm"]
    out = subprocess.run([*cmd, "--table"], capture_output=True, text=True, check=True).stdout
    lines = _parse(out)
    for key in ["decode_step_ms", "prefill_ms", "kv_cache_gb", "weights_gb"]:
        assert float(lines[key]) > 0
    assert "q_proj" in out


# ------------------------------------------------------------------------------------------------ plots


def test_plots_draw_what_the_analysis_says():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from refimpl.roofline.plot import plot_operators, plot_roofline, plot_time_breakdown

    a = analyze("llama-2-7b", "a100-40gb", Workload(stage="decode", batch=1, seq=1024))
    ax = plot_roofline(a.hardware, "fp16", intensity_range=(1.0, 1e3))
    x, y = ax.lines[0].get_data()
    assert y.max() == pytest.approx(312e12) and y[0] == pytest.approx(1555e9 * x[0])
    ax = plot_operators(a)
    shown = sum(len(c.get_offsets()) for c in ax.collections)
    assert shown == sum(1 for r in a.rows if r.op.flops > 0 and r.op.bytes > 0)
    numbers = [t.get_text() for t in ax.texts if t.get_text().isdigit()]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert numbers == [str(i) for i in range(1, len(numbers) + 1)] and numbers
    assert any(t.startswith("1: ") and "gate_proj" in t for t in legend), legend
    assert sum(t[0].isdigit() for t in legend) == len(numbers), "each number is named in the legend"
    ax = plot_time_breakdown(a, top=5)
    widths = sorted(p.get_width() for p in ax.patches)
    expected = sorted(r.total_time * 1e3 for r in a.rows)[-5:]
    assert widths == pytest.approx(expected)
    colours = [tuple(h.get_facecolor()) for h in ax.get_legend().legend_handles]
    assert colours == [matplotlib.colors.to_rgba(c) for c in ("#0072B2", "#D55E00")], "the legend shows each colour"
    plt.close("all")


def test_workload_is_frozen_normalized_and_validated_on_replace():
    w = Workload(dtype="BFloat16", kv_bits=2)
    assert w.dtype == "bf16" and w.bits_per_weight == 16 and w.bits_per_kv == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        w.batch = 2  # type: ignore[misc]
    # replace() runs the same validation; a None precision follows the new dtype
    assert dataclasses.replace(w, dtype="fp32").bits_per_weight == 32
    with pytest.raises(ValueError, match="batch must be >= 1, got 0"):
        dataclasses.replace(w, batch=0)
    with pytest.raises(ValueError, match="weight_bits must be in \\(0, 64\\], got 65"):
        Workload(weight_bits=65)
    with pytest.raises(ValueError, match="logits must be one of"):
        Workload(logits="first")
    with pytest.raises(TypeError, match="flash_attention must be a bool"):
        Workload(flash_attention=1)
    with pytest.raises(ValueError, match="active_experts must be >= 1"):
        Workload(active_experts=0)
    with pytest.raises(TypeError, match="workload must be a Workload, got dict"):
        analyze("llama-2-7b", "h200", {"batch": 2})  # type: ignore[arg-type]
    # decode holds min(seq, kv_budget) tokens, prefill the whole prompt
    assert Workload(seq=4096, kv_budget=1024).keys == 1024
    assert Workload(stage="prefill", seq=4096, kv_budget=1024).keys == 4096
    # the analysis reads the workload's fields through, resolved against the model
    a = analyze("mixtral-8x7b", "h200", Workload(batch=3, dtype="bf16"))
    assert (a.batch, a.dtype, a.active_experts, a.weight_bits) == (3, "bf16", 2, 16)


def test_plot_roofline_can_put_the_ridge_in_the_legend():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from refimpl.roofline.plot import plot_roofline

    hw = load_hardware("a100-40gb")
    ax = plot_roofline(hw, "fp16", intensity_range=(1.0, 1e3))
    assert [t.get_text() for t in ax.texts] == [f"ridge {hw.ridge_point('fp16'):.3g}"]
    ax = plot_roofline(hw, "fp16", intensity_range=(1.0, 1e3), ridge_in_legend=True)
    assert len(ax.texts) == 0 and ax.lines[0].get_label() == f"{hw.name} (fp16), ridge {hw.ridge_point('fp16'):.3g}"
    assert len(ax.lines) == 2  # the roof and the ridge marker
    plt.close("all")
