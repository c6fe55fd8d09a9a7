"""ZeRO stage 3 (``P_os+g+p``): parameters, gradients and optimizer state all sharded (FSDP-style).

Rajbhandari et al. 2020, sec. 5.3: each of the ``N_d`` data-parallel ranks keeps ``1 / N_d`` of the flattened
parameters, ``(2 + 2 + K) Psi / N_d`` bytes in all; a layer's full parameters exist only while it runs. Here a
:class:`FullyShardedUnit` wraps any ``nn.Module``:

* the module's parameters are flattened, padded to a multiple of ``N_d`` and cut into ``N_d`` equal slices;
  rank ``r`` keeps slice ``r`` as its only parameter (``shard``) and frees the module's own storage;
* forward all-gathers the full vector, runs the module on views of it (``torch.func.functional_call``) and
  drops it; the unit runs under activation checkpointing, so backward gathers again instead of keeping the
  full parameters alive between forward and backward (the paper's "parameters on demand");
* the gather's backward averages the gradient over ranks and keeps this rank's slice: the gradient of
  ``shard`` is the data-parallel gradient of the parameters it holds, and an optimizer built on ``shard``
  updates only them.

Gloo has no reduce-scatter on the CPU, so the backward all-reduces the full gradient and slices it (twice the
bytes of a reduce-scatter, the same result). Element-wise optimizers (SGD, Adam, AdamW) on the flat slice give
exactly the unsharded update; optimizers with per-tensor statistics would not, which is why the stage-1/2
:class:`~refimpl.parallel.zero.ZeroOptimizer` partitions by whole parameters instead.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

__all__ = ["FullyShardedUnit"]


class _GatherShards(torch.autograd.Function):
    """All-gather equal shards into the full flat vector; backward: average over ranks, keep this rank's slice."""

    @staticmethod
    def forward(ctx: Any, shard: Tensor, group: Any) -> Tensor:
        ctx.group = group
        parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, shard.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        world, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad.view(world, -1)[rank].div(world), None


class FullyShardedUnit(nn.Module):
    """Any ``nn.Module`` with its parameters sharded over the ranks of ``group`` (ZeRO-3); call it like the module.

    Build it on every rank from modules with equal parameters (e.g. the same seed). ``shard`` is this rank's
    only parameter: give it to the optimizer. :meth:`full_parameters` gathers the current full parameters.
    """

    def __init__(self, module: nn.Module, group: Any = None) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        self.group = group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        named = [(n, p) for n, p in module.named_parameters()]
        if not named:
            raise ValueError("module must have at least one parameter")
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        flat = torch.cat([p.detach().reshape(-1) for _, p in named])
        self.numel = flat.numel()
        per_rank = -(-self.numel // self.world)  # ceil
        flat = torch.cat([flat, flat.new_zeros(per_rank * self.world - self.numel)])  # pad to N_d equal slices
        self.shard = nn.Parameter(flat.view(self.world, per_rank)[self.rank].clone())
        for _, p in named:  # the module keeps only empty placeholders
            p.data = p.data.new_empty(0)
            p.requires_grad_(False)
        self.module = module

    def _views(self, full: Tensor) -> dict[str, Tensor]:
        sizes = [s.numel() for s in self.shapes]
        pieces = full[: self.numel].split(sizes)
        return {n: v.view(s) for n, v, s in zip(self.names, pieces, self.shapes)}

    def _run(self, shard: Tensor, *args: Any) -> Any:
        full = _GatherShards.apply(shard, self.group)
        return functional_call(self.module, self._views(full), args)

    def forward(self, *args: Any) -> Any:
        return checkpoint(self._run, self.shard, *args, use_reentrant=False)

    @torch.no_grad()
    def full_parameters(self) -> dict[str, Tensor]:
        """The full parameters, gathered from every rank (a collective: call on every rank)."""
        parts = [torch.empty_like(self.shard) for _ in range(self.world)]
        dist.all_gather(parts, self.shard.detach().contiguous(), group=self.group)
        return {n: v.clone() for n, v in self._views(torch.cat(parts)).items()}
