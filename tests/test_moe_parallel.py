"""Expert parallelism across processes (gloo, CPU): forward and backward equal to one process, and the
exchange's bookkeeping (rows sent/received, per-device load, bytes) equal to an independent count."""

from __future__ import annotations

import pytest
import torch

from refimpl.moe import grouped_top_k_gating, imbalance_score, moe_sorted, top_k_gating
from refimpl.moe.parallel import expected_exchange_bytes, run_expert_parallel, send_counts


def _problem(n: int, e: int, d: int = 8, h: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, d, generator=g),
        torch.randn(n, e, generator=g),
        torch.randn(e, d, h, generator=g) / d**0.5,
        torch.randn(e, h, d, generator=g) / h**0.5,
        torch.randn(n, d, generator=g),
    )


def _single_process(x, logits, w1, w2, grad_y, route):
    x, logits, w1, w2 = (t.clone().requires_grad_(True) for t in (x, logits, w1, w2))
    y = moe_sorted(x, route(logits).routing(), w1, w2)
    y.backward(grad_y)
    return y.detach(), x.grad, logits.grad, w1.grad, w2.grad


def _expected_rows(logits: torch.Tensor, route, world: int, e: int) -> torch.Tensor:
    """(P, P) rows rank s sends to rank r, counted independently with Python loops."""
    rows = torch.zeros(world, world, dtype=torch.int64)
    for s, shard in enumerate(torch.tensor_split(logits, world)):
        for expert in route(shard).index.flatten().tolist():
            rows[s, expert // (e // world)] += 1
    return rows


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("world", "n_groups"),
    [(2, None), (4, 4)],  # 2 processes with top-2 gating; 4 processes with MoGE (one group per process)
)
def test_expert_parallel_equals_single_process(world: int, n_groups: int | None) -> None:
    n, e, k = 37, 8, 4 if n_groups else 2  # 37 tokens: uneven token shards
    x, logits, w1, w2, grad_y = _problem(n, e, seed=world)
    if n_groups:
        route = lambda lg: grouped_top_k_gating(lg, k, n_groups, normalize=True)
    else:
        route = lambda lg: top_k_gating(lg, k)
    res = run_expert_parallel(x, logits, w1, w2, world_size=world, k=k, n_groups=n_groups, grad_y=grad_y)
    y, gx, glogits, gw1, gw2 = _single_process(x, logits, w1, w2, grad_y, route)
    torch.testing.assert_close(res["y"], y)
    torch.testing.assert_close(res["grad_x"], gx)
    torch.testing.assert_close(res["grad_logits"], glogits)
    torch.testing.assert_close(res["grad_w1"], gw1)
    torch.testing.assert_close(res["grad_w2"], gw2)

    rows = _expected_rows(logits, route, world, e)
    assert torch.equal(res["rows_sent"], rows)
    assert torch.equal(res["rows_received"], rows.t())
    remote = rows.sum(1) - rows.diagonal()
    assert torch.equal(res["bytes_sent_remote"], 2 * remote * x.shape[1] * 4)
    load = rows.sum(0)  # rows each device's experts compute
    assert imbalance_score(route(logits).index, e, world, n) == (load.max() - load.min()).item() / n
    if n_groups:  # MoGE: every device does exactly N_r k / M rows of each rank's N_r tokens
        assert torch.all(load == n * k // n_groups)
        shards = [len(s) for s in torch.tensor_split(x, world)]
        expected = [expected_exchange_bytes(s, k, x.shape[1], world, 4) for s in shards]
        assert res["bytes_sent_remote"].tolist() == expected


def test_send_counts_matches_naive_and_rejects_bad_devices() -> None:
    logits = torch.randn(20, 8, generator=torch.Generator().manual_seed(1))
    routing = top_k_gating(logits, 2).routing()
    naive = [sum(1 for x in routing.expert.tolist() if x // 2 == dev) for dev in range(4)]
    assert send_counts(routing, 4).tolist() == naive
    with pytest.raises(ValueError, match="n_devices must divide n_experts=8, got 3"):
        send_counts(routing, 3)


def test_run_expert_parallel_rejects_bad_world_size() -> None:
    x, logits, w1, w2, _ = _problem(6, 6)
    with pytest.raises(ValueError, match="world_size must divide the number of experts 6, got 4"):
        run_expert_parallel(x, logits, w1, w2, world_size=4, k=1)
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        run_expert_parallel(x, logits, w1, w2, world_size=0, k=1)
