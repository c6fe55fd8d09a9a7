"""An outside library on the same SmolLM2 layer: torchao's affine quantization primitives against refimpl.quant.

torchao (``torchao.quantization.quant_primitives``, pure PyTorch, runs on a CPU) and
:func:`refimpl.quant.quantize_int` are compared on the down projection of layer 10, in two formats:

* **INT8, symmetric, per output channel**: both take ``s = max|w| / 127`` (equal to the bit in fp32), but
  torchao codes ``round(w * (1/s))`` where refimpl codes ``round(w / s)``; the two differ by one code exactly
  where ``w / s`` lies within rounding error of a half-integer tie (a handful of weights in a million).
* **INT4, asymmetric, groups of 128**: both take ``s = (max - min) / 15``; torchao stores an *integer* zero
  point ``z = -round(min / s)`` (its grid is shifted so that codes are integers offset from 0), refimpl the
  float minimum (GPTQ's and KIVI's convention). Both reconstruct every weight within ``s / 2``; the grids are
  up to one step apart and the errors are close.
"""

from __future__ import annotations

import pytest
import torch

from refimpl.quant import dequantize_int, quantize_int, unpack_codes

quant_primitives = pytest.importorskip(
    "torchao.quantization.quant_primitives", reason="torchao is not installed (pip install torchao==0.18.0)"
)
MappingType = quant_primitives.MappingType


@pytest.fixture(scope="module")
def w_down() -> torch.Tensor:
    from refimpl.llm import load_model
    from refimpl.quant.model import linear_weight

    model, _ = load_model()
    return linear_weight(model, 10, "w_down").t().contiguous()  # (out = 576, in = 1536)


def test_int8_per_channel_equals_torchao_up_to_reciprocal_rounding(w_down: torch.Tensor) -> None:
    block = (1, w_down.shape[1])
    s, zp = quant_primitives.choose_qparams_affine(
        w_down, MappingType.SYMMETRIC, block, torch.int8, -127, 127, scale_dtype=torch.float32
    )
    theirs = quant_primitives.quantize_affine(w_down, block, s, zp, torch.int8, -127, 127).int()
    ours = quantize_int(w_down, 8, "channel", symmetric=True, stat_dtype=torch.float32)
    assert torch.equal(ours.scale.reshape(-1), s.reshape(-1)), "the same absmax / 127 scale, bit for bit"
    assert not bool(zp.any()), "symmetric: no zero point"
    codes = unpack_codes(ours.codes, 8).reshape(w_down.shape).int() - 128  # signed codes in [-127, 127]
    differ = codes != theirs
    assert int((codes - theirs).abs().max()) <= 1 and float(differ.float().mean()) < 1e-4
    y = (w_down.double() / ours.scale.double())[differ]  # exact w / s where the codes differ
    assert bool(((y - y.floor() - 0.5).abs() < 1e-5).all()), "they differ only next to rounding ties"


def test_int4_g128_asymmetric_matches_torchao_within_a_step(w_down: torch.Tensor) -> None:
    block = (1, 128)
    s, zp = quant_primitives._choose_qparams_affine_dont_preserve_zero(
        w_down, MappingType.ASYMMETRIC, block, torch.uint8, 0, 15, scale_dtype=torch.float32
    )
    q = quant_primitives.quantize_affine(w_down, block, s, zp, torch.uint8, 0, 15)
    theirs = quant_primitives.dequantize_affine(q, block, s, zp, torch.uint8, 0, 15, output_dtype=torch.float32)
    ours_q = quantize_int(w_down, 4, "group", 128, symmetric=False, stat_dtype=torch.float32)
    ours = dequantize_int(ours_q)
    assert torch.equal(ours_q.scale.reshape(-1), s.reshape(-1)), "the same (max - min) / 15 scale"
    step = ours_q.scale.repeat_interleave(128, dim=1)  # (576, 1536)
    assert bool(((ours - w_down).abs() <= step * (0.5 + 1e-5)).all())
    assert bool(((theirs - w_down).abs() <= step * (0.5 + 1e-5)).all())
    assert bool(((ours - theirs).abs() < step).all()), "integer vs float zero point: grids less than a step apart"
    err_ours = float((ours - w_down).norm() / w_down.norm())
    err_theirs = float((theirs - w_down).norm() / w_down.norm())
    assert abs(err_ours - err_theirs) < 0.1 * err_theirs, (err_ours, err_theirs)
