"""MEMO on the CPU: peak activation memory and step time of each strategy for a small GPT stack, in one run.

    python benchmarks/bench_memo.py            # L=4 layers, s=512 tokens, h=128, 4 heads, tiles of 64 (~1 min)
    python benchmarks/bench_memo.py --quick    # tiny sizes, a few seconds

Strategies (``refimpl.memo.strategies``): keep everything (the baseline), full recomputation, full offload, and
MEMO token-wise at the chosen ``alpha``. Peak memory is the :class:`refimpl.memo.Ledger`'s peak of activation
bytes on the "device" (exact, deterministic); step time is forward + backward wall time, the minimum over
``--repeats`` interleaved rounds. Float32, dropout 0.1.

The chosen alpha follows the overlap rule of ``refimpl.memo.overlap`` with quantities measured in this run:
``alpha = min(1, T_f B / A, C_host / (L A))`` rounded down to whole tiles, where ``T_f`` is one layer's forward
time (a third of the baseline step over ``L``), ``B`` the measured copy bandwidth into a fresh host buffer (the
CPU's "host link"), ``A`` one layer's activation bytes and ``C_host = --host-fraction x L A`` the host budget.

Runs with ``--threads`` intra-op threads (default 1: on a small shared machine OpenMP's fork/join per small
operation costs more than it gains). Every line after the header is ``name: number``; ratios are against keep-
everything measured in the same run.
"""

from __future__ import annotations

import math
import time

import torch
from _common import argument_parser, progress, report

from refimpl.memo import (
    FullOffload,
    FullRecompute,
    KeepAll,
    Ledger,
    MemoTokenwise,
    block_activation_bytes,
    make_stack,
    train_step,
)


def _copy_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Bytes/s of copying ``nbytes`` into a new buffer (what offloading one layer does on the CPU)."""
    src = torch.randn(max(1, nbytes // 4))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.empty_like(src).copy_(src)
        best = min(best, time.perf_counter() - start)
    return src.nbytes / best


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argument_parser(__doc__, "tiny sizes", threads=True)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--tile", type=int, default=64)
    parser.add_argument("--host-fraction", type=float, default=0.5, help="host budget / keep-all activation bytes")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.seq, args.hidden, args.heads, args.tile, args.repeats = 2, 32, 16, 2, 8, 2
    torch.set_num_threads(args.threads)
    L, s, b, h, a = args.layers, args.seq, args.batch, args.hidden, args.heads
    layers = make_stack(L, h, a, tile=args.tile, dropout=0.1, seed=0)
    gen = torch.Generator().manual_seed(0)
    x0, grad = torch.randn(s, b, h, generator=gen), torch.randn(s, b, h, generator=gen)
    act = sum(block_activation_bytes(s, b, h, a, act_bytes=4).values())  # one layer, float32

    def run(strategy):  # noqa: ANN001, ANN202
        for p in layers.parameters():
            p.grad = None
        return train_step(layers, x0.clone().requires_grad_(True), grad, strategy, Ledger())

    run(KeepAll())  # warm-up
    keep_time = min(run(KeepAll()).seconds for _ in range(args.repeats))
    t_f = keep_time / 3 / L
    link = _copy_bandwidth(act)
    alpha_link = min(1.0, t_f * link / act)
    alpha_host = min(1.0, args.host_fraction)  # C_host / (L A) with C_host = fraction * L A
    n_tiles = math.ceil(s / args.tile)
    alpha = math.floor(min(alpha_link, alpha_host) * n_tiles + 1e-9) / n_tiles

    strategies = {
        "keep": KeepAll(),
        "recompute": FullRecompute(),
        "offload": FullOffload(),
        "memo": MemoTokenwise(alpha),
    }
    best = dict.fromkeys(strategies, float("inf"))
    peaks, host = {}, {}
    for _ in progress(range(args.repeats), desc="bench_memo"):  # interleaved rounds: noise hits all alike
        for name, strategy in strategies.items():
            result = run(strategy)
            best[name] = min(best[name], result.seconds)
            peaks[name], host[name] = result.ledger.device.peak, result.ledger.host.peak
    out = {
        "memo_alpha": alpha,
        "memo_alpha_link": alpha_link,
        "memo_alpha_host": alpha_host,
        "memo_peak_memory_ratio": peaks["memo"] / peaks["keep"],
        "memo_step_time_ratio": best["memo"] / best["keep"],
        "memo_host_memory_ratio": host["memo"] / peaks["keep"],
        "recompute_peak_memory_ratio": peaks["recompute"] / peaks["keep"],
        "recompute_step_time_ratio": best["recompute"] / best["keep"],
        "offload_peak_memory_ratio": peaks["offload"] / peaks["keep"],
        "offload_step_time_ratio": best["offload"] / best["keep"],
        "keep_peak_megabytes": peaks["keep"] / 1e6,
        "keep_step_seconds": best["keep"],
    }
    report(out, header=f"bench_memo: L={L} s={s} b={b} h={h} a={a} tile={args.tile} float32, threads={args.threads}")
    return out


if __name__ == "__main__":
    main()
