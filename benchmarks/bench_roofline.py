"""Benchmark of the roofline chapter: this machine's ceilings, and measured vs predicted decode layers.

    python benchmarks/bench_roofline.py            # ceilings and ratios on this machine
    python benchmarks/bench_roofline.py --quick    # tiny sizes (used by the tests)
    python benchmarks/bench_roofline.py --decode-sweep --hardware h100-sxm   # on a GPU: record the batch sweep

Prints ``name: value`` lines. ``--decode-sweep`` times one Llama-2-7B-shaped decoder layer (random weights,
fp16 on a GPU) for batch 1, 2, 4, ... and writes the recording, with its provenance (device, date, versions,
command), to ``data/measurements/roofline_decode_<device>.json``; the roofline chapter plots it beside the
prediction for ``--hardware``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from _common import argument_parser, report

from refimpl.recording import provenance, write_recording
from refimpl.roofline import Workload, analyze, list_hardware, list_models, measure, measure_hardware
from refimpl.roofline.ops import elementwise, matmul

ROOT = Path(__file__).resolve().parents[1]


def ceilings(quick: bool) -> None:
    """Measure the two ceilings and how far below them a GEMV and an elementwise add run."""
    sizes = (64, 128) if quick else (256, 512, 1024)
    nbytes = 2**22 if quick else 2**26
    hw = measure_hardware(matmul_sizes=sizes, stream_nbytes=nbytes, repeats=3)
    n = 256 if quick else 4096
    w, x = torch.randn(n, n), torch.randn(n)
    gemv = matmul("gemv", 1, n, n, act_bytes=4, weight_bytes=4)
    gemv_flops = gemv.flops / measure.time_fn(lambda: torch.mv(w, x), repeats=5)
    a, b, out = torch.randn(n * n), torch.randn(n * n), torch.empty(n * n)
    add = elementwise("add", n * n, flops_per_element=1, n_inputs=2, act_bytes=4)
    add_flops = add.flops / measure.time_fn(lambda: torch.add(a, b, out=out), repeats=5)
    model = "smollm2-135m"
    context = 64 if quick else 512
    measured = measure.decode_layer_time(model, batch=1, context=context, repeats=3)
    predicted = analyze(model, hw, Workload(stage="decode", batch=1, seq=context, dtype="fp32")).layer_time
    report(
        {
            "stream_bandwidth_gbps": hw.memory_bandwidth / 1e9,
            "matmul_gflops_fp32": hw.peak("fp32") / 1e9,
            "ridge_point_flop_per_byte": hw.ridge_point("fp32"),
            "gemm_over_gemv_flops_ratio": hw.peak("fp32") / gemv_flops,
            "gemv_bandwidth_fraction": gemv.bytes / (gemv.flops / gemv_flops) / hw.memory_bandwidth,
            "add_bandwidth_fraction": add.bytes / (add.flops / add_flops) / hw.memory_bandwidth,
            "smollm2_decode_layer_measured_over_predicted": measured / predicted,
        }
    )


def decode_sweep(model: str, hardware: str, context: int, max_batch: int, quick: bool) -> Path:
    """Time one decoder layer of a decode step for batch 1, 2, 4, ..., max_batch; write the recording."""
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = "fp16" if cuda else "fp32"
    rows = []
    batch = 1
    while batch <= max_batch:
        try:
            seconds = measure.decode_layer_time(
                model, batch=batch, context=context, dtype=dtype, device=device, repeats=3 if quick else 10
            )
        except torch.OutOfMemoryError:
            report({"out_of_memory_at_batch": batch})
            break
        predicted = analyze(model, hardware, Workload(stage="decode", batch=batch, seq=context, dtype=dtype)).layer_time
        rows.append({"batch": batch, "measured_layer_s": seconds, "predicted_layer_s": predicted})
        report({f"decode_layer_ms_b{batch}": seconds * 1e3, f"predicted_layer_ms_b{batch}": predicted * 1e3})
        batch *= 2
        if cuda:
            torch.cuda.empty_cache()
    record = {
        "what": f"one {model}-shaped decoder layer of a decode step, random weights, {dtype}",
        "model": model,
        "context": context,
        "dtype": dtype,
        "predicted_for_hardware": hardware,
        **provenance("python benchmarks/bench_roofline.py " + " ".join(sys.argv[1:])),
        "rows": rows,
    }
    slug = re.sub(r"[^a-z0-9]+", "-", record["device"].lower()).strip("-")
    out = ROOT / "data" / "measurements" / f"roofline_decode_{slug}.json"
    if not quick:
        write_recording(out, record)
        report({"recorded": out.relative_to(ROOT)})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argument_parser(__doc__, "tiny sizes")
    parser.add_argument("--decode-sweep", action="store_true", help="time a decode layer over batch sizes")
    parser.add_argument("--model", default="llama-2-7b", choices=list_models())
    parser.add_argument("--hardware", default="h100-sxm", choices=list_hardware(), help="for the prediction")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--max-batch", type=int, default=1024)
    args = parser.parse_args(argv)
    if args.decode_sweep:
        if args.quick:  # a tiny sweep on this machine; writes nothing
            decode_sweep("smollm2-135m", "cpu", 32, 4, quick=True)
        else:
            decode_sweep(args.model, args.hardware, args.context, args.max_batch, quick=False)
    else:
        ceilings(args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
