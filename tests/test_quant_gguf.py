"""An independent check of refimpl.quant.ggml against gguf-py's own quantizers (llama.cpp's formats).

``gguf.quants.quantize`` for Q8_0, Q4_0 and Q4_1 must give the same *bytes* as
:func:`refimpl.quant.ggml.quantize_ggml` (codes, fp16 scales and minimums): on random tensors of many scales,
on blocks built so that every code is a rounding tie, on constant, zero, sign-symmetric and one-hot blocks,
and on a real SmolLM2 weight. The reconstructions are compared too, and the relation to
:func:`refimpl.quant.quantize_int`'s grids (same levels, different rounding of the scale) is stated as a test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.quant import dequantize_int, quantize_int
from refimpl.quant.ggml import GGML_FORMATS, QK, dequantize_ggml, ggml_bits_per_weight, quantize_ggml

gguf_quants = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType  # noqa: E402

QTYPES = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0, "q4_1": GGMLQuantizationType.Q4_1}
FORMATS = sorted(GGML_FORMATS)


def _theirs(x: torch.Tensor, fmt: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(gguf_quants.quantize(x.numpy().copy(), QTYPES[fmt])))


def _assert_same_bytes(x: torch.Tensor, fmt: str) -> None:
    ours, theirs = quantize_ggml(x, fmt), _theirs(x, fmt)
    assert ours.dtype == theirs.dtype == torch.uint8 and ours.shape == theirs.shape
    bad = (ours != theirs).nonzero()
    assert bad.numel() == 0, f"{fmt}: {bad.shape[0]} bytes differ, first at {bad[0].tolist()}"
    back = torch.from_numpy(gguf_quants.dequantize(theirs.numpy(), QTYPES[fmt]).astype(np.float32))
    assert torch.equal(dequantize_ggml(ours, fmt), back.reshape(x.shape)), f"{fmt}: reconstructions differ"


def _layer(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 256, generator=g) * 0.05
    x[:, 7] *= 20  # an outlier input channel
    return x


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("scale", [1e-6, 0.05, 1.0, 300.0])
def test_bytes_equal_gguf_on_random_tensors(fmt: str, scale: float) -> None:
    _assert_same_bytes(_layer() * scale, fmt)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # any leading dims
    _assert_same_bytes(x, fmt)


def _tie_blocks(fmt: str) -> torch.Tensor:
    """Blocks whose scaled values all end in .5 (the scale is exactly 1): every code is a rounding tie."""
    halves = torch.arange(QK, dtype=torch.float32) % 14 - 6.5  # -6.5 .. 6.5 in steps of 1
    if fmt == "q8_0":
        b = halves.repeat(2, 1)
        b[:, 0] = 127.0  # d = 127 / 127 = 1
        b[1, 1] = -127.0
        return b
    if fmt == "q4_0":
        b = halves.clamp(-7.5, 6.5).repeat(2, 1)
        b[:, 0] = -8.0  # d = -8 / -8 = 1
        b[1, 1] = 8.0  # the same magnitude later: the first (negative) extreme wins
        return b
    b = (halves + 7.0).repeat(2, 1)  # 0.5 .. 13.5
    b[:, 0], b[:, 1] = 0.0, 15.0  # m = 0, d = 1
    b[1] -= 3.0
    return b


@pytest.mark.parametrize("fmt", FORMATS)
def test_bytes_equal_gguf_on_ties_and_edge_blocks(fmt: str) -> None:
    ties = _tie_blocks(fmt)
    q = quantize_ggml(ties, fmt)
    assert float(dequantize_ggml(q, fmt)[0, 0]) == float(ties[0, 0]), "the block's extreme is exact (d = 1)"
    edge = torch.zeros(8, QK)
    edge[1] = 3.0  # constant block
    edge[2] = -1e-3  # constant negative block
    edge[3, 5] = 2.0  # one-hot
    edge[4, ::2], edge[4, 1::2] = 1.0, -1.0  # sign-symmetric: Q4_0 takes the first extreme
    edge[5, ::2], edge[5, 1::2] = -1.0, 1.0
    edge[6] = torch.linspace(-60000, 60000, QK)  # near fp16's largest number for Q4_1's minimum
    edge[7] = torch.linspace(-1, 1, QK) * 2.0**-14  # fp16-subnormal scales
    for x in (ties, edge, -edge):
        _assert_same_bytes(x, fmt)


@settings(max_examples=50, deadline=None)
@given(
    fmt=st.sampled_from(FORMATS),
    seed=st.integers(0, 2**16),
    mag=st.floats(1e-3, 1e3),
    rows=st.integers(1, 4),
    n_blocks=st.integers(1, 3),
    levels=st.sampled_from([0, 3, 16, 255]),
)
def test_bytes_equal_gguf_property(fmt: str, seed: int, mag: float, rows: int, n_blocks: int, levels: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n_blocks * QK, generator=g) * mag
    if levels:  # values on a coarse grid: many exact ties and repeated extremes
        x = (x / mag * levels / 3).round() * mag / levels
    _assert_same_bytes(x, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_bytes_equal_gguf_on_a_smollm2_layer(fmt: str) -> None:
    from refimpl.llm import load_model
    from refimpl.quant.model import linear_weight

    model, _ = load_model()
    w = linear_weight(model, 3, "wqkv").t().contiguous()  # (960, 576): rows along the input dimension, as stored
    _assert_same_bytes(w, fmt)
    if fmt == "q4_1":  # the file's own format: requantizing is within fp16 rounding of the statistics
        err = (dequantize_ggml(quantize_ggml(w, fmt), fmt) - w).abs().max()
        assert float(err) < 1e-3 * float(w.abs().max()), "Q4_1 weights requantized to Q4_1 nearly unchanged"


@pytest.mark.parametrize(("fmt", "bits", "symmetric"), [("q8_0", 8, True), ("q4_1", 4, False)])
def test_same_grids_as_quantize_int_up_to_the_scale_rounding(fmt: str, bits: int, symmetric: bool) -> None:
    """Q8_0 / Q4_1 are quantize_int's symmetric 8-bit / asymmetric 4-bit grids in groups of 32; refimpl rounds
    the fp16 scale up (and the minimum down) and codes against the stored statistics, ggml codes with the fp32
    scale and rounds it to nearest: reconstructions stay within about one step of each other."""
    x = _layer()
    ours_q = quantize_int(x, bits, "group", QK, symmetric)
    step = ours_q.scale.float().repeat_interleave(QK, dim=1)  # (64, 256)
    diff = (dequantize_int(ours_q) - dequantize_ggml(quantize_ggml(x, fmt), fmt)).abs()
    assert bool((diff <= step * 1.2).all())
    assert float((diff <= step / 4).float().mean()) > 0.97, "almost all codes agree"


def test_bits_per_weight_and_bad_inputs() -> None:
    assert [ggml_bits_per_weight(f) for f in ("q8_0", "q4_0", "q4_1")] == [8.5, 4.5, 5.0]
    x = _layer()
    for fmt in FORMATS:
        q = quantize_ggml(x, fmt)
        assert q.numel() * 8 == x.numel() * ggml_bits_per_weight(fmt)
    with pytest.raises(ValueError, match="fmt"):
        quantize_ggml(x, "q5_0")
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_ggml(torch.zeros(2, 48), "q8_0")
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        quantize_ggml(bad, "q4_0")
    with pytest.raises(ValueError, match="fp16"):
        quantize_ggml(torch.full((1, QK), 1e9), "q8_0")
    with pytest.raises(ValueError, match="multiple of 18"):
        dequantize_ggml(torch.zeros(1, 20, dtype=torch.uint8), "q4_0")
    with pytest.raises(TypeError):
        quantize_ggml(torch.zeros(1, QK, dtype=torch.int32), "q8_0")
