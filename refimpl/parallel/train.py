"""Training :class:`~refimpl.parallel.model.TinyGPT` on one process and data-parallel on ``P``, for the checks.

:func:`train_single` is the reference: ``steps`` optimizer steps on whole batches. :func:`train_data_parallel`
runs the same steps on ``P`` spawned processes, each on rows ``[r B/P, (r+1) B/P)`` of every batch, with
:class:`~refimpl.parallel.data.DataParallel` (stages 0 and 1) and optionally
:class:`~refimpl.parallel.zero.ZeroOptimizer`; the two must end with the same parameters.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from refimpl._checks import check_choice, check_int, check_tensor
from refimpl.llm.config import LlamaConfig
from refimpl.parallel.data import DataParallel
from refimpl.parallel.launch import run_processes
from refimpl.parallel.model import TinyGPT
from refimpl.parallel.zero import ZeroOptimizer, state_bytes

__all__ = ["check_tokens", "data_parallel_steps", "train_data_parallel", "train_single", "zero3_steps"]


def check_tokens(tokens: Tensor, config: LlamaConfig, world_size: int = 1) -> None:
    """``tokens: (steps, B, T + 1)`` int64 batches (inputs ``[..., :-1]``, targets ``[..., 1:]``); ``P | B``."""
    check_tensor("tokens", tokens, ndim=3, dtypes=[torch.int64])
    steps, batch, t1 = tokens.shape
    if steps < 1 or t1 < 2 or t1 - 1 > config.max_seq_len:
        raise ValueError(
            f"tokens must have shape (steps >= 1, B, T + 1) with 1 <= T <= {config.max_seq_len}, "
            f"got {tuple(tokens.shape)}"
        )
    if batch % world_size:
        raise ValueError(f"world_size must divide the batch size B={batch}, got {world_size}")
    if int(tokens.min()) < 0 or int(tokens.max()) >= config.vocab_size:
        raise ValueError(f"tokens must be in [0, {config.vocab_size}), got [{int(tokens.min())}, {int(tokens.max())}]")


def _named(model: torch.nn.Module, grads: bool = False) -> dict[str, Tensor]:
    return {n: (p.grad if grads else p).detach().clone() for n, p in model.named_parameters()}


def train_single(
    config: LlamaConfig,
    tokens: Tensor,
    optimizer_class: type[torch.optim.Optimizer] = torch.optim.Adam,
    optimizer_kwargs: dict[str, Any] | None = None,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """One process: ``steps`` steps on the batches ``tokens: (steps, B, T + 1)``.

    Returns ``params`` and the last step's ``grads`` (name -> tensor), ``losses`` per step, and
    ``optimizer_bytes`` (the optimizer's state after training).
    """
    check_tokens(tokens, config)
    model = TinyGPT(config, seed)
    opt = optimizer_class(model.parameters(), **(optimizer_kwargs or {}))
    losses = []
    for batch in tokens:
        opt.zero_grad()
        loss = model.loss(batch[:, :-1], batch[:, 1:])
        loss.backward()
        losses.append(loss.item())
        grads = _named(model, grads=True)
        opt.step()
    return {"params": _named(model), "grads": grads, "losses": losses, "optimizer_bytes": state_bytes(opt)}


def data_parallel_steps(
    config: LlamaConfig,
    tokens: Tensor,
    optimizer_class: type,
    kwargs: dict,
    zero_stage: int,
    bucket_cap: int,
    seed: int,
    accumulation: int = 1,
) -> dict[str, Any]:
    """The body of :func:`train_data_parallel` on one rank of the current process group (arguments as there).

    ``accumulation > 1`` (plain data parallelism only) splits each rank's rows into that many micro-batches and
    accumulates their gradients, communicating only after the last (``DataParallel.no_sync`` for the others).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    if accumulation > 1 and zero_stage:
        raise ValueError(f"accumulation applies to zero_stage=0 only, got zero_stage={zero_stage}")
    model = TinyGPT(config, seed if rank == 0 else seed + 1 + rank)  # rank 0's weights must reach every rank
    if zero_stage < 2:
        dp = DataParallel(model, bucket_cap_bytes=bucket_cap)  # broadcasts rank 0's parameters
    else:
        with torch.no_grad():
            for p in model.parameters():
                dist.broadcast(p, src=0)
    if zero_stage:
        opt: Any = ZeroOptimizer(model.parameters(), optimizer_class, stage=zero_stage, **kwargs)
    else:
        opt = optimizer_class(model.parameters(), **kwargs)
    losses, backward_s, exposed = [], [], []
    for batch in tokens:
        local = batch.tensor_split(world)[rank]  # (B / P, T + 1)
        opt.zero_grad()
        micro = local.tensor_split(accumulation)  # equal sizes: the mean of their means is the mean
        total = 0.0
        for chunk in micro[:-1]:
            with dp.no_sync():
                part = model.loss(chunk[:, :-1], chunk[:, 1:]) / accumulation
                part.backward()
                total += part.item()
        loss = model.loss(micro[-1][:, :-1], micro[-1][:, 1:]) / accumulation
        start = time.perf_counter()
        loss.backward()  # the last micro-batch: the buckets all-reduce the accumulated gradients
        backward_s.append(time.perf_counter() - start)
        if zero_stage < 2:
            exposed.append(dp.exposed_wait_s)
        losses.append(total + loss.item())
        grads = _named(model, grads=True)
        opt.step()
    out = {"params": _named(model), "grads": grads, "losses": losses, "backward_s": backward_s}
    if zero_stage < 2:
        out.update(exposed_wait_s=exposed, num_buckets=len(dp.buckets), bucket_all_reduces=dp.bucket_all_reduces)
        out["comm_alone_s"] = dp.all_reduce_alone_s()
    out["optimizer_bytes"] = opt.state_bytes() if zero_stage else state_bytes(opt)
    if zero_stage:
        out["grad_bytes"] = opt.grad_bytes()
    return out


def train_data_parallel(
    config: LlamaConfig,
    tokens: Tensor,
    optimizer_class: type[torch.optim.Optimizer] = torch.optim.Adam,
    optimizer_kwargs: dict[str, Any] | None = None,
    *,
    world_size: int,
    zero_stage: int = 0,
    bucket_cap_bytes: int = 2**14,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The steps of :func:`train_single` on ``world_size`` processes; one result dict per rank.

    ``zero_stage``: 0 - plain data parallelism (each rank a full optimizer); 1 - ZeRO-1 on top of
    :class:`DataParallel`; 2 - ZeRO-2 (no DataParallel: gradients reduced to their owners in ``step``). Each
    dict has what :func:`train_single` returns (``grads`` as each rank saw them before the step) plus
    ``backward_s`` per step and, with ``DataParallel``, ``exposed_wait_s`` per step and ``comm_alone_s``.
    """
    world = check_int("world_size", world_size, min_value=1, max_value=64)
    check_tokens(tokens, config, world)
    zero_stage = check_choice("zero_stage", zero_stage, (0, 1, 2))
    check_int("bucket_cap_bytes", bucket_cap_bytes, min_value=1)
    kwargs = dict(optimizer_kwargs or {})
    return run_processes(
        data_parallel_steps, world, config, tokens, optimizer_class, kwargs, zero_stage, bucket_cap_bytes, seed
    )


def zero3_steps(config: LlamaConfig, tokens: Tensor, optimizer_class: type, kwargs: dict, seed: int) -> dict[str, Any]:
    """On each rank: the steps of :func:`train_single` with the whole model one ZeRO-3
    :class:`~refimpl.parallel.zero3.FullyShardedUnit` (rows ``[r B/P, (r+1) B/P)`` of each batch).

    Returns the gathered ``params`` after training, ``losses``, and this rank's persistent bytes:
    ``param_bytes`` (its shard), ``grad_bytes`` and ``optimizer_bytes``.
    """
    from refimpl.parallel.zero3 import FullyShardedUnit

    rank, world = dist.get_rank(), dist.get_world_size()
    model = TinyGPT(config, seed)
    unit = FullyShardedUnit(model)
    opt = optimizer_class([unit.shard], **kwargs)
    losses = []
    for batch in tokens:
        local = batch.tensor_split(world)[rank]
        opt.zero_grad()
        model.check_ids(local[:, :-1])
        logits = unit(local[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), local[:, 1:].reshape(-1))
        loss.backward()
        losses.append(loss.item())
        opt.step()
    shard = unit.shard
    return {
        "params": unit.full_parameters(),
        "losses": losses,
        "param_bytes": shard.numel() * shard.element_size(),
        "grad_bytes": shard.grad.numel() * shard.grad.element_size(),
        "optimizer_bytes": state_bytes(opt),
    }
