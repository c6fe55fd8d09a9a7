"""Weight and activation quantization: integer grids, FP8, outliers, rotations, GPTQ, block formats.

=============================  ===============================================================
``refimpl.quant.integer``      symmetric / asymmetric integer grids per tensor, channel, token, group; packing
``refimpl.quant.fp8``          FP8 E4M3 / E5M2 through torch's float8 dtypes
=============================  ===============================================================
"""

from refimpl.quant.fp8 import FP8_FORMATS, FP8Quantized, dequantize_fp8, fake_quantize_fp8, fp8_grid, quantize_fp8
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

__all__ = [
    "BITS",
    "FP8_FORMATS",
    "FP8Quantized",
    "GRANULARITIES",
    "IntQuantized",
    "dequantize_fp8",
    "dequantize_groups",
    "dequantize_int",
    "fake_quantize_fp8",
    "fake_quantize_int",
    "fp8_grid",
    "pack_codes",
    "quantize_fp8",
    "quantize_groups",
    "quantize_int",
    "unpack_codes",
]
