"""Benchmark: SmolLM2-135M decode and prefill speed on this CPU against the roofline.

Batch-1 decode reads every weight once per token (float32: ``config.decode_weight_bytes()`` bytes, plus the
KV cache), so its ceiling is ``memory bandwidth / bytes per token`` tokens/s. Prefill of T tokens is a
sequence of matrix-matrix products, bound by the matmul throughput: ``FLOP/s / FLOPs per token``.
Batched decode (``--rows`` sequences, one token each per step, as a batched perplexity evaluation runs) reads
the weights once for all rows; its ceiling is the lower of the two: ``rows / max(bytes / bandwidth,
FLOPs / FLOP/s)`` tokens/s.
Every decode time is also measured with the products on the BLAS (``refimpl.llm.matvec.blas_only``: ``x @ W``
through MKL, the decoder before its C matvec), in the same rounds: ``*_blas`` lines and ``*_speedup_vs_blas``
ratios are the before/after.
``weights_sum_bandwidth_GBps`` is how fast ``torch.sum`` reads the same weight matrices (the simplest stream over
exactly the step's bytes) and ``matvec_vs_weights_sum`` the products' speed against it.
``decode_read_roofline_fraction`` puts the step under the read-only ceiling instead (``measure.read_bandwidth``:
a sum or a matrix-vector product streaming one array): decode mostly reads. On the book's VM a read stream ran
faster than a copy in some runs and slower in others, so either fraction may be the stricter.
Both ceilings are measured in the same run with ``refimpl.roofline.measure`` (STREAM copy bandwidth, best fp32
matmul), in rounds interleaved with the model's timings, so the printed fractions are ratios of measurements
taken side by side on the same machine.

Usage: ``python benchmarks/bench_llm.py [--quick] [--context N] [--steps N] [--prefill-tokens N] [--rows N]
[--threads N]``.
Prints ``name: value`` lines.

The script sets ``GOMP_SPINCOUNT=10000`` unless the environment sets it: idle OpenMP threads spin that many
turns before they sleep. A decode step runs about 120 parallel products with small operations between them;
threads that sleep at once (``OMP_WAIT_POLICY=PASSIVE``) must be woken for each product, which on these VMs
costs more than a small product (``matvec_call_us``, the time of one product of a 4 x 16 matrix, shows it:
compare a run with ``OMP_WAIT_POLICY=PASSIVE``), and threads that spin the GNU default of 300,000
turns hold a shared machine's cores for long after the step.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # read once, when torch loads OpenMP

import torch  # noqa: E402
from _common import report  # noqa: E402

from refimpl.llm import corpus, load_model  # noqa: E402
from refimpl.llm.matvec import blas_only, kernel_available, kernel_matvec, matvec  # noqa: E402
from refimpl.llm.perf import decode_bytes, forward_flops, time_decode, time_matvecs, weight_matrices  # noqa: E402
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

    threads = torch.get_num_threads()  # the ceilings use every core; the model may be given fewer threads
    model_threads = threads if args.threads is None else args.threads
    t = args.prefill_tokens
    rows = ids[: args.context * args.rows].view(args.rows, args.context)  # (rows, context): disjoint slices
    bandwidth = read_bandwidth = peak = 0.0
    s_decode = s_matvecs = s_prefill = s_batch = float("inf")
    s_decode_blas = s_matvecs_blas = s_batch_blas = s_sum = float("inf")
    mats = weight_matrices(model)
    # Interleaved rounds: on a machine shared with other processes the load changes from second to second, so
    # the ceilings and the model are measured in turn, each round, and each keeps its best over the rounds.
    for _ in range(args.repeats):
        torch.set_num_threads(threads)
        bandwidth = max(bandwidth, measure.stream_bandwidth(stream_bytes, repeats=5))  # B/s
        read_bandwidth = max(read_bandwidth, measure.read_bandwidth((stream_bytes,), repeats=3))  # B/s, reads only
        for n in (256,) if args.quick else (512, 1024, 2048):
            peak = max(peak, measure.matmul_flops(n, repeats=2))  # FLOP/s
        torch.set_num_threads(model_threads)
        s_decode = min(s_decode, time_decode(model, ids[: args.context], args.steps, repeats=1))
        s_matvecs = min(s_matvecs, time_matvecs(model, repeats=2))  # the weight reads alone
        s_sum = min(s_sum, measure.time_fn(lambda: [w.sum() for w in mats], repeats=2))  # the same bytes, summed
        # prefill: one forward of T tokens through fresh caches (what generation does)
        s_prefill = min(s_prefill, measure.time_fn(lambda: model(ids[None, :t], model.new_caches(), 0), repeats=1))
        s_batch = min(s_batch, time_decode(model, rows, args.steps, repeats=1))  # rows decoded together
        with blas_only():  # before: the same steps with every product on the BLAS
            s_decode_blas = min(s_decode_blas, time_decode(model, ids[: args.context], args.steps, repeats=1))
            s_matvecs_blas = min(s_matvecs_blas, time_matvecs(model, repeats=2))
            s_batch_blas = min(s_batch_blas, time_decode(model, rows, args.steps, repeats=1))

    # decode: weights once per token + the KV cache read at the mean context of the timed steps
    mean_context = args.context + args.steps // 2
    bytes_per_token = decode_bytes(c, mean_context)
    decode_bound = bandwidth / bytes_per_token
    prefill_bound = peak / (forward_flops(c, t) / t)
    # batched decode: the weights are read once for all rows, each row reads its own KV cache
    batch_bytes = c.decode_weight_bytes() + args.rows * mean_context * c.kv_bytes_per_token()
    batch_bound_s = max(batch_bytes / bandwidth, args.rows * forward_flops(c, 1, mean_context) / peak)

    # the kernel against the BLAS by rows, on every weight matrix of a step (where MAX_ROWS comes from)
    kernel_vs_blas = {}
    for n_rows in (1, 8) if args.quick else (1, 8, 16, 32, 64):
        xs = {w.shape[0]: torch.randn(n_rows, w.shape[0]) for w in mats}
        s = measure.time_interleaved(  # side by side: the same machine state for both
            {
                "kernel": lambda xs=xs: [kernel_matvec(xs[w.shape[0]], w) for w in mats],
                "blas": lambda xs=xs: [xs[w.shape[0]] @ w for w in mats],
            },
            repeats=3,
        )
        kernel_vs_blas[f"matvec_time_vs_blas_rows_{n_rows}"] = s["kernel"] / s["blas"]
    tiny_x, tiny_w = torch.ones(1, 4), torch.ones(4, 16)  # a product whose time is the call and its threads' wake-up
    s_call = measure.time_fn(lambda: [matvec(tiny_x, tiny_w) for _ in range(100)], repeats=5) / 100

    torch.set_num_threads(threads)
    values = {
        "threads": model_threads,
        "matvec_kernel": int(kernel_available()),
        "matvec_call_us": s_call * 1e6,
        "weight_bytes_per_token": bytes_per_token,
        "stream_bandwidth_GBps": bandwidth / 1e9,
        "decode_context": args.context,
        "decode_ms_per_token": s_decode * 1e3,
        "decode_tokens_per_s": 1 / s_decode,
        "decode_bound_tokens_per_s": decode_bound,
        "decode_roofline_fraction": 1 / s_decode / decode_bound,
        "read_bandwidth_GBps": read_bandwidth / 1e9,
        "decode_read_roofline_fraction": bytes_per_token / read_bandwidth / s_decode,
        "decode_matvecs_ms": s_matvecs * 1e3,
        "matvec_bandwidth_GBps": c.decode_weight_bytes() / s_matvecs / 1e9,
        "weights_sum_bandwidth_GBps": c.decode_weight_bytes() / s_sum / 1e9,
        "matvec_vs_weights_sum": s_sum / s_matvecs,
        "decode_ms_per_token_blas": s_decode_blas * 1e3,
        "decode_roofline_fraction_blas": 1 / s_decode_blas / decode_bound,
        "decode_speedup_vs_blas": s_decode_blas / s_decode,
        "matvec_bandwidth_blas_GBps": c.decode_weight_bytes() / s_matvecs_blas / 1e9,
        "matmul_GFLOPs": peak / 1e9,
        "prefill_tokens": t,
        "prefill_tokens_per_s": t / s_prefill,
        "prefill_bound_tokens_per_s": prefill_bound,
        "prefill_roofline_fraction": t / s_prefill / prefill_bound,
        "batch_decode_rows": args.rows,
        "batch_decode_tokens_per_s": args.rows / s_batch,
        "batch_decode_bound_tokens_per_s": args.rows / batch_bound_s,
        "batch_decode_roofline_fraction": batch_bound_s / s_batch,
        "batch_decode_speedup_vs_batch1": args.rows * s_decode / s_batch,
        "batch_decode_speedup_vs_blas": s_batch_blas / s_batch,
        **kernel_vs_blas,
    }
    return report(values)


if __name__ == "__main__":
    main()
