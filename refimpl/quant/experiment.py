"""Measuring weight and activation quantization on the book's LLM: recipes, bits per weight, perplexity.

A *recipe* turns the float model into a quantized one (a new model; the original is untouched) and reports
the true storage cost: bits per weight of the block linears, scales and zero points included.
:func:`slice_nll` scores several disjoint corpus slices in one batched forward pass, so a configuration's
perplexity comes with a standard error over slices (:func:`~refimpl.llm.perplexity.paired_increase`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from refimpl._checks import check_tensor
from refimpl.llm.model import Llama
from refimpl.llm.perplexity import token_nll
from refimpl.quant.block import block_bits_per_element, block_fake_quantize, channel_order
from refimpl.quant.fp8 import quantize_fp8
from refimpl.quant.gptq import gptq, gptq_hessian
from refimpl.quant.integer import IntQuantized, dequantize_int, fake_quantize_int, quantize_int, unpack_codes
from refimpl.quant.model import LINEARS, ActQuant, collect_inputs, linear_weight, map_weights
from refimpl.quant.olive import olive_decode, olive_encode

__all__ = [
    "block_weights",
    "fp8_weights",
    "olive_weights",
    "rtn",
    "activation_outlier_ratio",
    "int_activations",
    "quantize_weights",
    "quantize_weights_gptq",
    "slice_nll",
    "weight_count",
]


def weight_count(model: Llama) -> int:
    """Number of weights in the block linears (what the recipes quantize; embedding and head stay)."""
    return sum(linear_weight(model, i, n).numel() for i in range(model.config.n_layers) for n in LINEARS)


def quantize_weights(model: Llama, quantize: Callable[[Tensor], tuple[Tensor, int]]) -> tuple[Llama, float]:
    """Apply ``quantize(W^T) -> (W^T', nbytes)`` to every block linear (``W^T: (out, in)``, the layout whose
    rows are output channels). Returns the new model and its bits per weight (``8 * sum nbytes / count``)."""
    total = 0

    def fn(i: int, name: str, w: Tensor) -> Tensor:
        nonlocal total
        wq, nbytes = quantize(w.t())
        total += nbytes
        return wq.t()

    new = map_weights(model, fn)
    return new, 8 * total / weight_count(model)


def rtn(
    bits: int, granularity: str = "group", group_size: int = 128, symmetric: bool = True, **options: Any
) -> Callable:
    """Round-to-nearest integer weights (:func:`~refimpl.quant.integer.quantize_int`, ``options`` such as
    ``partial_group=True`` passed to it), for :func:`quantize_weights`."""

    def quantize(wt: Tensor) -> tuple[Tensor, int]:
        q = quantize_int(wt, bits, granularity, group_size, symmetric, **options)
        return dequantize_int(q), q.nbytes()

    return quantize


def fp8_weights(fmt: str = "e4m3") -> Callable:
    """FP8 weights with a scale per output channel, for :func:`quantize_weights`."""

    def quantize(wt: Tensor) -> tuple[Tensor, int]:
        q = quantize_fp8(wt, fmt, "channel")
        return (q.codes.float() * q.scale).to(wt.dtype), q.nbytes()

    return quantize


def block_weights(block_size: int = 32, element: str = "int4", reorder: bool = False) -> Callable:
    """Block-format weights (BFP or MX, :func:`~refimpl.quant.block.block_fake_quantize`) in blocks along the
    input dimension, for :func:`quantize_weights`. ``reorder=True`` first sorts the input channels by the
    weight's own column norms (the K-sort of Trukhanov & Soloveychik 2024) and undoes the order afterwards,
    which is what a permutation folded into the layer that produces the input computes; the permutation
    itself costs no bytes."""

    def quantize(wt: Tensor) -> tuple[Tensor, int]:  # wt: (out, in)
        nbytes = round(wt.numel() * block_bits_per_element(block_size, element) / 8)
        if not reorder:
            return block_fake_quantize(wt, block_size, element), nbytes
        perm = channel_order(wt.norm(dim=0))  # (in,)
        return block_fake_quantize(wt[:, perm], block_size, element)[:, torch.argsort(perm)], nbytes

    return quantize


def olive_weights(n_candidates: int = 32) -> Callable:
    """OliVe 4-bit weights (outlier-victim pairs along the input dimension, an fp16 scale per output
    channel), for :func:`quantize_weights`."""

    def quantize(wt: Tensor) -> tuple[Tensor, int]:
        packed, scale = olive_encode(wt, n_candidates)
        wq = olive_decode(unpack_codes(packed, 4), scale, wt.dtype)
        return wq, packed.numel() * packed.element_size() + scale.numel() * scale.element_size()

    return quantize


@torch.inference_mode()
def quantize_weights_gptq(model: Llama, calibration: Tensor, **options: Any) -> tuple[Llama, float]:
    """GPTQ on every block linear with Hessians from ``calibration: (B, T)`` ids read by the *float* model
    (all layers at once; the paper quantizes sequentially, feeding each layer the outputs of the already
    quantized ones). Each linear of all layers is one batched :func:`~refimpl.quant.gptq.gptq` call, with
    ``options`` (``bits``, ``group_size``, ``symmetric``, ``partial_group``, ...) passed to it. Returns the
    model and its bits per weight."""
    check_tensor("calibration", calibration, ndim=2, dtypes=[torch.int64, torch.int32])
    inputs = collect_inputs(model, calibration)
    quantized: dict[tuple[int, str], IntQuantized] = {}
    for name in LINEARS:
        ws = torch.stack([linear_weight(model, i, name).t() for i in range(model.config.n_layers)])  # (L, out, in)
        hs = torch.stack([gptq_hessian(seen[name]) for seen in inputs])  # (L, in, in)
        for i, q in enumerate(gptq(ws, hs, **options)):
            quantized[i, name] = q
    new = map_weights(model, lambda i, name, w: dequantize_int(quantized[i, name]).t().to(w.dtype))
    return new, 8 * sum(q.nbytes() for q in quantized.values()) / weight_count(model)


def int_activations(bits: int = 8, granularity: str = "token") -> ActQuant:
    """Dynamic symmetric integer activation quantizer (per token or per tensor, fp32 scales)."""
    return functools.partial(
        fake_quantize_int, bits=bits, granularity=granularity, symmetric=True, stat_dtype=torch.float32
    )


@torch.inference_mode()
def slice_nll(model: Llama, rows: Tensor) -> Tensor:
    """Mean NLL (nats/token) of each row of ``rows: (S, T + 1)`` (disjoint corpus slices), one causal forward
    pass over all rows: ``(S,)`` float64. Token ``t + 1`` of a row is predicted from tokens ``0 .. t``."""
    check_tensor("rows", rows, ndim=2, dtypes=[torch.int64, torch.int32])
    s, t1 = rows.shape
    if t1 < 2:
        raise ValueError(f"rows must hold at least 2 tokens each, got shape {tuple(rows.shape)}")
    h = model.hidden(rows[:, :-1])  # (S, T, d)
    nll = token_nll(model, h.reshape(-1, h.shape[-1]), rows[:, 1:].reshape(-1))
    return nll.view(s, t1 - 1).mean(1)


def activation_outlier_ratio(x: Tensor) -> float:
    """Largest over median channel magnitude of ``x: (tokens, K)``, the magnitude of channel ``j`` being
    ``max_t |X_tj|`` (the statistic behind LLM.int8()'s outlier features and SmoothQuant's Figure 4)."""
    check_tensor("x", x, ndim=2, floating=True)
    mag = x.abs().amax(0)
    return float(mag.max() / mag.median().clamp_min(torch.finfo(mag.dtype).tiny))
