"""Pipeline parallelism: GPipe and 1F1B schedules as data, executed with send/recv between stage processes.

The ``L`` blocks are cut into ``p`` stages of ``L / p`` consecutive blocks, one per process (stage 0 also holds
the embedding, stage ``p - 1`` the final norm, head and loss). A batch is split into ``m`` micro-batches;
stage ``s`` runs the forward ``F`` and backward ``B`` of every micro-batch, receiving activations from stage
``s - 1`` and gradients from stage ``s + 1``. Gradients of the ``m`` micro-batches accumulate, so one step
equals one step on the whole batch (the loss is the mean of the micro-batch means).

A *schedule* is the order in which each stage runs its ``2m`` actions:

* GPipe (Huang et al. 2019, sec. 2.2): all forwards, then all backwards. Each stage keeps the activations of
  all ``m`` micro-batches.
* 1F1B (PipeDream-Flush, Narayanan et al. 2021, sec. 2.2.1, Fig. 4): stage ``s`` runs ``p - s - 1`` warm-up
  forwards, then alternates one forward and one backward, then drains the backwards. At most ``p - s``
  micro-batches are in flight, whatever ``m``.

With every forward taking ``t_f`` and every backward ``t_b`` on every stage, both schedules take
``(m + p - 1)(t_f + t_b)``, of which each stage computes ``m (t_f + t_b)``: the idle share, the *bubble*, is
``(p - 1) / (m + p - 1)`` (Narayanan et al. 2021, sec. 2.2.1). :func:`simulate` computes the timeline of any
schedule from its dependencies; :func:`pipeline_step` runs one on processes and records what really happened.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from refimpl._checks import check_choice, check_float, check_int, check_positive_int, check_tensor
from refimpl.llm.config import LlamaConfig
from refimpl.parallel.model import TinyGPT

__all__ = [
    "Action",
    "Timeline",
    "bubble_fraction",
    "check_schedule",
    "gpipe_schedule",
    "make_schedule",
    "measured_bubble",
    "one_f_one_b_schedule",
    "pipeline_step",
    "simulate",
    "stage_layers",
]


@dataclass(frozen=True)
class Action:
    """One unit of pipeline work: ``kind`` ``"F"`` (forward) or ``"B"`` (backward) of ``microbatch``."""

    kind: str
    microbatch: int

    def __repr__(self) -> str:
        return f"{self.kind}{self.microbatch}"


def _check_sizes(num_stages: int, num_microbatches: int) -> tuple[int, int]:
    return check_positive_int("num_stages", num_stages), check_positive_int("num_microbatches", num_microbatches)


def gpipe_schedule(num_stages: int, num_microbatches: int) -> list[list[Action]]:
    """GPipe: on every stage ``F0 .. F(m-1)`` then ``B0 .. B(m-1)``; ``schedule[s]`` is stage ``s``'s order."""
    p, m = _check_sizes(num_stages, num_microbatches)
    return [[Action("F", i) for i in range(m)] + [Action("B", i) for i in range(m)] for _ in range(p)]


def one_f_one_b_schedule(num_stages: int, num_microbatches: int) -> list[list[Action]]:
    """1F1B (PipeDream-Flush): ``min(p - s - 1, m)`` warm-up forwards, alternate F/B, then the last backwards."""
    p, m = _check_sizes(num_stages, num_microbatches)
    schedule = []
    for s in range(p):
        warmup = min(p - s - 1, m)
        actions = [Action("F", i) for i in range(warmup)]
        f, b = warmup, 0
        while f < m:  # steady state: one forward, one backward
            actions += [Action("F", f), Action("B", b)]
            f, b = f + 1, b + 1
        actions += [Action("B", i) for i in range(b, m)]  # cool-down
        schedule.append(actions)
    return schedule


_SCHEDULES = {"gpipe": gpipe_schedule, "1f1b": one_f_one_b_schedule}


def make_schedule(name: str, num_stages: int, num_microbatches: int) -> list[list[Action]]:
    """The schedule ``name`` (``"gpipe"`` or ``"1f1b"``) for ``num_stages`` stages and ``num_microbatches``."""
    return _SCHEDULES[check_choice("schedule", name, _SCHEDULES)](num_stages, num_microbatches)


def check_schedule(schedule: list[list[Action]], num_microbatches: int) -> None:
    """Raise ``ValueError`` unless every stage runs each ``F i`` and ``B i`` once, ``B i`` after ``F i``."""
    m = check_positive_int("num_microbatches", num_microbatches)
    want = sorted((k, i) for k in "BF" for i in range(m))
    for s, actions in enumerate(schedule):
        if sorted((a.kind, a.microbatch) for a in actions) != want:
            raise ValueError(f"schedule[{s}] must run F and B of micro-batches 0..{m - 1} once each, got {actions}")
        seen = set()
        for a in actions:
            if a.kind == "B" and a.microbatch not in seen:
                raise ValueError(f"schedule[{s}] runs B{a.microbatch} before F{a.microbatch}")
            seen.add(a.microbatch)


@dataclass(frozen=True)
class Timeline:
    """When each stage ran each action: ``intervals[s]`` is a list of ``(action, start, end)`` in seconds.

    ``peak_in_flight[s]``: the most micro-batches whose forward ran on stage ``s`` and backward had not
    (what its activation memory must hold).
    """

    intervals: list[list[tuple[Action, float, float]]]

    @property
    def makespan(self) -> float:
        """From the first start to the last end, over all stages."""
        starts = [iv[1] for stage in self.intervals for iv in stage]
        ends = [iv[2] for stage in self.intervals for iv in stage]
        return max(ends) - min(starts)

    @property
    def bubble(self) -> float:
        """Share of ``p * makespan`` stage-seconds not spent computing."""
        busy = sum(end - start for stage in self.intervals for _, start, end in stage)
        return 1.0 - busy / (len(self.intervals) * self.makespan)

    @property
    def peak_in_flight(self) -> list[int]:
        peaks = []
        for stage in self.intervals:
            live = peak = 0
            for action, _, _ in stage:
                live += 1 if action.kind == "F" else -1
                peak = max(peak, live)
            peaks.append(peak)
        return peaks


def simulate(schedule: list[list[Action]], forward_time: float = 1.0, backward_time: float = 2.0) -> Timeline:
    """The timeline of ``schedule`` when every forward takes ``forward_time`` and every backward ``backward_time``.

    An action starts when the stage's previous action has ended and its input exists: ``F i`` on stage ``s``
    needs ``F i`` of stage ``s - 1``; ``B i`` needs ``B i`` of stage ``s + 1`` (on the last stage, its own
    ``F i``). Communication is free. Raises ``ValueError`` if the schedule deadlocks.
    """
    t_f = check_float("forward_time", forward_time, min_value=0.0)
    t_b = check_float("backward_time", backward_time, min_value=0.0)
    p = len(schedule)
    m = len(schedule[0]) // 2 if p else 0
    check_schedule(schedule, max(m, 1))
    done: dict[tuple[str, int, int], float] = {}  # (kind, stage, microbatch) -> end time
    intervals: list[list[tuple[Action, float, float]]] = [[] for _ in range(p)]
    position, clock = [0] * p, [0.0] * p
    while any(position[s] < len(schedule[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            if position[s] == len(schedule[s]):
                continue
            a = schedule[s][position[s]]
            if a.kind == "F":
                dep = ("F", s - 1, a.microbatch) if s > 0 else None
            else:
                dep = ("B", s + 1, a.microbatch) if s < p - 1 else ("F", s, a.microbatch)
            if dep is not None and dep not in done:
                continue
            start = max(clock[s], done[dep] if dep is not None else 0.0)
            end = start + (t_f if a.kind == "F" else t_b)
            intervals[s].append((a, start, end))
            done[(a.kind, s, a.microbatch)] = end
            clock[s], position[s], progressed = end, position[s] + 1, True
        if not progressed:
            raise ValueError(f"schedule deadlocks: stages wait on {[schedule[s][position[s]] for s in range(p)]}")
    return Timeline(intervals)


def bubble_fraction(num_stages: int, num_microbatches: int) -> float:
    """The pipeline bubble ``(p - 1) / (m + p - 1)`` (Narayanan et al. 2021, sec. 2.2.1; Huang et al. 2019)."""
    p, m = _check_sizes(num_stages, num_microbatches)
    return (p - 1) / (m + p - 1)


def measured_bubble(timelines: list[list[tuple[Action, float, float]]]) -> float:
    """Bubble of a run: ``1 - busy / (p * makespan)`` from each stage's recorded intervals (one clock)."""
    return Timeline(timelines).bubble


def stage_layers(n_layers: int, num_stages: int, stage: int) -> tuple[int, int]:
    """Blocks ``[first, last)`` of ``stage`` when ``num_stages`` divides ``n_layers``; else raise naming it."""
    p = check_positive_int("num_stages", num_stages)
    if n_layers % p:
        raise ValueError(f"num_stages must divide n_layers={n_layers}, got {p}")
    stage = check_int("stage", stage, min_value=0, max_value=p - 1)
    per = n_layers // p
    return stage * per, (stage + 1) * per


def _run_schedule(
    model: TinyGPT, schedule: list[Action], micro: tuple[Tensor, ...], shape: tuple[int, int, int], layers: range
) -> tuple[float, list[tuple[Action, float, float]]]:
    """Run this stage's ``schedule`` once; return the summed loss (last stage) and the compute intervals."""
    rank, p, m = dist.get_rank(), dist.get_world_size(), len(micro)
    stash: dict[int, tuple[Tensor | None, Tensor]] = {}  # microbatch -> (stage input, stage output or loss)
    sends: list[tuple[Any, Tensor]] = []
    intervals: list[tuple[Action, float, float]] = []
    loss_total = 0.0
    for action in schedule:
        i = action.microbatch
        if action.kind == "F":
            if rank == 0:
                x = None
            else:
                x = torch.empty(shape)
                dist.recv(x, src=rank - 1, tag=i)
                x.requires_grad_(True)
            start = time.perf_counter()
            h = F.embedding(micro[i][:, :-1], model.embed) if rank == 0 else x
            y = model.stage_forward(h, layers.start, layers.stop)
            if rank == p - 1:
                logits = model.output(y)
                y = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), micro[i][:, 1:].reshape(-1)) / m
                loss_total += y.item()
            else:
                sends.append((dist.isend(y.detach(), dst=rank + 1, tag=i), y))
            stash[i] = (x, y)
        else:
            x, y = stash.pop(i)
            if rank == p - 1:
                start = time.perf_counter()
                y.backward()
            else:
                grad = torch.empty(shape)
                dist.recv(grad, src=rank + 1, tag=i)
                start = time.perf_counter()
                y.backward(grad)
            if x is not None:
                sends.append((dist.isend(x.grad, dst=rank - 1, tag=i), x.grad))
        intervals.append((action, start, time.perf_counter()))
    for work, _ in sends:
        work.wait()
    return loss_total, intervals


def pipeline_step(
    config: LlamaConfig,
    tokens: Tensor,
    num_microbatches: int,
    schedule_name: str,
    seed: int = 0,
    warmup: int = 1,
) -> dict[str, Any]:
    """On each rank (= stage): one forward/backward of ``tokens: (B, T + 1)`` under the named schedule.

    Every rank builds ``TinyGPT(config, seed)`` and keeps the parameters of its stage. Activations and
    gradients travel with ``isend`` (never blocking the sender, so no schedule order can deadlock on a send)
    and blocking ``recv``. The schedule first runs ``warmup`` untimed times (first calls pay for allocation),
    then once more with the gradients zeroed. Returns this stage's ``grads`` (name -> tensor, its parameters
    only), the ``loss`` (last stage; ``None`` elsewhere) and ``intervals``: ``(action, start, end)`` of the
    compute of each action in the last run, on the machine-wide monotonic clock.
    """
    model = TinyGPT(config, seed)
    check_tensor("tokens", tokens, ndim=2)
    model.check_ids(tokens[:, :-1])
    model.check_ids(tokens[:, 1:])
    m = check_positive_int("num_microbatches", num_microbatches)
    warmup = check_int("warmup", warmup, min_value=0)
    if tokens.shape[0] % m:
        raise ValueError(f"num_microbatches must divide the batch size {tokens.shape[0]}, got {m}")
    rank, p = dist.get_rank(), dist.get_world_size()
    first, last = stage_layers(config.n_layers, p, rank)
    schedule = make_schedule(schedule_name, p, m)[rank]
    micro = tokens.tensor_split(m)  # m x (B / m, T + 1)
    shape = (tokens.shape[0] // m, tokens.shape[1] - 1, config.d_model)
    for _ in range(warmup + 1):
        model.zero_grad(set_to_none=True)
        dist.barrier()  # every stage starts the timed run together
        loss_total, intervals = _run_schedule(model, schedule, micro, shape, range(first, last))
    grads = {n: q.grad for n, q in model.named_parameters() if q.grad is not None}
    return {"grads": grads, "loss": loss_total if rank == p - 1 else None, "intervals": intervals}
