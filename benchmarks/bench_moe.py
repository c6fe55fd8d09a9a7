"""Benchmark the three MoE dispatch paths on one routing, in one run, on the CPU.

    python benchmarks/bench_moe.py            # E=64 experts, k=2, 8192 tokens, d=512 (about a minute)
    python benchmarks/bench_moe.py --quick    # tiny sizes, a few seconds
    python benchmarks/bench_moe.py --threads 1  # pin the thread count (e.g. on a shared machine)

All paths execute the same capacity-filtered top-k routing (capacity factor 1.0, so the dense buffers have
``C = ceil(N k / E)`` slots) and are checked equal before timing. What each timed path does:

* ``loop`` - :func:`refimpl.moe.moe_masked_loop`, the reference: a Python loop over experts that runs every
  expert on every token and multiplies by the (mostly zero) gate, i.e. the MoE equation evaluated literally;
* ``gather_loop`` - :func:`refimpl.moe.moe_gather_loop`: the same loop, but each expert gathers its own tokens
  first (the usual eager implementation); reported so the sorted path is also compared with a fair loop;
* ``dense`` - :func:`refimpl.moe.moe_dense`: one-hot ``(N, E, C)`` dispatch and combine tensors and einsums;
* ``sorted`` - :func:`refimpl.moe.moe_sorted`: argsort by expert, one grouped matmul, scatter-add.

Every line after the header is ``name: number``. Times are the minimum over ``--repeats`` runs, in seconds.
"""

from __future__ import annotations

import torch
from _common import argument_parser, report

from refimpl.moe import (
    apply_capacity,
    dense_dispatch_bytes,
    expert_capacity,
    grouped_mm_supported,
    moe_dense,
    moe_gather_loop,
    moe_masked_loop,
    moe_sorted,
    top_k_gating,
)
from refimpl.roofline.measure import time_interleaved


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argument_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per path (min is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quick:
        n, e, k, d, h, repeats = 256, 8, 2, 32, 32, 2
    else:
        n, e, k, d, h, repeats = 8192, 64, 2, 512, 512, 3
    repeats = args.repeats or repeats

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    w1 = torch.randn(e, d, h, generator=g) / d**0.5
    w2 = torch.randn(e, h, d, generator=g) / h**0.5
    logits = torch.randn(n, e, generator=g)
    capacity = expert_capacity(n, e, k, 1.0)
    routing, dropped = apply_capacity(top_k_gating(logits, k).routing(), capacity)

    with torch.no_grad():
        paths = {
            "loop": lambda: moe_masked_loop(x, routing, w1, w2),
            "gather_loop": lambda: moe_gather_loop(x, routing, w1, w2),
            "dense": lambda: moe_dense(x, routing, w1, w2, capacity),
            "sorted": lambda: moe_sorted(x, routing, w1, w2),
        }
        reference = paths["loop"]()
        max_diff = max(float((paths[p]() - reference).abs().max()) for p in ("gather_loop", "dense", "sorted"))
        scale = float(reference.abs().max())
        if max_diff > 1e-4 * max(scale, 1.0):
            raise RuntimeError(f"dispatch paths disagree: max |diff| = {max_diff:.3g} (output scale {scale:.3g})")
        seconds = time_interleaved(paths, repeats=repeats)

    itemsize = x.element_size()
    results = {
        "tokens": n,
        "experts": e,
        "k": k,
        "d_model": d,
        "d_hidden": h,
        "capacity": capacity,
        "assignments_kept": routing.n_assignments,
        "assignments_dropped": int(dropped.sum()),
        "sorted_uses_grouped_mm": int(grouped_mm_supported(x, w1)),
        "max_abs_diff_vs_loop": max_diff,
        **{f"{name}_s": s for name, s in seconds.items()},
        "sorted_vs_loop_speedup": seconds["loop"] / seconds["sorted"],
        "sorted_vs_gather_loop_speedup": seconds["gather_loop"] / seconds["sorted"],
        "sorted_vs_dense_speedup": seconds["dense"] / seconds["sorted"],
        "dense_dispatch_tensor_bytes": dense_dispatch_bytes(n, e, capacity, x.dtype),
        "dense_dispatch_plus_combine_bytes": 2 * dense_dispatch_bytes(n, e, capacity, x.dtype),
        "sorted_permuted_rows_bytes": routing.n_assignments * d * itemsize,
    }
    report(results, header=f"bench_moe: torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU")
    return results


if __name__ == "__main__":
    main()
