"""Benchmark (simulated): dispatch policies of a serving cluster, round-robin vs least-loaded vs Llumnix migration.

Model arithmetic, not a measurement: :mod:`refimpl.serving.cluster` simulates ``--instances`` instances of
Llama-2-7B on ``--hardware`` (step times a linear fit to the roofline analyzer), each with ``--blocks`` KV blocks
of 16 tokens, serving the same seeded Poisson trace of heavy-tailed requests under each policy, for
``--seeds`` seeds. Prints, per policy, the mean over seeds of P50/P99 time to first token and end-to-end
latency, preemptions, migrations and throughput, and the ratios against round-robin in the same run
(``migration_p99_vs_round_robin``: Llumnix's P99 end-to-end latency over round-robin's;
``migration_ttft_p99_vs_round_robin``: the same for time to first token; ``..._vs_least_loaded`` likewise),
each with its standard error over seeds (``_se``). ``--sweep-rates`` adds a load sweep: at each rate, per policy,
the mean P99 time to first token and per output token, preemptions and fragmentation (free blocks stranded
while a queue waits for blocks), and the paired changes of Llumnix's P99 time to first token against the other
two policies (``_se``: standard error over seeds).

Usage: ``python benchmarks/bench_cluster.py [--quick] [--requests N] [--rate R] [--instances N] [--blocks N]
[--seeds N] [--hardware NAME] [--sweep-rates R,R,..]``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import report  # noqa: E402

from refimpl.serving.cluster import POLICIES, LinearCost, load_sweep, paired_change, policy_sweep  # noqa: E402


def main(argv: Sequence[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    p.add_argument("--requests", type=int, default=600)
    p.add_argument("--rate", type=float, default=50.0, help="arrivals per second (cluster-wide)")
    p.add_argument("--instances", type=int, default=4)
    p.add_argument("--blocks", type=int, default=600, help="KV blocks of 16 tokens per instance")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--hardware", default="h100-sxm")
    p.add_argument("--sweep-rates", default="25,50,75", help="arrival rates of the load sweep ('' to skip)")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.seeds, args.sweep_rates = 150, 2, "25,75"
    cost = LinearCost.from_roofline("llama-2-7b", args.hardware)

    sweep = policy_sweep(range(args.seeds), args.requests, args.rate, args.instances, args.blocks, cost)
    values: dict[str, float] = {"requests": args.requests, "rate_per_s": args.rate, "seeds": args.seeds}
    for policy, m in sweep.items():
        for key in ("ttft_p50", "ttft_p99", "latency_p50", "latency_p99", "preemptions", "migrations", "throughput"):
            values[f"{policy}_{key}"] = float(m[key].mean())
    for base in ("round_robin", "least_loaded"):
        for key, name in (("latency_p99", "p99"), ("ttft_p99", "ttft_p99")):
            change = paired_change(sweep["llumnix"][key], sweep[base][key])  # per-seed ratios: same trace
            values[f"migration_{name}_vs_{base}"] = 1 + change.mean
            values[f"migration_{name}_vs_{base}_se"] = change.se
    rates = [float(r) for r in args.sweep_rates.split(",") if r]
    if rates:
        loads = load_sweep(rates, range(args.seeds), args.requests, args.instances, args.blocks, cost)
        for i, rate in enumerate(rates):
            for policy in POLICIES:
                for key in ("ttft_p99", "tpot_p99", "preemptions", "fragmentation"):
                    values[f"sweep_{rate:g}_{policy}_{key}"] = float(loads[policy][key][i].mean())
            for base in ("round_robin", "least_loaded"):
                change = paired_change(loads["llumnix"]["ttft_p99"][i], loads[base]["ttft_p99"][i])
                values[f"sweep_{rate:g}_migration_ttft_p99_vs_{base}"] = 1 + change.mean
                values[f"sweep_{rate:g}_migration_ttft_p99_vs_{base}_se"] = change.se
    return report(values, header="simulated (model arithmetic): Llama-2-7B instances, step times from the roofline")


if __name__ == "__main__":
    main()
