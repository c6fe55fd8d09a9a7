"""Weight and activation quantization: integer grids, FP8, outliers, rotations, GPTQ, block formats.

=============================  ===============================================================
``refimpl.quant.integer``      symmetric / asymmetric integer grids per tensor, channel, token, group; packing
``refimpl.quant.fp8``          FP8 E4M3 / E5M2 through torch's float8 dtypes
``refimpl.quant.outliers``     LLM.int8() decomposition, SmoothQuant scales
``refimpl.quant.hadamard``     fast Walsh-Hadamard transform, randomized block-Hadamard rotations
``refimpl.quant.gptq``         GPTQ (Algorithm 1) with a calibration Hessian
``refimpl.quant.block``        block floating point, OCP MX (shared-exponent blocks), channel reordering
``refimpl.quant.olive``        OliVe outlier-victim pairs in 4 bits
``refimpl.quant.ggml``         llama.cpp's Q8_0 / Q4_0 / Q4_1 blocks, byte for byte
``refimpl.quant.model``        the LLM: weight maps, activation-quantized linears, calibration, folding
=============================  ===============================================================
"""

from refimpl.quant.block import ELEMENTS, block_bits_per_element, block_fake_quantize, channel_order, fp4_e2m1_grid
from refimpl.quant.fp8 import FP8_FORMATS, FP8Quantized, dequantize_fp8, fake_quantize_fp8, fp8_grid, quantize_fp8
from refimpl.quant.ggml import GGML_FORMATS, dequantize_ggml, ggml_bits_per_weight, quantize_ggml
from refimpl.quant.gptq import gptq, gptq_hessian
from refimpl.quant.hadamard import RandomizedHadamard, fwht, hadamard_matrix
from refimpl.quant.integer import (
    BITS,
    GRANULARITIES,
    IntQuantized,
    dequantize_groups,
    dequantize_int,
    fake_quantize_int,
    pack_codes,
    quantize_groups,
    quantize_int,
    unpack_codes,
)
from refimpl.quant.olive import abfloat_values, olive_decode, olive_encode, olive_fake_quantize
from refimpl.quant.outliers import int8_matmul, llm_int8_matmul, outlier_channels, smoothquant_scales

__all__ = [
    "BITS",
    "ELEMENTS",
    "FP8_FORMATS",
    "GGML_FORMATS",
    "FP8Quantized",
    "GRANULARITIES",
    "IntQuantized",
    "RandomizedHadamard",
    "abfloat_values",
    "block_bits_per_element",
    "block_fake_quantize",
    "channel_order",
    "dequantize_fp8",
    "dequantize_ggml",
    "dequantize_groups",
    "dequantize_int",
    "fake_quantize_fp8",
    "fake_quantize_int",
    "fp4_e2m1_grid",
    "fp8_grid",
    "fwht",
    "ggml_bits_per_weight",
    "gptq",
    "gptq_hessian",
    "hadamard_matrix",
    "int8_matmul",
    "llm_int8_matmul",
    "olive_decode",
    "olive_encode",
    "olive_fake_quantize",
    "outlier_channels",
    "pack_codes",
    "quantize_fp8",
    "quantize_ggml",
    "quantize_groups",
    "quantize_int",
    "smoothquant_scales",
    "unpack_codes",
]
