"""Tests of refimpl.quant.experiment on a tiny random Llama: batched slice NLL equals the perplexity harness,
paired increases, bits per weight of the recipes, GPTQ over a model."""

from __future__ import annotations

import math

import pytest
import torch

from refimpl.llm import evaluate_one_shot, paired_increase
from refimpl.quant.block import block_fake_quantize
from refimpl.quant.experiment import (
    activation_outlier_ratio,
    block_weights,
    fp8_weights,
    int_activations,
    olive_weights,
    quantize_weights,
    quantize_weights_gptq,
    rtn,
    slice_nll,
    weight_count,
)
from refimpl.quant.model import linear_weight, quantize_activations
from tests.test_quant_outliers import tiny_llama


def _rows(s: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50, (s, t), generator=torch.Generator().manual_seed(seed))


def test_slice_nll_equals_the_perplexity_harness() -> None:
    m = tiny_llama()
    rows = _rows(3, 17)
    got = slice_nll(m, rows)
    for r in range(3):
        assert math.isclose(float(got[r]), evaluate_one_shot(m, rows[r]).nll, rel_tol=1e-9)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        slice_nll(m, rows[:, :1])


def test_paired_increase() -> None:
    base = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    inc = paired_increase(base + torch.log(torch.tensor([1.1, 1.2, 1.3], dtype=torch.float64)), base)
    assert math.isclose(inc.mean, 0.2, rel_tol=1e-9) and math.isclose(inc.se, 0.1 / math.sqrt(3), rel_tol=1e-9)
    assert "+20.00%" in str(inc)
    assert inc.beyond(2.0) and not inc.beyond(3.5)  # 0.2 is 3.46 standard errors from zero
    assert not paired_increase(base[:1] + 1, base[:1]).beyond(0.0)  # one slice: no standard error, no ranking
    with pytest.raises(ValueError, match="same slices"):
        paired_increase(base[:2], base)


def test_recipes_bits_per_weight() -> None:
    m = tiny_llama(dtype=torch.float32)
    n = weight_count(m)
    assert n == 2 * (48 * 80 + 48 * 48 + 48 * 192 + 96 * 48)
    out_channels = 2 * (80 + 48 + 192 + 48)
    q8, bits8 = quantize_weights(m, rtn(8, "channel"))
    assert math.isclose(bits8, 8 + 16 * out_channels / n)  # int8 codes + one fp16 scale per output channel
    q4, bits4 = quantize_weights(m, rtn(4, "group", 16, symmetric=False))
    assert math.isclose(bits4, 4 + 2 * 16 / 16)  # codes + fp16 scale and zero per 16 weights
    _, bits_fp8 = quantize_weights(m, fp8_weights())
    assert math.isclose(bits_fp8, 8 + 32 * out_channels / n)
    w, w4 = linear_weight(m, 1, "w_down"), linear_weight(q4, 1, "w_down")
    assert w4.shape == w.shape and 0 < float((w4 - w).abs().max()) < float(w.abs().max()) / 8
    gq, bits_g = quantize_weights_gptq(m, _rows(2, 24), bits=4, group_size=16)
    assert math.isclose(bits_g, bits4)
    ids = _rows(2, 20, seed=1)
    a8 = quantize_activations(q8, int_activations(8, "token"))(ids)
    a4 = quantize_activations(q8, int_activations(4, "token"))(ids)
    ref = m(ids)
    assert float((a8 - ref).norm()) < 0.05 * float(ref.norm()) < float((a4 - ref).norm())


def test_block_and_olive_recipes() -> None:
    m = tiny_llama(dtype=torch.float32)
    n = weight_count(m)
    _, bits_bfp = quantize_weights(m, block_weights(16, "int4"))
    assert math.isclose(bits_bfp, 4 + 8 / 16)  # elements + an 8-bit shared exponent per block
    _, bits_ol = quantize_weights(m, olive_weights(4))
    out_channels = 2 * (80 + 48 + 192 + 48)
    assert math.isclose(bits_ol, 4 + 16 * out_channels / n)  # 4-bit codes + an fp16 scale per output channel
    # reordering: the same as quantizing the permuted weight by hand and permuting back
    wt = linear_weight(m, 1, "w_down").t()  # (out, in)
    wt = wt * torch.linspace(0.1, 3.0, wt.shape[1])  # input channels of different magnitudes
    perm = torch.argsort(wt.norm(dim=0), descending=True, stable=True)
    by_hand = torch.empty_like(wt)
    by_hand[:, perm] = block_fake_quantize(wt[:, perm], 16, "int4")
    got, nbytes = block_weights(16, "int4", reorder=True)(wt)
    assert torch.equal(got, by_hand) and nbytes == wt.numel() * 9 // 16
    plain, _ = block_weights(16, "int4")(wt)
    assert float((got - wt).norm()) < float((plain - wt).norm()), "sorted channels share blocks of like magnitude"


def test_gptq_model_beats_rtn_on_its_calibration_objective() -> None:
    m = tiny_llama(dtype=torch.float32)
    calib = _rows(4, 32, seed=2)
    gq, _ = quantize_weights_gptq(m, calib, bits=4, group_size=None)
    rq, _ = quantize_weights(m, rtn(4, "channel", symmetric=False))
    from refimpl.quant.model import collect_inputs

    x = collect_inputs(m, calib)[0]["w_gate_up"]
    w = linear_weight(m, 0, "w_gate_up")
    err_g = ((x @ (linear_weight(gq, 0, "w_gate_up") - w)) ** 2).sum()
    err_r = ((x @ (linear_weight(rq, 0, "w_gate_up") - w)) ** 2).sum()
    assert err_g < err_r


def test_outlier_ratio() -> None:
    x = torch.ones(4, 8)
    x[2, 3] = -10
    assert activation_outlier_ratio(x) == 10.0
