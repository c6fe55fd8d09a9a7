"""The process launcher: free ports, errors raised on every rank instead of a hang, a timeout on collectives;
and the benchmark's lines."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing import ProcessRaisedException

from refimpl.parallel import free_port, run_processes, run_tasks, tensor_parallel_step, tiny_config


def _rank_zero_waits_alone() -> None:
    """Rank 0 enters an all-reduce that no other rank joins."""
    if dist.get_rank() == 0:
        dist.all_reduce(torch.ones(1))


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


def test_run_tasks_rejects_malformed_tasks() -> None:
    with pytest.raises(TypeError, match=r"tasks\[0\] must be a \(function, args tuple\) pair"):
        run_tasks(2, [(free_port, [])])
    with pytest.raises(ValueError, match="world_size must be >= 1, got 0"):
        run_processes(free_port, 0)


@pytest.mark.distributed
def test_bad_world_size_raises_on_the_ranks() -> None:
    config = tiny_config(n_heads=4, d_model=32)
    x = torch.zeros(1, 2, 32)
    with pytest.raises(ProcessRaisedException, match="world_size must divide n_heads=4, got 3"):
        run_tasks(3, [(tensor_parallel_step, (config, x, x))])


@pytest.mark.distributed
def test_a_lonely_collective_errors_instead_of_hanging() -> None:
    with pytest.raises(ProcessRaisedException):  # an error, not a hang: the peer left or the timeout fired
        run_processes(_rank_zero_waits_alone, 2, timeout_s=5.0)


@pytest.mark.distributed
def test_bench_parallel_quick_prints_its_lines(run_benchmark) -> None:
    result, lines = run_benchmark("bench_parallel", ["--quick"])
    expected = {
        "dp_overlap_fraction",
        "pipeline_bubble_measured",
        "pipeline_bubble_predicted",
        "zero1_optimizer_bytes_ratio",
        "ladder_comm_hidden_fraction",
        "megascale_mfu_predicted",
        "megascale_mfu_reported",
    }
    assert set(lines) == expected
    assert float(lines["pipeline_bubble_predicted"]) == pytest.approx(1 / 5, abs=1e-3)  # p = 2, m = 4
    assert abs(result["zero1_optimizer_bytes_ratio"] - 0.5) < 0.05
    assert 0.552 < result["megascale_mfu_predicted"] < 1
