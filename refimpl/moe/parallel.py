"""Expert parallelism: experts sharded over processes, tokens exchanged with all-to-all (as in GShard).

``P`` processes each hold ``N_r`` tokens and ``E / P`` experts (rank ``r`` owns experts
``[r E/P, (r+1) E/P)``). One MoE layer is then:

1. route locally (the router is replicated);
2. sort the local assignments by expert, which also sorts them by destination rank;
3. all-to-all the ``(P, E/P)`` per-expert row counts, so every rank knows what it will receive;
4. all-to-all the token rows (dispatch), run the local experts with one grouped matmul;
5. all-to-all the expert outputs back (combine) and sum each token's ``k`` outputs, weighted by its gates.

The row exchange is a small autograd function around ``torch.distributed.all_to_all_single`` whose backward is
the reverse all-to-all of the gradient, so the same code trains. Gloo implements ``all_to_all_single`` with
uneven splits on the CPU; NCCL does on GPUs.

:func:`run_expert_parallel` spawns ``P`` local CPU processes with gloo to run one layer (and optionally its
backward) and gathers what each rank computed, for tests and the chapter.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from refimpl._checks import check_int, check_positive_int, check_tensor
from refimpl.moe.dispatch import grouped_matmul, sort_by_expert
from refimpl.moe.routers import Routing, grouped_top_k_gating, top_k_gating

__all__ = [
    "ExchangeStats",
    "expected_exchange_bytes",
    "expert_parallel_moe",
    "run_expert_parallel",
    "send_counts",
]


@dataclass(frozen=True)
class ExchangeStats:
    """What one rank's all-to-all moved in one forward pass.

    Attributes:
        rows_sent: ``(P,)`` token rows this rank sent to each rank (its own entry stays local).
        rows_received: ``(P,)`` token rows this rank received from each rank; their sum is this device's
            expert load ``T_r`` (the imbalance score's workload).
        bytes_sent_remote: bytes this rank put on the wire in the dispatch and the combine together
            (``2 * rows sent to other ranks * d * itemsize``; the counts exchange, ``P * E/P`` int64, is
            not included).
    """

    rows_sent: Tensor
    rows_received: Tensor
    bytes_sent_remote: int


def send_counts(routing: Routing, n_devices: int) -> Tensor:
    """``(P,)`` int64: how many of ``routing``'s assignments go to each device (experts placed contiguously).

    Raises ``ValueError`` if ``n_devices`` does not divide ``routing.n_experts``.
    """
    n_devices = check_positive_int("n_devices", n_devices)
    if routing.n_experts % n_devices:
        raise ValueError(f"n_devices must divide n_experts={routing.n_experts}, got {n_devices}")
    per_device = routing.n_experts // n_devices
    return torch.bincount(routing.expert // per_device, minlength=n_devices)


class _AllToAll(torch.autograd.Function):
    """Uneven all-to-all of rows; its backward is the reverse all-to-all of the gradient rows."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(grad.contiguous(), in_splits, out_splits, ctx.group), None, None, None


def expected_exchange_bytes(n_tokens: int, k: int, d_model: int, world_size: int, itemsize: int) -> float:
    """Bytes one rank sends to other ranks per MoE layer (dispatch + combine) when its choices spread evenly.

    ``2 * N k (P - 1) / P * d * itemsize``: each of the ``N k`` rows leaves the rank unless its expert is local
    (probability ``1/P``), and comes back after the experts ran. Exact for MoGE with one expert group per rank
    (every token sends ``k / P`` rows to every rank); the expectation for uniform top-k routing.
    """
    n_tokens = check_int("n_tokens", n_tokens, min_value=0)
    k = check_positive_int("k", k)
    d_model = check_positive_int("d_model", d_model)
    world = check_positive_int("world_size", world_size)
    itemsize = check_positive_int("itemsize", itemsize)
    return 2.0 * n_tokens * k * (world - 1) / world * d_model * itemsize


def _all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup | None) -> Tensor:
    """Send ``in_splits[p]`` consecutive rows of ``x`` to rank ``p``; receive ``out_splits[p]`` rows from it."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def expert_parallel_moe(
    x: Tensor,
    routing: Routing,
    w1_local: Tensor,
    w2_local: Tensor,
    *,
    group: dist.ProcessGroup | None = None,
) -> tuple[Tensor, ExchangeStats]:
    """One expert-parallel MoE forward on this rank (module docstring, steps 2-5); call on every rank.

    ``x``: ``(N_r, d)`` this rank's tokens. ``routing``: this rank's assignments over its ``N_r`` tokens and all
    ``E`` experts. ``w1_local, w2_local``: ``(E/P, d, h)`` and ``(E/P, h, d)`` weights of this rank's experts.
    ``group``: process group (default: the world).

    Returns ``(y, stats)``: ``(N_r, d)`` the expert mixture for this rank's tokens, equal to
    :func:`~refimpl.moe.dispatch.moe_sorted` on one process, and the :class:`ExchangeStats`.
    """
    check_tensor("x", x, ndim=2, floating=True)
    check_tensor("w1_local", w1_local, ndim=3, floating=True)
    check_tensor("w2_local", w2_local, ndim=3, floating=True)
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    local = w1_local.shape[0]
    if routing.n_experts != world * local:
        raise ValueError(
            f"routing.n_experts must equal world size {world} x local experts {local}, got {routing.n_experts}"
        )
    if routing.n_tokens != x.shape[0]:
        raise ValueError(f"routing must cover x's {x.shape[0]} tokens, got n_tokens={routing.n_tokens}")

    # Step 2: sorted by global expert = sorted by (destination rank, its local expert).
    order, counts = sort_by_expert(routing)
    token = routing.token[order]  # (A,)
    send_rows = counts.view(world, local)  # (P, E/P) rows for expert j of rank p

    # Step 3: recv_rows[s, j] = rows that source rank s sends to my local expert j.
    recv_rows = torch.empty_like(send_rows)
    dist.all_to_all_single(recv_rows.view(-1), send_rows.reshape(-1), group=group)
    in_splits = send_rows.sum(1).tolist()
    out_splits = recv_rows.sum(1).tolist()

    # Step 4: dispatch. Rows arrive grouped by source, and within a source by local expert; regroup by expert.
    x_recv = _all_to_all(x.index_select(0, token), out_splits, in_splits, group)  # (R, d)
    local_id = torch.arange(local, device=x.device).repeat(world).repeat_interleave(recv_rows.reshape(-1))  # (R,)
    perm = torch.argsort(local_id, stable=True)
    rows_per_expert = recv_rows.sum(0)  # (E/P,)
    hidden = F.gelu(grouped_matmul(x_recv[perm], w1_local, rows_per_expert))  # (R, h)
    y_perm = grouped_matmul(hidden, w2_local, rows_per_expert)  # (R, d)
    y_recv = torch.empty_like(y_perm).index_copy(0, perm, y_perm)  # undo the regrouping

    # Step 5: combine. The reverse all-to-all returns rows in the order they were sent (aligned with `token`).
    y_back = _all_to_all(y_recv, in_splits, out_splits, group)  # (A, d)
    y = y_back.new_zeros(x.shape).index_add(0, token, y_back * routing.weight[order, None])

    rows_sent = send_rows.sum(1)
    remote = int(rows_sent.sum() - rows_sent[rank])
    stats = ExchangeStats(rows_sent, recv_rows.sum(1), 2 * remote * x.shape[1] * x.element_size())
    return y, stats


def _route(logits: Tensor, k: int, n_groups: int | None, normalize: bool) -> Routing:
    if n_groups is None:
        return top_k_gating(logits, k, normalize=normalize).routing()
    return grouped_top_k_gating(logits, k, n_groups, normalize=normalize).routing()


def _worker(rank: int, world: int, workdir: str, k: int, n_groups: int | None, normalize: bool) -> None:
    """Body of one spawned rank: shard, route, run forward (+ backward), save what this rank computed."""
    torch.set_num_threads(1)  # P processes share the machine's cores
    store = os.path.join(workdir, "store")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        data = torch.load(os.path.join(workdir, "inputs.pt"))
        x = torch.tensor_split(data["x"], world)[rank].clone().requires_grad_(True)
        logits = torch.tensor_split(data["logits"], world)[rank].clone().requires_grad_(True)
        w1 = torch.tensor_split(data["w1"], world)[rank].clone().requires_grad_(True)
        w2 = torch.tensor_split(data["w2"], world)[rank].clone().requires_grad_(True)
        routing = _route(logits, k, n_groups, normalize)
        y, stats = expert_parallel_moe(x, routing, w1, w2)
        out = {"y": y.detach(), "rows_sent": stats.rows_sent, "rows_received": stats.rows_received}
        out["bytes_sent_remote"] = stats.bytes_sent_remote
        if data["grad_y"] is not None:
            grad_y = torch.tensor_split(data["grad_y"], world)[rank]
            y.backward(grad_y)
            out.update(grad_x=x.grad, grad_logits=logits.grad, grad_w1=w1.grad, grad_w2=w2.grad)
        torch.save(out, os.path.join(workdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_expert_parallel(
    x: Tensor,
    logits: Tensor,
    w1: Tensor,
    w2: Tensor,
    *,
    world_size: int,
    k: int,
    n_groups: int | None = None,
    normalize: bool = True,
    grad_y: Tensor | None = None,
) -> dict[str, Tensor]:
    """Run one expert-parallel MoE layer in ``world_size`` spawned CPU processes (gloo) and gather the results.

    Tokens are split into ``world_size`` contiguous shards (``torch.tensor_split``), experts likewise. Each
    rank routes its tokens with top-k gating (or MoGE grouped top-k when ``n_groups`` is given) and calls
    :func:`expert_parallel_moe`; with ``grad_y`` it also back-propagates ``grad_y`` through the exchange.

    ``x``: ``(N, d)`` all tokens; ``logits``: ``(N, E)`` their router logits. ``w1, w2``: ``(E, d, h)``, ``(E, h,
    d)`` all experts' weights; ``world_size`` must divide ``E``. ``k, n_groups, normalize``: routing options
    (:func:`~refimpl.moe.routers.top_k_gating`, :func:`~refimpl.moe.routers.grouped_top_k_gating`). ``grad_y``:
    optional ``(N, d)`` gradient of the output.

    Returns dict with ``y (N, d)``; ``rows_sent``/``rows_received`` ``(P, P)`` (row r: what rank r sent/received);
    ``bytes_sent_remote (P,)``; and, with ``grad_y``, ``grad_x``, ``grad_logits``, ``grad_w1``, ``grad_w2``
    assembled in the global layout.
    """
    import torch.multiprocessing as mp

    world = check_int("world_size", world_size, min_value=1, max_value=64)
    check_tensor("x", x, ndim=2, floating=True)
    check_tensor("logits", logits, ndim=2, floating=True)
    if w1.shape[0] % world:
        raise ValueError(f"world_size must divide the number of experts {w1.shape[0]}, got {world}")
    if x.shape[0] < world:
        raise ValueError(f"x must have at least world_size={world} tokens, got {x.shape[0]}")
    with tempfile.TemporaryDirectory(prefix="refimpl_moe_ep_") as workdir:
        inputs = {"x": x.detach(), "logits": logits.detach(), "w1": w1.detach(), "w2": w2.detach()}
        inputs["grad_y"] = None if grad_y is None else grad_y.detach()
        torch.save(inputs, os.path.join(workdir, "inputs.pt"))
        mp.start_processes(_worker, args=(world, workdir, k, n_groups, normalize), nprocs=world, start_method="spawn")
        parts = [torch.load(os.path.join(workdir, f"rank{r}.pt")) for r in range(world)]
    result: dict[str, Tensor] = {"y": torch.cat([p["y"] for p in parts])}
    result["rows_sent"] = torch.stack([p["rows_sent"] for p in parts])
    result["rows_received"] = torch.stack([p["rows_received"] for p in parts])
    result["bytes_sent_remote"] = torch.tensor([p["bytes_sent_remote"] for p in parts])
    if grad_y is not None:
        for name in ("grad_x", "grad_logits", "grad_w1", "grad_w2"):
            result[name] = torch.cat([p[name] for p in parts])
    return result
