"""Tiled FlashAttention vs standard attention on the CPU: time and peak extra memory, in one run.

    python benchmarks/bench_attention.py            # time at N=4096, memory at N=8192, d=64, fp32 (~1-2 min)
    python benchmarks/bench_attention.py --quick    # tiny sizes, a few seconds

Both paths compute the same exact attention (checked equal before timing) for one sequence and one head
(``B = H = 1``), non-causal, float32:

* ``naive`` - :func:`refimpl.attention.naive_attention`: ``S = QK^T``, ``softmax``, ``PV``; the ``N x N`` scores
  and probabilities are materialised (and kept by autograd for the backward);
* ``flash`` - :func:`refimpl.attention.flash_attention`: the FA2-order tiled loop with ``--block`` x ``--block``
  tiles; the backward recomputes the tiles from the saved log-sum-exp.

Times are the minimum over ``--repeats`` interleaved runs, in seconds. Peak memory is the peak of the net bytes
of CPU tensor storage allocated during the call, replayed from the profiler's allocation events
(:func:`refimpl.attention.peak_memory`; the inputs are not counted, the output and the gradients are).

The run uses ``--threads`` intra-op threads (default 1) for both paths. The tiled loop issues many small
operations; on a 2-core machine shared with other processes, OpenMP's fork/join per operation costs more than
the parallel speed-up, so one thread is the fair setting there. Every line after the header is ``name: number``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from _common import argument_parser, report

from refimpl.attention import flash_attention, naive_attention, peak_memory
from refimpl.roofline.measure import time_interleaved


def _inputs(n: int, d: int, requires_grad: bool) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 1, n, d, generator=g) for _ in range(4))
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_()
    return q, k, v, do


def _fwd_bwd(attn: Callable[..., torch.Tensor], q, k, v, do) -> Callable[[], None]:
    def run() -> None:
        attn(q, k, v).backward(do)

    return run


def _fresh_peak(fn: Callable[[], None], *leaves: torch.Tensor) -> int:
    """Peak memory of a forward + backward, the gradients it allocates included (dropped before the run)."""
    for t in leaves:
        t.grad = None
    return peak_memory(fn)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argument_parser(__doc__, threads=True)
    parser.add_argument("--block", type=int, default=256, help="tile size B_r = B_c of the tiled loop")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per path (min is reported)")
    args = parser.parse_args(argv)
    n_time, n_mem, d, repeats = (256, 512, 16, 2) if args.quick else (4096, 8192, 64, 3)
    repeats = args.repeats or repeats
    block = min(args.block, n_time)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        naive = lambda q, k, v: naive_attention(q, k, v)  # noqa: E731
        flash = lambda q, k, v: flash_attention(q, k, v, False, None, block, block)  # noqa: E731
        results: dict[str, float] = {"threads": args.threads, "block": block, "d": d}

        # Time: forward, then forward + backward, at N = n_time.
        q, k, v, do = _inputs(n_time, d, requires_grad=False)
        err = (naive(q, k, v) - flash(q, k, v)).abs().max().item()
        assert err < 1e-4, f"flash and naive disagree by {err}"
        t = time_interleaved({"naive": lambda: naive(q, k, v), "flash": lambda: flash(q, k, v)}, repeats=repeats)
        results.update(time_n=n_time, naive_forward_s=t["naive"], flash_forward_s=t["flash"])
        results["flash_vs_naive_time_ratio"] = t["flash"] / t["naive"]
        qg, kg, vg, do = _inputs(n_time, d, requires_grad=True)
        t = time_interleaved(
            {"naive": _fwd_bwd(naive, qg, kg, vg, do), "flash": _fwd_bwd(flash, qg, kg, vg, do)}, repeats=repeats
        )
        results.update(naive_fwd_bwd_s=t["naive"], flash_fwd_bwd_s=t["flash"])
        results["flash_vs_naive_fwd_bwd_time_ratio"] = t["flash"] / t["naive"]

        # Peak extra memory: forward (no autograd graph), then forward + backward, at N = n_mem.
        q, k, v, do = _inputs(n_mem, d, requires_grad=False)
        mem_naive = peak_memory(lambda: naive(q, k, v))
        mem_flash = peak_memory(lambda: flash(q, k, v))
        qg, kg, vg, do = _inputs(n_mem, d, requires_grad=True)
        mem_naive_b = _fresh_peak(_fwd_bwd(naive, qg, kg, vg, do), qg, kg, vg)
        mem_flash_b = _fresh_peak(_fwd_bwd(flash, qg, kg, vg, do), qg, kg, vg)
        results.update(
            memory_n=n_mem,
            naive_peak_memory_mib=mem_naive / 2**20,
            flash_peak_memory_mib=mem_flash / 2**20,
            naive_fwd_bwd_peak_memory_mib=mem_naive_b / 2**20,
            flash_fwd_bwd_peak_memory_mib=mem_flash_b / 2**20,
        )
        results["flash_vs_naive_peak_memory_ratio"] = mem_flash / mem_naive
        results["flash_vs_naive_fwd_bwd_peak_memory_ratio"] = mem_flash_b / mem_naive_b
    finally:
        torch.set_num_threads(previous_threads)

    report(results, header=f"attention, B=1 H=1 d={d} float32, time at N={n_time}, memory at N={n_mem}")
    return results


if __name__ == "__main__":
    main()
