"""Data parallelism: every rank holds the whole model, takes a slice of the batch, and all-reduces gradients.

With ``P`` ranks each computing the mean loss over its ``B / P`` examples, the mean over ranks of their
gradients is the gradient of the mean loss over all ``B`` examples, so ``P`` ranks take the same step as one
process on the whole batch (Li et al. 2020, "PyTorch Distributed", sec. 3).

The all-reduce need not wait for the whole backward pass. Gradients appear from the last layer to the first;
parameters are grouped into *buckets* of about ``bucket_cap_bytes`` in that order, and a bucket's all-reduce
starts (asynchronously) the moment its last gradient is accumulated, while backward continues with earlier
layers (Li et al. 2020, sec. 3.2.3). At the end of backward the wrapper waits for the outstanding buckets
and writes the averaged gradients back, so ``loss.backward(); optimizer.step()`` works unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from refimpl._checks import check_int

__all__ = ["DataParallel", "make_buckets"]


def make_buckets(sizes_bytes: Sequence[int], bucket_cap_bytes: int) -> list[list[int]]:
    """Group consecutive items (given in the order their gradients become ready) into buckets.

    A bucket closes once it holds at least ``bucket_cap_bytes`` (so one item larger than the cap forms a bucket
    of its own, and no bucket is empty). Returns lists of indices into ``sizes_bytes``, in order.
    """
    cap = check_int("bucket_cap_bytes", bucket_cap_bytes, min_value=1)
    buckets: list[list[int]] = []
    current: list[int] = []
    filled = 0
    for i, size in enumerate(sizes_bytes):
        current.append(i)
        filled += check_int(f"sizes_bytes[{i}]", size, min_value=0)
        if filled >= cap:
            buckets.append(current)
            current, filled = [], 0
    if current:
        buckets.append(current)
    return buckets


class DataParallel(nn.Module):
    """Wrap any ``nn.Module`` for data-parallel training in the current process group.

    On construction the parameters of rank 0 are broadcast so every rank starts equal. ``forward`` calls the
    module. During ``backward`` each bucket of gradients is all-reduced asynchronously as soon as it is
    complete; when backward ends, the averaged gradients are in ``p.grad`` on every rank.

    Attributes:
        buckets: the parameter buckets, each a list of parameters, in launch order (last layer first).
        exposed_wait_s: seconds the last backward spent waiting for all-reduces after its compute ended.
        bucket_all_reduces: how many bucket all-reduces have been launched so far.
    """

    def __init__(self, module: nn.Module, *, bucket_cap_bytes: int = 2**16, group: Any = None) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        check_int("bucket_cap_bytes", bucket_cap_bytes, min_value=1)
        self.module = module
        self.group = group
        self.world = dist.get_world_size(group)
        source = dist.get_global_rank(group, 0) if group is not None else 0
        with torch.no_grad():
            for p in module.parameters():
                dist.broadcast(p, src=source, group=group)
        params = [p for p in module.parameters() if p.requires_grad][::-1]  # backward visits the last layer first
        groups = make_buckets([p.numel() * p.element_size() for p in params], bucket_cap_bytes)
        self.buckets = [[params[i] for i in idx] for idx in groups]
        self._bucket_of = {id(p): b for b, bucket in enumerate(self.buckets) for p in bucket}
        self._sync = True
        self._reset()
        self.exposed_wait_s = 0.0
        self.bucket_all_reduces = 0
        for p in params:
            p.register_post_accumulate_grad_hook(self._on_grad_ready)

    def _reset(self) -> None:
        self._ready = [0] * len(self.buckets)
        self._pending: dict[int, tuple[Any, Tensor]] = {}
        self._callback_queued = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (no communication) inside this block, e.g. for all but the last micro-batch."""
        self._sync = False
        try:
            yield
        finally:
            self._sync = True

    def _on_grad_ready(self, p: Tensor) -> None:
        if not self._sync:
            return
        if not self._callback_queued:  # runs once, after the whole backward pass
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
            self._callback_queued = True
        b = self._bucket_of[id(p)]
        self._ready[b] += 1
        if self._ready[b] == len(self.buckets[b]):
            self._launch(b)

    def _launch(self, b: int) -> None:
        """Start the asynchronous all-reduce of bucket ``b`` (flattened, pre-divided by ``P``)."""
        for p in self.buckets[b]:
            if p.grad is None:  # a parameter that took no part in this forward pass
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in self.buckets[b]]).div_(self.world)
        self._pending[b] = (dist.all_reduce(flat, async_op=True, group=self.group), flat)
        self.bucket_all_reduces += 1

    def _finish(self) -> None:
        """End of backward: launch any incomplete bucket, wait for all, copy the averages into ``p.grad``."""
        for b in range(len(self.buckets)):
            if b not in self._pending:
                self._launch(b)
        start = time.perf_counter()
        for b, (work, flat) in self._pending.items():
            work.wait()
            offset = 0
            for p in self.buckets[b]:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        self.exposed_wait_s = time.perf_counter() - start
        self._reset()

    def all_reduce_alone_s(self) -> float:
        """Seconds to all-reduce every bucket once with no backward running (the communication to hide)."""
        start = time.perf_counter()
        works = [
            dist.all_reduce(torch.cat([p.detach().reshape(-1) for p in bucket]), async_op=True, group=self.group)
            for bucket in self.buckets
        ]
        for work in works:
            work.wait()
        return time.perf_counter() - start
