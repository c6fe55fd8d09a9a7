"""Command line: ``python -m refimpl.roofline --model llama-2-7b --hardware a100-40gb --batch 1 --seq 1024``.

Prints the totals of both stages as ``name: value`` lines (``prefill_ms``, ``decode_step_ms``, ``kv_cache_gb``,
``weights_gb``, ...; GB = 10^9 bytes), and with ``--table`` the per-operator tables.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import replace

from refimpl.roofline.analyzer import Workload, analyze, max_batch
from refimpl.roofline.hardware import DTYPE_BITS, list_hardware, load_hardware
from refimpl.roofline.models import list_models


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; ``--help`` lists the known models and hardware."""
    models, hardware = list_models(), list_hardware()
    parser = argparse.ArgumentParser(
        prog="python -m refimpl.roofline",
        description="Roofline estimate of LLM prefill and decode. "
        f"Known models: {', '.join(models)}. Known hardware: {', '.join(hardware)} ('cpu' is measured).",
    )
    parser.add_argument("--model", required=True, choices=models, help="model config")
    parser.add_argument("--hardware", required=True, choices=hardware, help="hardware ceilings")
    parser.add_argument("--batch", type=int, default=1, help="sequences per batch (default 1)")
    parser.add_argument("--seq", type=int, default=1024, help="prompt / context length (default 1024)")
    parser.add_argument(
        "--dtype", default=None, choices=list(DTYPE_BITS), help="compute dtype (default fp16, or fp32 on 'cpu')"
    )
    parser.add_argument("--weight-bits", type=float, default=None, help="bits per weight (default: dtype)")
    parser.add_argument("--kv-bits", type=float, default=None, help="bits per KV element (default: dtype)")
    parser.add_argument("--kv-budget", type=int, default=None, help="KV tokens kept per sequence (eviction)")
    parser.add_argument("--active-experts", type=int, default=None, help="experts per token (MoE models)")
    parser.add_argument("--no-flash-attention", action="store_true", help="materialize the attention scores")
    parser.add_argument("--table", action="store_true", help="also print the per-operator tables")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    hardware = load_hardware(args.hardware)
    dtype = args.dtype or ("fp16" if "fp16" in hardware.peak_flops else "fp32")
    try:
        workload = Workload(
            batch=args.batch,
            seq=args.seq,
            dtype=dtype,
            weight_bits=args.weight_bits,
            kv_bits=args.kv_bits,
            kv_budget=args.kv_budget,
            active_experts=args.active_experts,
            flash_attention=not args.no_flash_attention,
        )
        prefill = analyze(args.model, hardware, replace(workload, stage="prefill"))
        decode = analyze(args.model, hardware, replace(workload, stage="decode"))
        fits = max_batch(args.model, hardware, workload)
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    if args.table:
        print(prefill.table(), end="\n\n")
        print(decode.table(), end="\n\n")
    lines = {
        "model": args.model,
        "hardware": args.hardware,
        "dtype": dtype,
        "prefill_ms": prefill.time * 1e3,
        "prefill_bound": prefill.bound,
        "prefill_intensity_flop_per_byte": prefill.intensity,
        "decode_step_ms": decode.time * 1e3,
        "decode_bound": decode.bound,
        "decode_intensity_flop_per_byte": decode.intensity,
        "decode_tokens_per_s": decode.batch / decode.time,
        "ridge_point_flop_per_byte": decode.ridge_point,
        "weights_gb": decode.memory.weights / 1e9,
        "kv_cache_gb": decode.memory.kv_cache / 1e9,
        "memory_total_gb": decode.memory.total / 1e9,
        "max_batch": fits,
    }
    for name, value in lines.items():
        print(f"{name}: {value:.6g}" if isinstance(value, float) else f"{name}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
