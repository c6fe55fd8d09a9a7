"""Benchmark: SmolLM2-135M decode and prefill speed on this CPU against the roofline.

Batch-1 decode reads every weight once per token (float32: ``config.decode_weight_bytes()`` bytes, plus the
KV cache), so its ceiling is ``memory bandwidth / bytes per token`` tokens/s. Prefill of T tokens is a
sequence of matrix-matrix products, bound by the matmul throughput: ``FLOP/s / FLOPs per token``.
Batched decode (``--rows`` sequences, one token each per step, as a batched perplexity evaluation runs) reads
the weights once for all rows; its ceiling is the lower of the two: ``rows / max(bytes / bandwidth,
FLOPs / FLOP/s)`` tokens/s.
Both ceilings are measured in the same run with ``refimpl.roofline.measure`` (STREAM copy bandwidth, best fp32
matmul), so the printed fractions are ratios of two measurements on the same machine.

Usage: ``python benchmarks/bench_llm.py [--quick] [--context N] [--steps N] [--prefill-tokens N] [--rows N]
[--threads N]``.
Prints ``name: value`` lines.

The script sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it: by default OpenMP threads spin
while they wait, and on a machine shared with other processes every small parallel operation of a decode step
then waits for a time slice (decode slows down many times over).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch loads OpenMP

import torch  # noqa: E402

from refimpl.llm import corpus, load_model  # noqa: E402
from refimpl.llm.perf import decode_bytes, forward_flops, time_decode, time_matvecs  # noqa: E402
from refimpl.roofline import measure  # noqa: E402


def main(argv: Sequence[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    p.add_argument("--context", type=int, default=128, help="prompt tokens before the timed decode steps")
    p.add_argument("--steps", type=int, default=32, help="decode steps per timed run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prefill-tokens", type=int, default=256)
    p.add_argument("--rows", type=int, default=8, help="sequences decoded together in the batched measurement")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the model (default: torch's)")
    args = p.parse_args(argv)
    if args.quick:
        args.context, args.steps, args.repeats, args.prefill_tokens, args.rows = 8, 3, 1, 16, 2
    stream_bytes = (16 if args.quick else 256) * 2**20

    model, tok = load_model()
    c = model.config
    ids = corpus.eval_ids(max(args.context * args.rows, args.prefill_tokens), tok)

    bandwidth = measure.stream_bandwidth(stream_bytes, repeats=3 if args.quick else 5)  # B/s
    peak = max(
        measure.matmul_flops(n, repeats=2 if args.quick else 5) for n in ((256,) if args.quick else (512, 1024, 2048))
    )
    threads = torch.get_num_threads()  # the ceilings use every core; the model may be given fewer threads
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    # decode: weights once per token + the KV cache read at the mean context of the timed steps
    s_decode = time_decode(model, ids[: args.context], args.steps, args.repeats)
    bytes_per_token = decode_bytes(c, args.context + args.steps // 2)  # KV read at the mean context
    s_matvecs = time_matvecs(model, repeats=args.repeats + 2)  # the weight reads alone
    decode_bound = bandwidth / bytes_per_token

    # prefill: one forward of T tokens through fresh caches (what generation does), min over repeats
    t = args.prefill_tokens
    s_prefill = measure.time_fn(lambda: model(ids[None, :t], model.new_caches(), 0), repeats=args.repeats)
    flops_per_token = forward_flops(c, t) / t
    prefill_bound = peak / flops_per_token

    # batched decode: rows disjoint slices of the corpus, decoded together
    rows = ids[: args.context * args.rows].view(args.rows, args.context)  # (rows, context)
    s_batch = time_decode(model, rows, args.steps, args.repeats)
    mean_context = args.context + args.steps // 2
    batch_bytes = c.decode_weight_bytes() + args.rows * mean_context * c.kv_bytes_per_token()  # weights shared
    batch_bound_s = max(batch_bytes / bandwidth, args.rows * forward_flops(c, 1, mean_context) / peak)

    model_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    lines = [
        f"threads: {model_threads}",
        f"weight_bytes_per_token: {bytes_per_token:.0f}",
        f"stream_bandwidth_GBps: {bandwidth / 1e9:.3f}",
        f"decode_context: {args.context}",
        f"decode_ms_per_token: {s_decode * 1e3:.3f}",
        f"decode_tokens_per_s: {1 / s_decode:.3f}",
        f"decode_bound_tokens_per_s: {decode_bound:.3f}",
        f"decode_roofline_fraction: {1 / s_decode / decode_bound:.3f}",
        f"decode_matvecs_ms: {s_matvecs * 1e3:.3f}",
        f"matvec_bandwidth_GBps: {c.decode_weight_bytes() / s_matvecs / 1e9:.3f}",
        f"matmul_GFLOPs: {peak / 1e9:.3f}",
        f"prefill_tokens: {t}",
        f"prefill_tokens_per_s: {t / s_prefill:.3f}",
        f"prefill_bound_tokens_per_s: {prefill_bound:.3f}",
        f"prefill_roofline_fraction: {t / s_prefill / prefill_bound:.3f}",
        f"batch_decode_rows: {args.rows}",
        f"batch_decode_tokens_per_s: {args.rows / s_batch:.3f}",
        f"batch_decode_bound_tokens_per_s: {args.rows / batch_bound_s:.3f}",
        f"batch_decode_roofline_fraction: {batch_bound_s / s_batch:.3f}",
        f"batch_decode_speedup_vs_batch1: {args.rows * s_decode / s_batch:.3f}",
    ]
    for line in lines:
        print(line)
    return lines


if __name__ == "__main__":
    main()
