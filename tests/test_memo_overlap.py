"""Tests of refimpl.memo.overlap: layer FLOPs against the standard count, the step-time and memory model at its
end points, and the chosen alpha against a brute-force scan."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.memo.ledger import korthikanti_activation_bytes
from refimpl.memo.overlap import (
    LayerShape,
    LayerTimes,
    choose_alpha,
    gpt_layer_operators,
    host_link_bandwidth,
    layer_times,
    predict_memo,
)
from refimpl.roofline import load_hardware

H100 = load_hardware("h100-sxm")
SHAPE = {"b": 1, "h": 4096, "a": 32}


def layer(s: int, sequence_parallel: int = 1) -> LayerShape:
    """The 7B-shaped layer of ``SHAPE`` at sequence length ``s``."""
    return LayerShape(s, **SHAPE, sequence_parallel=sequence_parallel)


@settings(max_examples=50, deadline=None)
@given(s=st.integers(1, 2**20), b=st.integers(1, 8), a=st.sampled_from([1, 8, 32]), d=st.sampled_from([16, 64, 128]))
def test_layer_flops_match_the_standard_count(s, b, a, d):
    """Matmul FLOPs of a GPT layer with a 4h MLP: 24 b s h^2 (Narayanan et al. 2021), plus causal attention
    2 b h s (s + 1) (QK^T and PV over s (s + 1) / 2 pairs, 2 d FLOPs each per head)."""
    h = a * d
    ops = {op.name: op for op in gpt_layer_operators(LayerShape(s, b, h, a))}
    matmuls = sum(ops[n].flops for n in ("qkv", "proj", "fc1", "fc2"))
    assert matmuls == 24 * b * s * h * h
    attention_without_softmax = ops["attention"].flops - 5 * b * a * s * (s + 1) / 2
    assert attention_without_softmax == pytest.approx(2 * b * h * s * (s + 1), rel=1e-12)


def test_recompute_time_end_points_and_causal_share():
    t = LayerTimes(attention=3.0, other=1.0)
    assert t.forward == 4.0 and t.backward == 8.0
    assert t.recompute(0.0) == t.forward and t.recompute(1.0) == 0.0
    # Queries alpha s .. s of a causal attention hold 1 - alpha^2 of the pairs.
    assert t.recompute(0.5) == pytest.approx(0.5 * 1.0 + 0.75 * 3.0)
    with pytest.raises(ValueError, match="alpha"):
        t.recompute(1.5)


def test_prediction_end_points():
    s, n_layers = 65536, 32
    full_recompute = predict_memo(0.0, layer(s), H100, n_layers=n_layers)
    full_offload = predict_memo(1.0, layer(s), H100, n_layers=n_layers)
    act = korthikanti_activation_bytes(s, 1, 4096, 32, flash_attention=True)
    x_bytes = 2 * s * 4096
    assert full_recompute.activation_bytes == act and full_recompute.input_bytes == x_bytes
    assert full_recompute.peak_device_bytes == (n_layers - 1) * x_bytes + act
    assert full_offload.peak_device_bytes == 2 * act  # one layer plus the prefetched next one
    assert full_recompute.keep_all_peak_bytes == n_layers * act
    # No swap: recomputing every forward adds T_f to T_f + T_b = 3 T_f.
    assert full_recompute.step_time == pytest.approx(full_recompute.keep_all_step_time * 4 / 3)
    assert full_offload.host_bytes == n_layers * act and full_recompute.host_bytes == 0


@pytest.mark.parametrize("s", [32768, 131072, 1048576])
@pytest.mark.parametrize("host_gib", [None, 64, 512])
def test_chosen_alpha_is_the_largest_hidden_alpha_that_fits_the_host(s, host_gib):
    host = None if host_gib is None else host_gib * 2**30
    alpha = choose_alpha(layer(s), H100, n_layers=32, host_capacity=host)
    grid = np.linspace(0.0, 1.0, 501)
    ok = [
        a
        for a in grid
        if (p := predict_memo(float(a), layer(s), H100, n_layers=32)).hidden and (host is None or p.host_bytes <= host)
    ]
    assert max(ok) <= alpha + 1e-12 < max(ok) + grid[1] + 1e-12
    chosen = predict_memo(alpha, layer(s), H100, n_layers=32)
    assert chosen.hidden
    # Hidden swap: the step costs only the recomputation of the other tokens.
    t = chosen.times
    assert chosen.step_time == pytest.approx(32 * (t.forward + t.backward + t.recompute(alpha)))


def test_longer_sequences_hide_more():
    """Attention compute grows as s^2 and activations as s: the link-limited alpha grows with s."""
    alphas = [choose_alpha(layer(s), H100, n_layers=32, host_capacity=None) for s in (2**15, 2**17, 2**19)]
    assert alphas[0] < alphas[1] <= alphas[2] == 1.0


def test_sequence_parallelism_divides_memory_not_the_link_alpha():
    s = 2**20
    one = predict_memo(0.5, layer(s), H100, n_layers=32)
    eight = predict_memo(0.5, layer(s, sequence_parallel=8), H100, n_layers=32)
    assert eight.activation_bytes * 8 == one.activation_bytes
    assert eight.peak_device_bytes * 8 == pytest.approx(one.peak_device_bytes)
    a1 = choose_alpha(layer(s // 4), H100, n_layers=32, host_capacity=None)
    a8 = choose_alpha(layer(s // 4, sequence_parallel=8), H100, n_layers=32, host_capacity=None)
    assert a8 == pytest.approx(a1, rel=1e-3)


def test_host_link_of_the_cpu_is_a_memory_copy():
    cpu_like = dataclasses.replace(H100, host_link_bandwidth=None)
    assert host_link_bandwidth(cpu_like) == H100.memory_bandwidth / 2
    assert host_link_bandwidth(H100) == 64e9
    assert layer_times(LayerShape(1024, 1, 256, 4), "h100-sxm").forward > 0


def test_bad_inputs():
    with pytest.raises(ValueError, match="alpha"):
        predict_memo(-0.5, layer(1024), H100, n_layers=2)
    with pytest.raises(ValueError, match="sequence_parallel must divide s"):
        LayerShape(1000, 1, 64, 4, sequence_parallel=3)
    with pytest.raises(ValueError, match="heads must divide hidden"):
        LayerShape(16, 1, 66, 4)
    with pytest.raises(ValueError, match="host_capacity"):
        choose_alpha(layer(1024), H100, n_layers=2, host_capacity=-1)
    with pytest.raises(ValueError, match="n_layers"):
        choose_alpha(layer(1024), H100, n_layers=0, host_capacity=None)
