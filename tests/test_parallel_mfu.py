"""MFU arithmetic: FLOPs per token against an independent count; the step-time model's terms in closed form."""

from __future__ import annotations

import pytest

from refimpl.parallel.mfu import GPT3_175B, ParallelLayout, network_bandwidths, step_time, training_flops_per_token
from refimpl.parallel.pipeline import bubble_fraction


def test_gpt3_has_175b_parameters_and_6n_plus_attention_flops() -> None:
    n = GPT3_175B.n_params()
    assert 174e9 < n < 176e9  # Brown et al. 2020 call it 175B
    d, layers, s = 12288, 96, 2048
    per_layer = 4 * d * d + 8 * d * d + 2 * d  # attention, 4d MLP, two norms
    assert n == layers * per_layer + 50257 * d + d
    assert training_flops_per_token(GPT3_175B, s) == 6 * n + 12 * layers * d * s


def test_step_time_terms() -> None:
    one = step_time(GPT3_175B, ParallelLayout(1, 1, 1, 8, 1, 2048))
    assert one.mfu == pytest.approx(1.0) and one.total == one.compute
    layout = ParallelLayout(8, 8, 4, 128, 2, 2048)  # m = 16
    st = step_time(GPT3_175B, layout, compute_efficiency=0.5)
    assert st.compute == pytest.approx(2 * st.ideal)
    assert st.bubble / (st.compute + st.bubble) == pytest.approx(bubble_fraction(8, 16))
    nvlink, network = network_bandwidths("a100-80gb")
    act = 2 * 2048 * 12288 * 2
    assert st.tensor == pytest.approx(16 * 12 * 4 * 2 * 7 / 8 * act / nvlink)
    assert st.pipeline == pytest.approx(16 * 2 * act / 8 / network)
    assert st.data == pytest.approx(2 * 3 / 4 * GPT3_175B.n_params() / 64 * 2 / network)
    hidden = step_time(GPT3_175B, layout, compute_efficiency=0.5, hidden=("tensor", "pipeline", "data"))
    assert hidden.total == pytest.approx(st.compute + st.bubble) and hidden.mfu > st.mfu


def test_bad_layouts_raise() -> None:
    with pytest.raises(ValueError, match="global_batch must be a multiple of data x micro_batch = 6, got 8"):
        ParallelLayout(1, 1, 3, 8, 2, 16)
    with pytest.raises(ValueError, match="layout.tensor must divide n_heads=96, got 7"):
        step_time(GPT3_175B, ParallelLayout(7, 1, 1, 1, 1, 16))
    with pytest.raises(ValueError, match="layout.pipeline must divide n_layers=96, got 5"):
        step_time(GPT3_175B, ParallelLayout(1, 5, 1, 1, 1, 16))
    with pytest.raises(ValueError, match="hidden must name"):
        step_time(GPT3_175B, ParallelLayout(1, 1, 1, 1, 1, 16), hidden=("bubble",))
    with pytest.raises(ValueError, match="nvlink_gbps and network_gbps"):
        network_bandwidths("cpu")
    with pytest.raises(ValueError, match="micro_batch must be >= 1, got 0"):
        ParallelLayout(1, 1, 1, 1, 0, 16)
