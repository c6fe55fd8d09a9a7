"""One spawn of ``P`` processes that runs every technique of :mod:`refimpl.parallel` and checks it against one
process: the chapter's experiment and the benchmark's (spawning costs seconds, so everything shares one).

:func:`run_all` returns a flat ``name -> float`` report: the largest differences from the single-process
reference (``*_max_diff``), and what was measured (overlap, optimizer bytes, bubble).
"""

from __future__ import annotations

from statistics import median
from typing import Any

import torch
from torch import Tensor

from refimpl._checks import check_int
from refimpl.llm.config import LlamaConfig
from refimpl.llm.model import rope_cos_sin
from refimpl.parallel.ladder import block_branches, ladder_step, residual_forward
from refimpl.parallel.launch import run_tasks
from refimpl.parallel.model import GPTBlock, TinyGPT, tiny_config
from refimpl.parallel.pipeline import bubble_fraction, make_schedule, measured_bubble, pipeline_step, simulate
from refimpl.parallel.tensor import check_tensor_parallel, shard_block, tensor_parallel_step
from refimpl.parallel.train import data_parallel_steps, train_single, zero3_steps

__all__ = ["run_all"]


def _max_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in b)


def _tp_reference(config: LlamaConfig, x: Tensor, grad_y: Tensor, world: int) -> tuple[Tensor, Tensor, list[dict]]:
    block = GPTBlock(config, torch.Generator().manual_seed(0))
    x = x.clone().requires_grad_(True)
    cos, sin = rope_cos_sin(torch.arange(x.shape[1]), config.head_dim, config.rope_base)
    y = block(x, cos, sin)
    y.backward(grad_y)
    grad_block = GPTBlock(config, torch.Generator())  # a block whose "weights" are the gradients, to shard them
    with torch.no_grad():
        for name, p in grad_block.named_parameters():
            p.copy_(getattr(block, name).grad)
    return y.detach(), x.grad, [shard_block(grad_block, r, world) for r in range(world)]


def run_all(
    world_size: int = 2,
    *,
    config: LlamaConfig | None = None,
    batch: int = 8,
    seq_len: int = 32,
    steps: int = 3,
    microbatches: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """Data parallelism, ZeRO-1 and 3, tensor parallelism, Ladder residual and both pipeline schedules on
    ``world_size`` processes, each checked against one process (the pipeline uses ``world_size`` stages).

    Returns floats:

    * the largest absolute difference of parameters, outputs or gradients from one process: ``dp_max_diff``
      (SGD), ``dp_adam_max_diff``, ``zero1_max_diff``, ``zero3_max_diff`` (Adam), ``tp_max_diff``,
      ``ladder_max_diff`` (against a single-process Ladder model), ``gpipe_max_diff``, ``1f1b_max_diff``; and
      ``zero1_vs_dp_adam_max_diff`` (ZeRO-1 against data-parallel Adam, which see the same averaged gradients);
    * ``dp_overlap_fraction`` (1 - exposed all-reduce wait / all-reduce time alone, median over steps after
      the first), ``dp_buckets``;
    * ``zero1_optimizer_bytes_ratio`` (Adam state on the fullest rank / unsharded) and ``zero3_bytes_ratio``
      (ZeRO-3's persistent parameter, gradient and Adam bytes on the fullest rank / unsharded);
    * ``ladder_comm_hidden_fraction`` (1 - Ladder's all-reduce wait / standard's), ``ladder_vs_standard_diff``;
    * per schedule ``*_bubble_measured``, ``*_bubble_simulated`` (the schedule's timeline with the measured
      median forward and backward times), ``*_peak_in_flight`` on stage 0, ``*_intervals``; and
      ``bubble_predicted`` ``(p - 1) / (m + p - 1)``.
    """
    world = check_int("world_size", world_size, min_value=1, max_value=16)
    config = config or tiny_config(n_layers=4, d_model=64, n_heads=4, ffn_dim=128, vocab_size=64, max_seq_len=64)
    check_tensor_parallel(config, world)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (steps, batch, seq_len + 1), generator=g)
    x = torch.randn(2, seq_len, config.d_model, generator=g)
    grad_y = torch.randn(2, seq_len, config.d_model, generator=g)
    sgd, adam = (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}), (torch.optim.Adam, {"lr": 1e-2})
    dp, dp_adam, zero1, zero3, tp, ladder, gpipe, ofob = run_tasks(
        world,
        [
            (data_parallel_steps, (config, tokens, *sgd, 0, 2**15, seed)),
            (data_parallel_steps, (config, tokens, *adam, 0, 2**15, seed)),
            (data_parallel_steps, (config, tokens, *adam, 1, 2**15, seed)),
            (zero3_steps, (config, tokens, *adam, seed)),
            (tensor_parallel_step, (config, x, grad_y, 0)),
            (ladder_step, (config, x, 0, 5)),
            (pipeline_step, (config, tokens[0], microbatches, "gpipe", seed)),
            (pipeline_step, (config, tokens[0], microbatches, "1f1b", seed)),
        ],
    )
    out: dict[str, Any] = {}
    single_sgd, single_adam = (
        train_single(config, tokens, *sgd, seed=seed),
        train_single(config, tokens, *adam, seed=seed),
    )
    out["dp_max_diff"] = max(_max_diff(r["params"], single_sgd["params"]) for r in dp)
    out["zero1_max_diff"] = max(_max_diff(r["params"], single_adam["params"]) for r in zero1)
    out["dp_adam_max_diff"] = max(_max_diff(r["params"], single_adam["params"]) for r in dp_adam)
    out["zero1_vs_dp_adam_max_diff"] = max(_max_diff(z["params"], d["params"]) for z, d in zip(zero1, dp_adam))
    overlap = [1 - w / r["comm_alone_s"] for r in dp for w in r["exposed_wait_s"][1:]]
    out["dp_overlap_fraction"] = min(1.0, max(0.0, median(overlap))) if overlap else float("nan")
    out["dp_buckets"] = dp[0]["num_buckets"]
    out["zero3_max_diff"] = max(_max_diff(r["params"], single_adam["params"]) for r in zero3)
    unsharded = 2 * sum(v.numel() * v.element_size() for v in single_adam["params"].values())  # weights + grads
    unsharded += single_adam["optimizer_bytes"]
    per_rank = max(r["param_bytes"] + r["grad_bytes"] + r["optimizer_bytes"] for r in zero3)
    out["zero3_bytes_ratio"] = per_rank / unsharded
    out["zero1_optimizer_bytes_ratio"] = max(r["optimizer_bytes"] for r in zero1) / single_adam["optimizer_bytes"]

    y, grad_x, shard_grads = _tp_reference(config, x, grad_y, world)
    diffs = [float((r["y"] - y).abs().max()) for r in tp] + [float((r["grad_x"] - grad_x).abs().max()) for r in tp]
    diffs += [_max_diff(r["grads"], shard_grads[rank]) for rank, r in enumerate(tp)]
    out["tp_max_diff"] = max(diffs)

    model = TinyGPT(config, 0)
    cos, sin = rope_cos_sin(torch.arange(seq_len), config.head_dim, config.rope_base)
    with torch.no_grad():
        ref_ladder, _ = residual_forward(block_branches(model.blocks, cos, sin), x, ladder=True)
    out["ladder_max_diff"] = max(float((r["ladder"] - ref_ladder).abs().max()) for r in ladder)
    out["ladder_vs_standard_diff"] = float((ref_ladder - ladder[0]["standard"]).abs().max())
    waits = [(r["ladder_wait_s"], r["standard_wait_s"]) for r in ladder]
    out["ladder_comm_hidden_fraction"] = max(0.0, 1 - sum(w[0] for w in waits) / sum(w[1] for w in waits))

    single_pp = train_single(config, tokens[:1], torch.optim.SGD, {"lr": 0.0}, seed=seed)
    out["bubble_predicted"] = bubble_fraction(world, microbatches)
    for name, result in (("gpipe", gpipe), ("1f1b", ofob)):
        grads: dict[str, Tensor] = {}
        for stage in result:
            grads.update(stage["grads"])
        out[f"{name}_max_diff"] = _max_diff(grads, single_pp["grads"])
        intervals = [r["intervals"] for r in result]
        out[f"{name}_bubble_measured"] = measured_bubble(intervals)
        t_f = median(e - s for stage in intervals for a, s, e in stage if a.kind == "F")
        t_b = median(e - s for stage in intervals for a, s, e in stage if a.kind == "B")
        timeline = simulate(make_schedule(name, world, microbatches), t_f, t_b)
        out[f"{name}_bubble_simulated"] = timeline.bubble
        out[f"{name}_peak_in_flight"] = timeline.peak_in_flight[0]
        out[f"{name}_intervals"] = intervals
    return out
