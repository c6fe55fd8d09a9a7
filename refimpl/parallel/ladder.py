"""Ladder residual: rewire the residual stream so each tensor-parallel all-reduce overlaps the next branch.

Zhang et al. 2025 ("Ladder-residual: parallelism-aware architecture for accelerating large model inference with
communication overlapping", sec. 3). Write a transformer as ``2L`` residual branches ``f_1, f_2, ...``
(attention, MLP, attention, ...). The standard (sequential) residual is

    x_i = x_{i-1} + AllReduce(f_i(x_{i-1}))

so branch ``i + 1`` cannot start before the all-reduce of branch ``i`` ends. The Ladder residual feeds each
branch the stream *without* the previous branch's output:

    x_i = x_{i-1} + AllReduce(f_i(x_{i-2}))          (x_{-1} = x_0)

so the all-reduce of ``f_i`` runs while ``f_{i+1}`` computes, and is added one branch later. It changes the
model (each branch sees a slightly stale stream), so it is checked against a single-process Ladder model, and
the communication it hides is measured against the standard tensor-parallel forward of the same weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from refimpl.llm.config import LlamaConfig
from refimpl.llm.model import rope_cos_sin
from refimpl.parallel.model import TinyGPT, check_stream
from refimpl.parallel.tensor import TensorParallelBlock, check_tensor_parallel

__all__ = ["block_branches", "ladder_step", "residual_forward"]

Branch = Callable[[Tensor], Tensor]


def block_branches(blocks: Sequence[Any], cos: Tensor, sin: Tensor) -> list[Branch]:
    """The ``2L`` residual branches ``[attention_1, mlp_1, attention_2, ...]`` of blocks with
    ``attention_out(x, cos, sin)`` and ``mlp_out(x)`` (a :class:`GPTBlock` or a :class:`TensorParallelBlock`)."""
    branches: list[Branch] = []
    for block in blocks:
        branches += [lambda x, b=block: b.attention_out(x, cos, sin), block.mlp_out]
    return branches


def residual_forward(
    branches: Sequence[Branch], x: Tensor, *, ladder: bool, group: Any = None, tensor_parallel: bool = False
) -> tuple[Tensor, float]:
    """Run the residual branches on ``x: (B, T, d)``; returns ``(output, seconds spent waiting on all-reduces)``.

    ``tensor_parallel``: each branch returns this rank's partial sum, all-reduced over ``group`` (blocking
    for the standard residual, asynchronous for ``ladder=True``); otherwise no communication.
    """

    def launch(out: Tensor) -> Any:
        return dist.all_reduce(out, group=group, async_op=True) if tensor_parallel else None

    def wait(work: Any) -> float:  # seconds blocked on an all-reduce
        start = time.perf_counter()
        if work is not None:
            work.wait()
        return time.perf_counter() - start

    exposed = 0.0
    pending: tuple[Any, Tensor] | None = None  # the branch output whose all-reduce is in flight
    for f in branches:
        out = f(x)  # standard: x = x_{i-1}; Ladder: x = x_{i-2} (x_{i-1} without f_{i-1}'s output)
        work = launch(out)
        if not ladder:  # x_i = x_{i-1} + AllReduce(f_i(x_{i-1})): wait before the next branch
            exposed += wait(work)
            x = x + out
            continue
        if pending is not None:  # x_i = x_{i-1} + AllReduce(f_i(x_{i-2})): f_i ran during f_{i-1}'s all-reduce
            exposed += wait(pending[0])
            x = x + pending[1]
        pending = (work, out)
    if pending is not None:
        exposed += wait(pending[0])
        x = x + pending[1]
    return x, exposed


@torch.no_grad()
def ladder_step(config: LlamaConfig, x: Tensor, seed: int = 0, repeats: int = 3) -> dict[str, Any]:
    """On each rank: the blocks of ``TinyGPT(config, seed)`` tensor-parallel, standard and Ladder forward of ``x``.

    Returns ``standard`` and ``ladder`` outputs ``(B, T, d)`` and the median over ``repeats`` (alternating the
    two) of ``standard_wait_s``/``ladder_wait_s`` (all-reduce time not hidden) and ``standard_s``/``ladder_s``.
    """
    model = TinyGPT(config, seed)
    check_stream(config, "x", x)
    check_tensor_parallel(config, dist.get_world_size())
    blocks = [TensorParallelBlock(b) for b in model.blocks]
    cos, sin = rope_cos_sin(torch.arange(x.shape[1]), config.head_dim, config.rope_base)
    branches = block_branches(blocks, cos, sin)
    times: dict[str, list[float]] = {k: [] for k in ("standard_wait_s", "ladder_wait_s", "standard_s", "ladder_s")}
    out: dict[str, Any] = {}
    for _ in range(repeats):
        for name in ("standard", "ladder"):
            dist.barrier()
            start = time.perf_counter()
            out[name], wait = residual_forward(branches, x, ladder=name == "ladder", tensor_parallel=True)
            times[f"{name}_s"].append(time.perf_counter() - start)
            times[f"{name}_wait_s"].append(wait)
    out.update({k: sorted(v)[len(v) // 2] for k, v in times.items()})
    return out
