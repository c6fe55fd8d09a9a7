"""Run a function on ``P`` local CPU processes joined by ``torch.distributed`` (gloo over loopback).

Every technique of :mod:`refimpl.parallel` is a function that runs on each rank of a process group. Tests and
the chapter call :func:`run_processes`, which spawns ``P`` processes, gives each a process group on a fresh
loopback port (:func:`free_port`, so runs in parallel do not collide), a timeout on every collective (a
mismatched program fails with an error instead of hanging) and one thread (``P`` processes share the cores),
then returns what each rank's function returned, in rank order.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from refimpl._checks import check_float, check_int

__all__ = ["free_port", "run_processes", "run_tasks"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the operating system reports free (bind to port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _entry(
    rank: int, fn: Callable[..., Any], world: int, port: int, workdir: str, args: tuple, timeout_s: float
) -> None:
    """Body of one spawned process: join the group, run ``fn(*args)``, save its result for the parent."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        result = fn(*args)
        torch.save(result, os.path.join(workdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_processes(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 60.0) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` spawned processes in one gloo group; return their results by rank.

    ``fn`` must be importable (a module-level function) and its arguments and result picklable by
    ``torch.save``. Inside ``fn``, ``torch.distributed.get_rank()`` tells the process which rank it is. Every
    collective times out after ``timeout_s`` seconds. An exception on any rank is raised here
    (``torch.multiprocessing.ProcessRaisedException`` with that rank's traceback).
    """
    import torch.multiprocessing as mp

    world = check_int("world_size", world_size, min_value=1, max_value=64)
    timeout_s = check_float("timeout_s", timeout_s, min_value=0.0, min_inclusive=False)
    with tempfile.TemporaryDirectory(prefix="refimpl_parallel_") as workdir:
        mp.start_processes(
            _entry,
            args=(fn, world, free_port(), workdir, args, timeout_s),
            nprocs=world,
            start_method="spawn",
        )
        return [torch.load(os.path.join(workdir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def _tasks(tasks: list[tuple[Callable[..., Any], tuple]]) -> list[Any]:
    """Run each ``fn(*args)`` of ``tasks`` in turn on this rank, with a barrier between tasks."""
    results = []
    for fn, args in tasks:
        results.append(fn(*args))
        dist.barrier()
    return results


def run_tasks(
    world_size: int, tasks: Sequence[tuple[Callable[..., Any], tuple]], *, timeout_s: float = 60.0
) -> list[list[Any]]:
    """Run several ``(fn, args)`` tasks in one spawn of ``world_size`` processes (spawning costs seconds).

    Returns ``results[task][rank]``.
    """
    for i, task in enumerate(tasks):
        if not (isinstance(task, tuple) and len(task) == 2 and callable(task[0]) and isinstance(task[1], tuple)):
            raise TypeError(f"tasks[{i}] must be a (function, args tuple) pair, got {task!r}")
    per_rank = run_processes(_tasks, world_size, list(tasks), timeout_s=timeout_s)
    return [[per_rank[r][i] for r in range(len(per_rank))] for i in range(len(tasks))]
