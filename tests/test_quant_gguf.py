"""An independent check of refimpl.quant's integer grids against gguf's own quantizers (llama.cpp's formats).

Q8_0 is symmetric INT8 in groups of 32 with an fp16 scale, Q4_1 asymmetric INT4 in groups of 32 with an fp16
scale and minimum: the same grids as ``quantize_int(x, 8, "group", 32)`` and ``quantize_int(x, 4, "group", 32,
symmetric=False)``. Two conventions differ, so the codes are not bit-identical: gguf rounds the fp16 statistics
to nearest and computes the codes with the unrounded fp32 scale (``x * (1/d)``, ties away from zero), while
refimpl rounds the scale *up* (and the minimum down) and codes against the stored statistics, which keeps the
``s / 2`` error bound exact. The tests check that both reconstruct within one step of each other, that almost
all codes agree, and that each meets the error bound of its convention.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from refimpl.quant import dequantize_int, quantize_int

gguf_quants = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType  # noqa: E402


def _layer(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 256, generator=g) * 0.05
    x[:, 7] *= 20  # an outlier input channel
    return x


@pytest.mark.parametrize(
    ("qtype", "bits", "symmetric"), [(GGMLQuantizationType.Q8_0, 8, True), (GGMLQuantizationType.Q4_1, 4, False)]
)
def test_gguf_quantizers_agree_with_refimpl_grids(qtype: GGMLQuantizationType, bits: int, symmetric: bool) -> None:
    x = _layer()
    ours_q = quantize_int(x, bits, "group", 32, symmetric)
    ours = dequantize_int(ours_q)
    theirs = torch.from_numpy(
        gguf_quants.dequantize(gguf_quants.quantize(x.numpy().copy(), qtype), qtype).astype(np.float32)
    ).reshape(x.shape)
    step = ours_q.scale.float().repeat_interleave(32, dim=1)  # (64, 256): each element's step s
    assert bool(((ours - x).abs() <= step / 2 * (1 + 1e-5)).all()), "refimpl: half a step"
    # gguf reconstructs with the fp16-rounded scale but coded with the fp32 one: up to qmax * 2^-11 steps more
    assert bool(((theirs - x).abs() <= step * (0.5 + 2 ** (bits - 1) * 2.0**-10)).all()), "gguf: about half a step"
    assert bool(((ours - theirs).abs() <= step * 1.2).all()), "at most about one step apart"
    same = float(((ours - theirs).abs() <= step / 4).float().mean())  # same code: grids differ by < 1/4 step
    assert same > 0.97, f"codes agree on {100 * same:.2f}% of the elements"
