"""ZeRO: shard the optimizer state (stage 1) and the gradients (stage 2) across data-parallel ranks.

Rajbhandari et al. 2020 ("ZeRO: Memory Optimizations Toward Training Trillion Parameter Models", sec. 5.1):
with mixed-precision Adam a model of ``Psi`` parameters needs ``(2 + 2 + K) Psi`` bytes per rank (fp16
weights, fp16 gradients, ``K = 12`` bytes of fp32 master weights, momentum and variance). Data parallelism
replicates all of it. ZeRO partitions it over the ``N_d`` ranks:

* stage 1 (``P_os``): each rank keeps the optimizer state of ``1 / N_d`` of the parameters,
  ``2 Psi + 2 Psi + K Psi / N_d`` bytes;
* stage 2 (``P_os+g``): gradients are *reduced* to the rank that owns them instead of all-reduced,
  ``2 Psi + (2 + K) Psi / N_d`` bytes.

After its update each owner broadcasts its parameters, so every rank again holds the full model. Here the
partition is by whole parameters (as PyTorch's ``ZeroRedundancyOptimizer``): each rank runs *any*
``torch.optim.Optimizer`` class on the parameters it owns, so any per-parameter optimizer (Adam, AdamW, SGD
with momentum, ...) gives exactly the update of the unsharded optimizer. The paper partitions the flat
parameter vector into equal slices instead, which balances bytes exactly but only suits element-wise
optimizers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from refimpl._checks import check_choice, check_int

__all__ = ["ZeroOptimizer", "partition_parameters", "state_bytes"]


def partition_parameters(sizes: Sequence[int], world_size: int) -> list[int]:
    """Owner rank of each parameter: largest first, each to the rank with the fewest elements so far.

    Ties go to the lowest rank, so every process computes the same partition. Raises ``ValueError`` when there
    are fewer parameters than ranks (a rank would own nothing).
    """
    world = check_int("world_size", world_size, min_value=1)
    if len(sizes) < world:
        raise ValueError(f"world_size must be <= the number of parameters {len(sizes)}, got {world}")
    load = [0] * world
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda j: (-sizes[j], j)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[i] = rank
        load[rank] += sizes[i]
    return owner


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in ``optimizer.state`` (Adam: ``exp_avg``, ``exp_avg_sq`` and the step count)."""
    return sum(
        t.numel() * t.element_size()
        for per_param in optimizer.state.values()
        for t in per_param.values()
        if isinstance(t, Tensor)
    )


class ZeroOptimizer:
    """A ZeRO stage-1 or stage-2 optimizer over ``params``, sharded across the ranks of ``group``.

    Args:
        params: the model's parameters, in the same order on every rank.
        optimizer_class: any ``torch.optim.Optimizer`` subclass; each rank builds
            ``optimizer_class(owned_params, **optimizer_kwargs)``.
        stage: 1 - gradients arrive averaged on every rank (e.g. from
            :class:`~refimpl.parallel.data.DataParallel`); 2 - gradients arrive local (unreduced) and
            :meth:`step` reduces each to its owner, and non-owners drop theirs.
        group: the data-parallel process group (default: the world).
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        optimizer_class: type[torch.optim.Optimizer],
        *,
        stage: int = 1,
        group: Any = None,
        **optimizer_kwargs: Any,
    ) -> None:
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
            raise TypeError(f"optimizer_class must be a torch.optim.Optimizer subclass, got {optimizer_class!r}")
        self.stage = check_choice("stage", stage, (1, 2))
        self.params = [p for p in params if p.requires_grad]
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.owner = partition_parameters([p.numel() for p in self.params], self.world)
        self._global = [dist.get_global_rank(group, o) if group is not None else o for o in self.owner]
        owned = [p for p, o in zip(self.params, self.owner) if o == self.rank]
        self.optimizer = optimizer_class(owned, **optimizer_kwargs)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of every parameter (owned or not)."""
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """Update the owned parameters with the wrapped optimizer, then broadcast every parameter from its owner."""
        if self.stage == 2:  # P_os+g: reduce-to-owner instead of all-reduce; only the owner keeps the gradient
            for p, owner, src in zip(self.params, self.owner, self._global):
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                dist.reduce(grad, dst=src, group=self.group)
                p.grad = grad.div_(self.world) if owner == self.rank else None
        self.optimizer.step()
        for p, src in zip(self.params, self._global):
            dist.broadcast(p, src=src, group=self.group)

    def state_bytes(self) -> int:
        """Optimizer-state bytes held by this rank."""
        return state_bytes(self.optimizer)

    def grad_bytes(self) -> int:
        """Gradient bytes this rank holds now (after a stage-2 :meth:`step`: only its own shard)."""
        return sum(p.grad.numel() * p.grad.element_size() for p in self.params if p.grad is not None)
