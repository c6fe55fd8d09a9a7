"""MEMO on a GPU: peak memory, step time, longest sequence that fits and achieved overlap, per strategy.

    python benchmarks/bench_memo_gpu.py            # L=8, h=1024, 16 heads, bf16, s = 2k, 4k, 8k, ... until OOM
    python benchmarks/bench_memo_gpu.py --quick    # L=2, h=256, s in {1024, 2048} (a smoke test on a GPU)

For each sequence length and each strategy of ``refimpl.memo.strategies`` (keep everything, full
recomputation, full offload, MEMO at ``--alphas``) it runs warm-up + ``--repeats`` training steps of a stack of
the book's :class:`refimpl.memo.TransformerBlock` (bf16, dropout 0.1, ``--tile`` tokens per tile) and records:

* ``peak_bytes``: ``torch.cuda.max_memory_allocated`` during a step minus the memory allocated before it
  (weights, gradients and the input are excluded), and the ledger's activation peak;
* ``step_seconds``: median of CUDA-event-timed steps (forward + backward);
* ``oom``: whether the step ran out of memory (the longest length that fits per strategy is derived from it);
* for the offloading strategies, ``copy_seconds``: the time to move the same bytes device -> host -> device
  with nothing else running (pinned buffers), and ``overlap = 1 - max(0, T - T_ideal) / copy_seconds``, where
  ``T_ideal`` is the keep-everything step plus, for MEMO, ``(1 - alpha)`` of the extra time of full recomputation:
  1 means the copies were fully hidden behind compute, 0 that they were fully exposed.

The block is the book's (attention materializes the probabilities, as in Korthikanti et al.'s accounting),
not FlashAttention: token-wise recomputation needs every tile recomputed with the same kernel calls.

Writes a recording (JSON: device, date, library versions, command, configuration, rows) to ``--out`` (default
``data/measurements/memo_gpu.json``; not written with ``--quick`` unless ``--out`` is given) and prints
``name: value`` lines. Exits with status 2 and a message when no CUDA device exists.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
from _common import argument_parser, progress, report, require_cuda

from refimpl.recording import provenance, write_recording

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "data" / "measurements" / "memo_gpu.json"


def _strategies(alphas: list[float]) -> dict:
    from refimpl.memo import FullOffload, FullRecompute, KeepAll, MemoTokenwise

    out = {"keep": KeepAll(), "recompute": FullRecompute(), "offload": FullOffload()}
    out.update({f"memo_{a:g}": MemoTokenwise(a) for a in alphas})
    return out


def _copy_seconds(nbytes: int, device: torch.device) -> float:
    """Device -> pinned host -> device round trip of ``nbytes`` with nothing else running."""
    src = torch.empty(max(1, nbytes), dtype=torch.uint8, device=device)
    host = torch.empty(src.shape, dtype=torch.uint8, pin_memory=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    host.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    start.record()
    host.copy_(src, non_blocking=True)
    src.copy_(host, non_blocking=True)
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / 1e3


def _step(layers, x0, grad, strategy, device):  # noqa: ANN001, ANN202
    """One training step: (seconds by CUDA events, peak bytes above the start, ledger)."""
    from refimpl.memo import Ledger, train_step

    for p in layers.parameters():
        p.grad = None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ledger = Ledger()
    start.record()
    train_step(layers, x0.clone().requires_grad_(True), grad, strategy, ledger)
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / 1e3, torch.cuda.max_memory_allocated(device) - base, ledger


def main(argv: list[str] | None = None) -> dict:
    parser = argument_parser(__doc__, "small sizes, no recording unless --out")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help=f"recording path (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    require_cuda("bench_memo_gpu", "GPU memory, streams and host transfers", "benchmarks/bench_memo.py")
    from refimpl.memo import block_activation_bytes, make_stack

    if args.quick:
        args.layers, args.hidden, args.heads, args.tile, args.seqs, args.repeats = 2, 256, 4, 256, [1024, 2048], 2
    device = torch.device("cuda")
    dtype = torch.bfloat16
    layers = make_stack(args.layers, args.hidden, args.heads, tile=args.tile, dropout=0.1, seed=0)
    layers = layers.to(device=device, dtype=dtype)
    rows: list[dict] = []
    out_of_memory: set[str] = set()
    for s in progress(args.seqs, desc="bench_memo_gpu"):
        gen = torch.Generator(device=device).manual_seed(0)
        x0 = torch.randn(s, 1, args.hidden, device=device, dtype=dtype, generator=gen)
        grad = torch.randn(s, 1, args.hidden, device=device, dtype=dtype, generator=gen)
        act = sum(block_activation_bytes(s, 1, args.hidden, args.heads, act_bytes=2).values())
        times: dict[str, float] = {}
        for name, strategy in _strategies(args.alphas).items():
            row = {"seq": s, "strategy": name, "layer_activation_bytes": act}
            if name in out_of_memory:  # a shorter sequence already ran out
                rows.append({**row, "oom": True})
                continue
            try:
                _step(layers, x0, grad, strategy, device)  # warm-up (allocator, pinned pool)
                runs = [_step(layers, x0, grad, strategy, device) for _ in range(args.repeats)]
            except torch.cuda.OutOfMemoryError:
                out_of_memory.add(name)
                torch.cuda.empty_cache()
                rows.append({**row, "oom": True})
                continue
            seconds = statistics.median(r[0] for r in runs)
            times[name] = seconds
            ledger = runs[-1][2]
            row.update(
                oom=False,
                step_seconds=seconds,
                peak_bytes=max(r[1] for r in runs),
                ledger_peak_device_bytes=ledger.device.peak,
                ledger_peak_host_bytes=ledger.host.peak,
                bytes_to_host=ledger.bytes_to_host,
            )
            if ledger.bytes_to_host:
                copy = _copy_seconds(ledger.bytes_to_host, device)
                alpha = 1.0 if name == "offload" else float(name.split("_")[1])
                ideal = times.get("keep", float("nan"))
                if name != "offload":
                    ideal += (1 - alpha) * (times.get("recompute", float("nan")) - times.get("keep", float("nan")))
                row.update(copy_seconds=copy, overlap=1 - max(0.0, seconds - ideal) / copy)
            rows.append(row)
            print(
                f"# seq {s} {name}: step {seconds * 1e3:.1f} ms, peak {row['peak_bytes'] / 2**30:.2f} GiB"
                + (f", overlap {row['overlap']:.2f}" if "overlap" in row else ""),
                flush=True,
            )
    longest = {
        name: max((r["seq"] for r in rows if r["strategy"] == name and not r["oom"]), default=0)
        for name in _strategies(args.alphas)
    }
    summary = {f"memo_gpu_longest_seq_{name}": float(v) for name, v in longest.items()}
    report(summary)
    out_path = args.out if (args.out is not None or args.quick) else DEFAULT_OUT
    if out_path is not None:
        record = {
            "benchmark": "memo_gpu",
            **provenance("python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])),
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "rows": rows,
            "longest_seq": longest,
        }
        write_recording(out_path, record)
        print(f"# recorded to {out_path}")
    return summary


if __name__ == "__main__":
    main()
