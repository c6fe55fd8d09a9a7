"""KIVI: tuning-free asymmetric 2-bit quantization of the KV cache (Liu et al., ICML 2024).

* :mod:`refimpl.kivi.quant` - asymmetric group quantization (per channel / per token) and bit packing;
* :mod:`refimpl.kivi.cache` - the streaming cache (:class:`KIVICache`) that plugs into the book's LLM;
* :mod:`refimpl.kivi.experiment` - on the book's LLM: keys and values per layer, a configuration per layer
  (:class:`~refimpl.kivi.experiment.LayerFactory`) and which layers and heads a cache's error comes from
  (:func:`~refimpl.kivi.experiment.attention_error`).
"""

from refimpl.kivi.cache import ORDERS, KIVICache, QuantizedStream, bits_per_element, n_quantized
from refimpl.kivi.quant import (
    AXES,
    BITS,
    QuantizedTensor,
    dequantize,
    dequantize_groups,
    fake_quantize,
    pack_codes,
    quantize,
    quantize_groups,
    unpack_codes,
)

__all__ = [
    "AXES",
    "BITS",
    "KIVICache",
    "ORDERS",
    "QuantizedStream",
    "QuantizedTensor",
    "bits_per_element",
    "dequantize",
    "dequantize_groups",
    "fake_quantize",
    "n_quantized",
    "pack_codes",
    "quantize",
    "quantize_groups",
    "unpack_codes",
]
