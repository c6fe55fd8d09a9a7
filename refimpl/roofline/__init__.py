"""The roofline cost model of the book: hardware ceilings, operators, and a transformer analyzer.

Williams, Waterman and Patterson (2009) bound a kernel's performance by ``min(peak FLOP/s, bandwidth x
arithmetic intensity)``. This package applies it to LLM inference as "LLM Inference Unveiled" (Yuan et al. 2024)
does, with tested formulas:

* :mod:`~refimpl.roofline.hardware` - ceilings from datasheets (``refimpl/data/hardware.yaml``) or measured (``"cpu"``);
* :mod:`~refimpl.roofline.ops` - operators as (FLOPs, bytes read, bytes written), intensity, bound, time;
* :mod:`~refimpl.roofline.dtypes` - dtype names and storage bits;
* :mod:`~refimpl.roofline.models` - Llama-2-7B, Llama-3-8B, Mixtral-8x7B, SmolLM2-135M, TinyLlama-1.1B, GPT-3
  175B as datasheet entries;
* :mod:`~refimpl.roofline.analyzer` - a :class:`Workload` (stage, batch, length, precisions) analyzed per
  operator, its memory footprint, the max batch;
* :mod:`~refimpl.roofline.measure` - streaming read and matmul micro-benchmarks (imports torch; loaded lazily);
* :mod:`~refimpl.roofline.plot` - roofline figures for every chapter (imports matplotlib; loaded lazily).

Command line: ``python -m refimpl.roofline --model llama-2-7b --hardware a100-40gb --batch 1 --seq 1024``.
"""

from __future__ import annotations

from refimpl._lazy import lazy_exports
from refimpl.roofline.analyzer import (
    Analysis,
    MemoryFootprint,
    Workload,
    analyze,
    expected_experts_touched,
    kv_cache_bytes,
    layer_operators,
    max_batch,
    memory_footprint,
    weight_bytes,
)
from refimpl.roofline.hardware import (
    Hardware,
    dtype_bits,
    list_hardware,
    load_hardware,
    measure_hardware,
    normalize_dtype,
)
from refimpl.roofline.models import ModelConfig, get_model, list_models
from refimpl.roofline.ops import (
    Operator,
    OperatorCost,
    arithmetic_intensity,
    attainable_performance,
    bound,
    operator_cost,
    ridge_point,
    roofline_time,
)

__all__ = [
    "Analysis",
    "Hardware",
    "MemoryFootprint",
    "ModelConfig",
    "Operator",
    "OperatorCost",
    "Workload",
    "analyze",
    "arithmetic_intensity",
    "attainable_performance",
    "bound",
    "dtype_bits",
    "expected_experts_touched",
    "get_model",
    "kv_cache_bytes",
    "layer_operators",
    "list_hardware",
    "list_models",
    "load_hardware",
    "max_batch",
    "measure",
    "measure_hardware",
    "memory_footprint",
    "normalize_dtype",
    "operator_cost",
    "plot",
    "ridge_point",
    "roofline_time",
    "weight_bytes",
]


# measure imports torch and plot matplotlib: load them on first attribute access only (PEP 562)
_, __getattr__, _ = lazy_exports(__name__, {"measure": "", "plot": ""})
