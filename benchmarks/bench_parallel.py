"""Benchmark the parallel-training techniques of refimpl.parallel on 2 local CPU processes (gloo), in one spawn.

    python benchmarks/bench_parallel.py            # the chapter's model, d_model=128 (under a minute)
    python benchmarks/bench_parallel.py --quick    # d_model=32, fewer steps

Every technique is first checked equal to one process (the run stops if it is not). Lines printed:

* ``dp_overlap_fraction`` - share of the bucketed gradient all-reduce hidden under backward: 1 - (wait left
  after backward) / (the same all-reduces alone), median over steps after the first;
* ``pipeline_bubble_measured`` / ``pipeline_bubble_predicted`` - GPipe's idle share on 2 stages, 4 micro-batches,
  measured from the stages' compute intervals, and ``(p - 1) / (m + p - 1)``;
* ``zero1_optimizer_bytes_ratio`` - Adam state on the fullest rank / unsharded Adam (about 1/2);
* ``ladder_comm_hidden_fraction`` - 1 - Ladder's all-reduce wait / the standard tensor-parallel forward's;
* ``megascale_mfu_predicted`` - the step-time model's MFU for GPT-3 175B on 12,288 A100s (8 x 8 x 192) with
  all communication overlapped and matmuls at peak (model arithmetic), next to ``megascale_mfu_reported``.
"""

from __future__ import annotations

from _common import argument_parser

from refimpl.parallel.experiments import run_all
from refimpl.parallel.mfu import GPT3_175B, ParallelLayout, step_time
from refimpl.parallel.model import tiny_config

MEGASCALE_MFU_REPORTED = 0.552  # Jiang et al. 2024, abstract: 175B model on 12,288 GPUs


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argument_parser(__doc__, "tiny sizes")
    args = parser.parse_args(argv)
    d = 32 if args.quick else 128
    config = tiny_config(n_layers=4, d_model=d, n_heads=4, ffn_dim=2 * d, vocab_size=64, max_seq_len=64)
    res = run_all(2, config=config, batch=8, seq_len=64 if not args.quick else 16, steps=4 if not args.quick else 2)
    for key in ("dp", "zero1", "tp", "ladder", "gpipe", "1f1b"):
        if res[f"{key}_max_diff"] > 1e-4:
            raise SystemExit(f"{key} differs from one process by {res[f'{key}_max_diff']:.3g}")
    layout = ParallelLayout(tensor=8, pipeline=8, data=192, global_batch=6144, micro_batch=1, seq_len=2048)
    predicted = step_time(GPT3_175B, layout, hidden=("tensor", "pipeline", "data")).mfu
    lines = {
        "dp_overlap_fraction": res["dp_overlap_fraction"],
        "pipeline_bubble_measured": res["gpipe_bubble_measured"],
        "pipeline_bubble_predicted": res["bubble_predicted"],
        "zero1_optimizer_bytes_ratio": res["zero1_optimizer_bytes_ratio"],
        "ladder_comm_hidden_fraction": res["ladder_comm_hidden_fraction"],
        "megascale_mfu_predicted": predicted,
        "megascale_mfu_reported": MEGASCALE_MFU_REPORTED,
    }
    for name, value in lines.items():
        print(f"{name}: {value:.4g}")
    return lines


if __name__ == "__main__":
    main()
