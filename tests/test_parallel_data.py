"""Data parallelism and ZeRO stages 1-3 across processes (gloo, CPU): parameters and gradients after several steps equal
one process training on the whole batch; buckets and the ZeRO partition checked against independent counts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.parallel import (
    DataParallel,
    FullyShardedUnit,
    ZeroOptimizer,
    make_buckets,
    partition_parameters,
    run_tasks,
    tiny_config,
    train_data_parallel,
    train_single,
)
from refimpl.parallel.train import data_parallel_steps, zero3_steps

CONFIG = tiny_config(n_layers=2, d_model=16, n_heads=2, ffn_dim=32, vocab_size=32, max_seq_len=16)


def _tokens(steps: int, batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (steps, batch, 9), generator=torch.Generator().manual_seed(seed))


def _assert_same_training(parallel: list[dict], single: dict, *, averaged_grads: bool = True) -> None:
    for rank_result in parallel:
        for name, value in single["params"].items():
            torch.testing.assert_close(rank_result["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    for rank_result in parallel if averaged_grads else []:  # stages 0 and 1: every rank held the average
        for name, value in single["grads"].items():
            torch.testing.assert_close(rank_result["grads"][name], value, rtol=1e-5, atol=1e-6, msg=name)


@given(st.lists(st.integers(0, 100), max_size=30), st.integers(1, 150))
def test_make_buckets_partitions_in_order(sizes: list[int], cap: int) -> None:
    buckets = make_buckets(sizes, cap)
    assert [i for b in buckets for i in b] == list(range(len(sizes)))
    assert all(b for b in buckets)
    for b in buckets[:-1]:  # every closed bucket reached the cap, and closed as soon as it did
        assert sum(sizes[i] for i in b) >= cap
        assert sum(sizes[i] for i in b[:-1]) < cap


@settings(deadline=None)
@given(st.lists(st.integers(1, 1000), min_size=4, max_size=40), st.integers(1, 4))
def test_partition_parameters_is_balanced(sizes: list[int], world: int) -> None:
    owner = partition_parameters(sizes, world)
    loads = [sum(s for s, o in zip(sizes, owner) if o == r) for r in range(world)]
    assert sorted(set(owner)) == list(range(world))
    assert max(loads) - min(loads) <= max(sizes)  # greedy largest-first: the gap is at most one parameter


@pytest.mark.distributed
def test_data_parallel_and_zero1_equal_single_process_2_ranks() -> None:
    tokens = _tokens(3, 4)
    sgd = (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})
    adam = (torch.optim.Adam, {"lr": 1e-2})
    dp_sgd, zero1, zero3 = run_tasks(
        2,
        [
            (data_parallel_steps, (CONFIG, tokens, *sgd, 0, 2**12, 0, 2)),  # 2 micro-batches, no_sync on the first
            (data_parallel_steps, (CONFIG, tokens, *adam, 1, 2**12, 0)),
            (zero3_steps, (CONFIG, tokens, *adam, 0)),
        ],
    )
    _assert_same_training(dp_sgd, train_single(CONFIG, tokens, *sgd))
    single_adam = train_single(CONFIG, tokens, *adam)
    _assert_same_training(zero1, single_adam)
    _assert_same_training(zero3, single_adam, averaged_grads=False)
    n = sum(v.numel() for v in single_adam["params"].values())
    for r in zero3:  # P_os+g+p: parameters, gradients and Adam's two moments each ceil(N / P) per rank
        assert r["param_bytes"] == r["grad_bytes"] == 4 * -(-n // 2)
        assert r["optimizer_bytes"] == 2 * 4 * -(-n // 2) + 4  # exp_avg, exp_avg_sq and the step count
    assert [r["losses"] for r in zero3] == [r["losses"] for r in zero1]  # same data, same model, each step
    assert dp_sgd[0]["num_buckets"] > 2  # the gradients really went in several buckets
    assert dp_sgd[0]["bucket_all_reduces"] == 3 * dp_sgd[0]["num_buckets"]  # once per step: no_sync held back
    assert [r["losses"] for r in zero1] != [single_adam["losses"]] * 2  # each rank saw only its half batch
    shard_bytes = [r["optimizer_bytes"] for r in zero1]
    assert sum(shard_bytes) == single_adam["optimizer_bytes"]  # every parameter's state held exactly once
    assert max(shard_bytes) / single_adam["optimizer_bytes"] < 0.6


@pytest.mark.distributed
def test_data_parallel_and_zero2_equal_single_process_4_ranks() -> None:
    tokens = _tokens(2, 8, seed=1)
    adam = (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1})
    dp, zero2, zero3 = run_tasks(
        4,
        [
            (data_parallel_steps, (CONFIG, tokens, *adam, 0, 2**20, 0)),  # one bucket for everything
            (data_parallel_steps, (CONFIG, tokens, *adam, 2, 2**12, 0)),
            (zero3_steps, (CONFIG, tokens, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, 0)),
        ],
    )
    single = train_single(CONFIG, tokens, *adam)
    _assert_same_training(dp, single)
    _assert_same_training(zero2, single, averaged_grads=False)  # stage 2 reduces in step()
    sgd_single = train_single(CONFIG, tokens, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})
    _assert_same_training(zero3, sgd_single, averaged_grads=False)
    assert dp[0]["num_buckets"] == 1
    total_grad = sum(v.numel() * 4 for v in single["grads"].values())
    assert sum(r["grad_bytes"] for r in zero2) == total_grad  # each gradient kept by exactly one rank


def test_bad_inputs_name_the_argument() -> None:
    tokens = _tokens(1, 6)
    with pytest.raises(ValueError, match="world_size must divide the batch size B=6, got 4"):
        train_data_parallel(CONFIG, tokens, world_size=4)
    with pytest.raises(ValueError, match="zero_stage must be one of 0, 1, 2; got 3"):
        train_data_parallel(CONFIG, tokens, world_size=2, zero_stage=3)
    with pytest.raises(ValueError, match="bucket_cap_bytes must be >= 1, got 0"):
        make_buckets([4, 4], 0)
    with pytest.raises(ValueError, match="world_size must be <= the number of parameters 2, got 3"):
        partition_parameters([1, 2], 3)
    with pytest.raises(ValueError, match="tokens must be in \\[0, 32\\)"):
        train_single(CONFIG, tokens + 100)
    with pytest.raises(TypeError, match="optimizer_class must be a torch.optim.Optimizer subclass"):
        ZeroOptimizer([torch.zeros(2, requires_grad=True)], dict)
    with pytest.raises(TypeError, match="module must be a torch.nn.Module, got function"):
        DataParallel(lambda x: x)


def test_fully_sharded_unit_rejects_bad_modules() -> None:
    with pytest.raises(TypeError, match="module must be a torch.nn.Module, got int"):
        FullyShardedUnit(3)
