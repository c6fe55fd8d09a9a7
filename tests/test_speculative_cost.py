"""The speed-up model of speculative decoding (refimpl.speculative.cost); no model file needed."""

from __future__ import annotations

import pytest

from refimpl.roofline import Workload
from refimpl.speculative.cost import (
    TINYLLAMA_1B,
    best_gamma,
    expected_speedup,
    predicted_cache_ttft,
    roofline_speedup,
    verify_time,
)


def test_expected_speedup_is_leviathan_theorem_3_8():
    # Theorem 3.8: (1 - alpha^(gamma+1)) / ((1 - alpha)(gamma c + 1))
    for alpha, gamma, c in [(0.8, 4, 0.05), (0.5, 2, 0.1), (0.9, 7, 0.0)]:
        want = (1 - alpha ** (gamma + 1)) / ((1 - alpha) * (gamma * c + 1))
        assert expected_speedup(alpha, gamma, c) == pytest.approx(want)
    assert expected_speedup(0.0, 3, 0.0) == 1.0  # nothing accepted, free draft: plain decoding
    assert expected_speedup(1.0, 3, 0.0, v=2.0) == 2.0  # 4 tokens per step for 2 forwards


def test_best_gamma():
    # a free draft and a flat verification cost: the longest draft wins; a costly one: none
    assert best_gamma(0.8, 0.0, [1.0] * 6) == 5
    assert best_gamma(0.8, 1.0, [1.0] * 6) == 0
    # brute force over the same formula
    v = [1.0, 1.3, 1.5, 1.9, 2.4]
    assert best_gamma(0.7, 0.1, v) == max(range(5), key=lambda g: expected_speedup(0.7, g, 0.1, v[g]))
    with pytest.raises(ValueError, match="v_of"):
        best_gamma(0.5, 0.1, [])


def test_roofline_speedup_falls_with_batch_at_short_context():
    s = [
        roofline_speedup("llama-2-7b", TINYLLAMA_1B, "h100-sxm", 0.6, 4, Workload(batch=b, seq=128))
        for b in (1, 64, 512)
    ]
    assert s[0] > 1.3 and s[0] > s[1] > s[2] and s[2] < 1.0  # memory-bound at batch 1 pays; compute-bound does not


def test_verify_time_against_the_analyzer():
    import refimpl.roofline as rl

    one = rl.analyze("llama-2-7b", "h100-sxm", rl.Workload(stage="decode", batch=2, seq=256))
    assert verify_time("llama-2-7b", "h100-sxm", 1, Workload(batch=2, seq=256)) == one.time
    wide = rl.analyze("llama-2-7b", "h100-sxm", rl.Workload(stage="decode", batch=10, seq=256))
    by_op = wide.time_by_operator()
    by_op["attention"] = one.time_by_operator()["attention"]  # the KV cache read once per sequence
    assert verify_time("llama-2-7b", "h100-sxm", 5, Workload(batch=2, seq=256)) == pytest.approx(sum(by_op.values()))
    assert one.time < verify_time("llama-2-7b", "h100-sxm", 5, Workload(batch=2, seq=256)) < wide.time
    assert verify_time("llama-2-7b", "h100-sxm", 1) == rl.analyze("llama-2-7b", "h100-sxm").time  # the default


def test_the_workload_sets_both_models_precision():
    # 4-bit weights and a 2-bit KV cache: every forward is costed at the workload's precisions
    import refimpl.roofline as rl

    w4 = Workload(batch=4, seq=2048, weight_bits=4, kv_bits=2)
    assert verify_time("llama-2-7b", "h100-sxm", 1, w4) == rl.analyze("llama-2-7b", "h100-sxm", w4).time
    t1, td = (rl.analyze(m, "h100-sxm", w4).time for m in ("llama-2-7b", TINYLLAMA_1B))
    v = verify_time("llama-2-7b", "h100-sxm", 5, w4) / t1
    got = roofline_speedup("llama-2-7b", TINYLLAMA_1B, "h100-sxm", 0.7, 4, w4)
    assert got == pytest.approx(expected_speedup(0.7, 4, td / t1, v))
    assert got != roofline_speedup("llama-2-7b", TINYLLAMA_1B, "h100-sxm", 0.7, 4, Workload(batch=4, seq=2048))


def test_bad_inputs():
    with pytest.raises(ValueError, match="alpha must be <= 1"):
        expected_speedup(1.5, 2, 0.1)
    with pytest.raises(ValueError, match="c must be >= 0"):
        expected_speedup(0.5, 2, -0.1)
    with pytest.raises(ValueError, match="v must be > 0"):
        expected_speedup(0.5, 2, 0.1, v=0.0)
    with pytest.raises(ValueError, match="workload must be a decode workload .*got stage='prefill'"):
        verify_time("llama-2-7b", "h100-sxm", 2, Workload(stage="prefill"))
    with pytest.raises(ValueError, match="workload must be a decode workload"):
        roofline_speedup("llama-2-7b", TINYLLAMA_1B, "h100-sxm", 0.5, 4, Workload(stage="prefill"))
    with pytest.raises(TypeError, match="workload must be a refimpl.roofline.Workload, got dict"):
        roofline_speedup("llama-2-7b", TINYLLAMA_1B, "h100-sxm", 0.5, 4, {"batch": 8})
    with pytest.raises(ValueError, match="k must be >= 1"):
        verify_time("llama-2-7b", "h100-sxm", 0)


def test_predicted_cache_ttft():
    import refimpl.roofline as rl

    got = predicted_cache_ttft("llama-2-7b", TINYLLAMA_1B, "h100-sxm", 1024)
    assert got["prefill"] == rl.analyze("llama-2-7b", "h100-sxm", rl.Workload(stage="prefill", seq=1024)).time
    parts = rl.analyze(TINYLLAMA_1B, "h100-sxm", rl.Workload(stage="prefill", seq=1024)).time + got["predictor"]
    parts += rl.analyze("llama-2-7b", "h100-sxm", rl.Workload(stage="decode", seq=1024)).time
    assert got["predicted"] == pytest.approx(parts)
    # predictor FLOPs by hand: 32 layers, K and V, 2 FLOPs per MAC, 256 -> 4096 channels, 1024 tokens
    flops = 1024 * 32 * 2 * 2 * 256 * 4096
    assert got["predictor"] == pytest.approx(flops / rl.load_hardware("h100-sxm").peak("fp16"))
    assert got["predicted"] < got["prefill"] / 2  # prefill is compute-bound: a 6x smaller model cuts it
