"""A discrete-event simulator of a serving cluster: dispatch and Llumnix-style live migration (Sun et al. 2024).

No model runs here: ``N`` instances each hold a KV block budget and schedule exactly as
:class:`~refimpl.serving.engine.Engine` does (iteration-level batching, first-come-first-served admission with
a block per running sequence kept free, preemption by recompute of the most recently admitted sequence when a
decode step lacks blocks), but on block *counts*; each step's duration comes from a cost model, so the
latencies are **model arithmetic**, not measurements.

- :func:`poisson_workload`: a seeded Poisson arrival process with heavy-tailed (Pareto) prompt and output lengths;
- :class:`LinearCost`: a step time linear in the step's work, fitted to measured steps (:meth:`LinearCost.fit`)
  or to the roofline model (:meth:`LinearCost.from_roofline`: the step time of Llama-2-7B on an A100/H100, a
  linear fit to :func:`refimpl.roofline.analyze`: weights read once per step, plus KV reads per cached token,
  plus prefill compute per prompt token); :class:`UnitCost`: every step takes 1 (for checking against the real engine);
- :func:`simulate`: an event heap (arrivals, step ends, migration ends) over the instances, with a dispatch
  policy: ``"round_robin"``, ``"least_loaded"`` (at arrival, the instance with the most free blocks less its
  queue's demand: INFaaS-like load-aware placement, Romero et al. 2021) or ``"llumnix"`` (dispatch to the
  highest *freeness*, plus migration).

Llumnix's load metric (Sun et al. 2024, sec. 4): an instance's *virtual usage* is the blocks its running
requests hold plus the demand of its head-of-line waiting request (queued requests count as load, so an
instance that must queue looks full); *freeness* is ``(M - sum V) / B``, the free blocks per running request
(``B`` its batch, at least 1). Every ``migrate_interval`` the global scheduler pairs the instances with the
lowest freeness (below ``migrate_low``) with those with the highest (above ``migrate_high``) and moves one
running request from each source: the one holding the fewest blocks (the cheapest to copy). An instance takes
part in one migration at a time (else two sources could fill one destination at once, and requests bounce).
Defaults checked against the authors' released code (github.com/AlibabaPAI/llumnix, ``docs/Arguments.md``): a
polling interval of 0.05 s, a migrate-out threshold of 3 (there on its own load metric, here on freeness) and the
"SR" request-migration policy (the shortest request); ``migrate_high`` (20) is ours.

Migration (sec. 4, *live* migration): the KV blocks are copied over the link while the request keeps decoding
on the source; the copy takes ``bytes / link_bandwidth``. Simplifications, stated: the copy is one stage (the
paper copies in rounds until a short stop-and-copy of the last blocks; we charge the whole request's blocks as
of the end of the copy and no downtime), the destination reserves nothing during the copy and the migration is
aborted if, at its end, the destination lacks room or the request has finished or been preempted (the paper's
handshake aborts in the same cases), and the instances do not slow down while copying.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from refimpl._checks import check_choice, check_float, check_int, check_positive_int
from refimpl.llm.perplexity import Increase

if TYPE_CHECKING:
    from refimpl.serving.engine import Engine

__all__ = [
    "POLICIES",
    "ClusterResult",
    "Instance",
    "LinearCost",
    "SimRequest",
    "StepLog",
    "UnitCost",
    "load_sweep",
    "paired_change",
    "poisson_workload",
    "policy_sweep",
    "replay",
    "run_timed",
    "simulate",
]

POLICIES = ("round_robin", "least_loaded", "llumnix")


@dataclass(eq=False)
class SimRequest:
    """A request of ``prompt_len`` tokens that generates ``output_len`` tokens; its simulated timeline."""

    request_id: int
    arrival_time: float
    prompt_len: int
    output_len: int
    generated: int = 0
    first_token_time: float | None = None
    finish_time: float | None = None
    preemptions: int = 0
    migrations: int = 0
    completions: int = 0  # times it finished: exactly 1 at the end (checked by the tests)

    @property
    def context_len(self) -> int:
        return self.prompt_len + self.generated

    @property
    def finished(self) -> bool:
        return self.generated >= self.output_len


def poisson_workload(
    n: int,
    rate: float,
    seed: int,
    *,
    mean_prompt: float = 256.0,
    mean_output: float = 256.0,
    alpha: float = 1.5,
    max_len: int = 2048,
) -> list[SimRequest]:
    """``n`` requests arriving by a Poisson process of ``rate`` per second (exponential gaps), with prompt and
    output lengths from Pareto (Lomax) distributions of shape ``alpha`` scaled to the given means, clipped to
    ``[1, max_len]`` each (heavy-tailed: most requests short, a few very long; Llumnix sec. 6.1 uses power-law
    lengths likewise)."""
    n = check_positive_int("n", n)
    rate = check_float("rate", rate, min_value=0.0, min_inclusive=False)
    seed = check_int("seed", seed, min_value=0)
    alpha = check_float("alpha", alpha, min_value=1.0, min_inclusive=False)
    max_len = check_positive_int("max_len", max_len)
    for name, m in (("mean_prompt", mean_prompt), ("mean_output", mean_output)):
        check_float(name, m, min_value=1.0)
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=n))
    scale = alpha - 1.0  # a Lomax(alpha) variable has mean 1 / (alpha - 1)
    prompts = np.clip(np.rint(rng.pareto(alpha, size=n) * scale * mean_prompt), 1, max_len)
    outputs = np.clip(np.rint(rng.pareto(alpha, size=n) * scale * mean_output), 1, max_len)
    return [SimRequest(i, float(a), int(p), int(o)) for i, (a, p, o) in enumerate(zip(arrivals, prompts, outputs))]


class UnitCost:
    """Every step takes 1 time unit and a migration ``migration_time`` (for tests and the engine check)."""

    kv_bytes_per_token = 1.0

    def __init__(self, migration_time: float = 1.0) -> None:
        self.migration_time = check_float("migration_time", migration_time, min_value=0.0)

    def step_time(self, prefill_tokens: int, n_decode: int, kv_tokens: int) -> float:
        return 1.0

    def migration_seconds(self, kv_tokens: int) -> float:
        return self.migration_time


@dataclass(frozen=True)
class LinearCost:
    """A step time linear in the step's work:

    ``t = t_weights + n_decode * t_seq + kv_tokens * t_kv + prefill_tokens * t_prefill``

    (``t_weights`` a fixed cost per step, e.g. reading all weights once; ``t_seq`` per decoded sequence; ``t_kv``
    per cached token read by attention; ``t_prefill`` per prefilled token). A migration moves
    ``kv_tokens * kv_bytes_per_token`` bytes over ``link_bandwidth`` bytes/s. Two constructors estimate the
    coefficients: :meth:`fit` from measured steps (least squares), :meth:`from_roofline` from the roofline model.

    Frozen and validated on construction: raises ``ValueError`` naming the field for a negative (or non-finite)
    coefficient or ``kv_bytes_per_token``, or a ``link_bandwidth`` that is not positive.
    """

    t_weights: float
    t_seq: float
    t_kv: float
    t_prefill: float
    _: KW_ONLY
    kv_bytes_per_token: float = 1.0
    link_bandwidth: float = 1.0

    def __post_init__(self) -> None:
        for name in ("t_weights", "t_seq", "t_kv", "t_prefill", "kv_bytes_per_token"):
            object.__setattr__(self, name, check_float(name, getattr(self, name), min_value=0.0))  # frozen
        bandwidth = check_float("link_bandwidth", self.link_bandwidth, min_value=0.0, min_inclusive=False)
        object.__setattr__(self, "link_bandwidth", bandwidth)

    @classmethod
    def fit(cls, steps: Sequence[StepLog], seconds: Sequence[float]) -> LinearCost:
        """Least-squares coefficients (clipped at 0) from steps (their ``prefill_tokens``, ``n_decode``,
        ``kv_tokens``) and their measured durations."""
        if len(steps) != len(seconds) or len(steps) < 4:
            raise ValueError(f"fit needs at least 4 steps and one duration per step, got {len(steps)} steps and "
                             f"{len(seconds)} durations")  # fmt: skip
        x = np.array([[1.0, s.n_decode, s.kv_tokens, s.prefill_tokens] for s in steps])  # (S, 4)
        coef = np.linalg.lstsq(x, np.asarray(seconds, dtype=float), rcond=None)[0]  # (4,)
        return cls(*(max(float(c), 0.0) for c in coef))

    @classmethod
    def from_roofline(
        cls, model: str = "llama-2-7b", hardware: str = "h100-sxm", link_bandwidth: float | None = None
    ) -> LinearCost:
        """The cost of ``model`` on ``hardware`` (model arithmetic), fitted to :func:`refimpl.roofline.analyze`:
        ``t_weights`` the batch-1 decode step at context 1 (all weights read once), ``t_kv`` the extra time per
        cached token read by attention, ``t_seq`` the extra per decoded sequence, and ``t_prefill`` the time per
        prompt token of a 1024-token prefill (compute-bound). A migration moves the model's fp16 KV bytes per
        token over ``link_bandwidth`` bytes/s (default: the hardware's host link, i.e. PCIe; NVLink would be
        faster)."""
        from refimpl.roofline import Workload, analyze, get_model, kv_cache_bytes, load_hardware

        def t(stage: str, batch: int, seq: int) -> float:
            return analyze(model, hardware, Workload(stage=stage, batch=batch, seq=seq)).time

        t_weights = t("decode", 1, 1)
        bw = load_hardware(hardware).host_link_bandwidth if link_bandwidth is None else link_bandwidth
        return cls(
            t_weights=t_weights,
            t_seq=(t("decode", 16, 1) - t_weights) / 15,
            t_kv=(t("decode", 1, 4097) - t_weights) / 4096,
            t_prefill=t("prefill", 1, 1024) / 1024,
            kv_bytes_per_token=kv_cache_bytes(get_model(model), Workload(stage="decode", batch=1, seq=1)),
            link_bandwidth=bw,
        )

    def step_time(self, prefill_tokens: int, n_decode: int, kv_tokens: int) -> float:
        return self.t_weights + n_decode * self.t_seq + kv_tokens * self.t_kv + prefill_tokens * self.t_prefill

    def migration_seconds(self, kv_tokens: int) -> float:
        return kv_tokens * self.kv_bytes_per_token / self.link_bandwidth


@dataclass
class StepLog:
    """What one instance step decided (request ids, in order) and its work (the cost model's inputs)."""

    admitted: list[int] = field(default_factory=list)
    emitted: list[int] = field(default_factory=list)  # got a token: decoded, or its prompt completed
    preempted: list[int] = field(default_factory=list)
    finished: list[int] = field(default_factory=list)
    prefill_tokens: int = 0
    n_decode: int = 0
    kv_tokens: int = 0


class Instance:
    """One serving instance on block counts: the scheduling of :class:`~refimpl.serving.engine.Engine`.

    A running request holds the blocks of its whole prompt from admission (the engine reserves them) and caches
    ``cached[id]`` tokens: ``context_len - 1`` once it decodes (its last emitted token is not fed back yet).
    ``max_batched_tokens``: the engine's chunked-prefill budget (``None``: whole prompts).
    """

    def __init__(
        self, index: int, num_blocks: int, block_size: int, max_batch_size: int, max_batched_tokens: int | None = None
    ) -> None:
        self.index = index
        self.num_blocks = check_positive_int("num_blocks", num_blocks)
        self.block_size = check_positive_int("block_size", block_size)
        self.max_batch_size = check_positive_int("max_batch_size", max_batch_size)
        self.max_batched_tokens = (
            None if max_batched_tokens is None else check_positive_int("max_batched_tokens", max_batched_tokens)
        )
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.held: dict[int, int] = {}  # request id -> blocks held
        self.cached: dict[int, int] = {}  # request id -> tokens in its cache
        self.busy = False
        self.preemptions = 0
        self.peak_blocks = 0
        self.log: list[StepLog] = []

    @property
    def used_blocks(self) -> int:
        return sum(self.held.values())

    @property
    def free_blocks(self) -> int:
        return self.num_blocks - self.used_blocks

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def freeness(self) -> float:
        """Llumnix's freeness ``(M - sum V) / B``: free blocks, less the head-of-line waiting request's demand,
        per running request (sec. 4.4.2; negative when the queue's head does not fit)."""
        demand = self.blocks_for(self.waiting[0].context_len) if self.waiting else 0
        return (self.free_blocks - demand) / max(1, len(self.running))

    def pending(self, r: SimRequest) -> int:
        """Tokens of running ``r`` not cached yet: 1 when it decodes, more while its prompt is prefilled."""
        return r.context_len - self.cached[r.request_id]

    def step(self) -> StepLog:
        """One iteration as :meth:`~refimpl.serving.engine.Engine.step` (admit, one forward of decodes and
        prompt chunks, retire); returns its log, with the prefilled tokens, the decoded sequences and the cached
        tokens they read (for the cost model)."""
        log = StepLog()
        budget = self.max_batched_tokens if self.max_batched_tokens is not None else float("inf")
        budget -= sum(1 for r in self.running if self.pending(r) == 1)  # every decode first
        work: dict[int, int] = {}  # request id -> prompt tokens it prefills this step
        for r in self.running:  # part-prefilled prompts go on, oldest first
            if self.pending(r) > 1 and budget > 0:
                work[r.request_id] = int(min(self.pending(r), budget))
                budget -= work[r.request_id]
        # admit: first come first served while the batch has room, the budget lasts and the blocks of the whole
        # prompt leave one per running sequence
        while self.waiting and len(self.running) < self.max_batch_size and budget > 0:
            req = self.waiting[0]
            need = self.blocks_for(req.context_len)
            if need + len(self.running) > self.free_blocks:
                break
            self.waiting.popleft()
            self.held[req.request_id], self.cached[req.request_id] = need, 0
            self.running.append(req)
            log.admitted.append(req.request_id)
            work[req.request_id] = int(min(req.context_len, budget))  # recompute: prompt and earlier output
            budget -= work[req.request_id]
        self._note_peak()
        # reserve a slot per decoding sequence, preempting the most recently admitted ones
        decoding = [r for r in self.running if r.request_id not in work and self.pending(r) == 1]
        while decoding:
            need = sum(self._grow_need(r) for r in decoding)
            if need <= self.free_blocks:
                break
            victim = next(r for r in reversed(self.running) if not r.finished)
            del self.held[victim.request_id], self.cached[victim.request_id]
            work.pop(victim.request_id, None)
            self.running.remove(victim)
            victim.preemptions += 1
            self.preemptions += 1
            self.waiting.appendleft(victim)
            log.preempted.append(victim.request_id)
            decoding = [r for r in decoding if r is not victim]
        kv_tokens = sum(r.context_len - 1 for r in decoding)
        for r in decoding:
            self.held[r.request_id] += self._grow_need(r)
            self.cached[r.request_id] += 1
            r.generated += 1
            log.emitted.append(r.request_id)
        for r in self.running:
            n = work.get(r.request_id, 0)
            if n:
                self.cached[r.request_id] += n
                if self.cached[r.request_id] == r.context_len:  # the prompt is complete: it emits a token
                    r.generated += 1
                    log.emitted.append(r.request_id)
        self._note_peak()
        # retire
        for r in [r for r in self.running if r.finished]:
            del self.held[r.request_id], self.cached[r.request_id]
            log.finished.append(r.request_id)
        self.running = [r for r in self.running if not r.finished]
        log.prefill_tokens, log.n_decode, log.kv_tokens = sum(work.values()), len(decoding), kv_tokens
        self.log.append(log)
        return log

    def _grow_need(self, r: SimRequest) -> int:
        """Blocks ``r`` needs to cache one more token (its current last token)."""
        return self.blocks_for(r.context_len) - self.held[r.request_id]

    def _note_peak(self) -> None:
        used = self.used_blocks
        if used > self.num_blocks:  # an invariant; the tests rely on it never firing
            raise AssertionError(f"instance {self.index}: {used} blocks in use exceed the {self.num_blocks} blocks")
        self.peak_blocks = max(self.peak_blocks, used)


@dataclass
class ClusterResult:
    """Requests with their timelines, the instances, the migration count and the fragmentation of one
    :func:`simulate` run.

    ``fragmentation``: memory fragmented *across* instances (Sun et al. 2024, sec. 2.3, where free memory is
    spread over instances while requests queue for it): the fraction of the cluster's free KV blocks that sit
    on other instances while some instance's head-of-line request waits for blocks (0 when none waits),
    averaged over the arrivals; Poisson arrivals see time averages (Wolff 1982), so it is also a time average.
    Our metric, not the paper's.
    """

    requests: list[SimRequest]
    instances: list[Instance]
    migrations: int
    aborted_migrations: int
    makespan: float
    fragmentation: float = 0.0

    def ttft(self) -> np.ndarray:
        return np.array([r.first_token_time - r.arrival_time for r in self.requests])

    def latency(self) -> np.ndarray:
        return np.array([r.finish_time - r.arrival_time for r in self.requests])

    def tpot(self) -> np.ndarray:
        """Time per output token after the first, ``(finish - first token) / (output_len - 1)``, of the
        requests with more than one output token."""
        return np.array(
            [(r.finish_time - r.first_token_time) / (r.output_len - 1) for r in self.requests if r.output_len > 1]
        )

    @property
    def preemptions(self) -> int:
        return sum(i.preemptions for i in self.instances)

    def summary(self) -> dict[str, float]:
        """P50/P99 time to first token, time per output token and end-to-end latency, preemptions, migrations,
        fragmentation and throughput (tokens/s)."""
        out = {}
        for name, x in (("ttft", self.ttft()), ("tpot", self.tpot()), ("latency", self.latency())):
            out[f"{name}_p50"], out[f"{name}_p99"] = (float(v) for v in np.percentile(x, [50, 99]))
        tokens = sum(r.output_len for r in self.requests)
        return out | {
            "preemptions": float(self.preemptions),
            "migrations": float(self.migrations),
            "fragmentation": self.fragmentation,
            "throughput": tokens / self.makespan,
        }


def simulate(
    requests: Sequence[SimRequest],
    n_instances: int,
    num_blocks: int,
    *,
    policy: str = "round_robin",
    cost: LinearCost | UnitCost | None = None,
    block_size: int = 16,
    max_batch_size: int = 256,
    migrate_interval: float = 0.05,
    migrate_low: float = 3.0,
    migrate_high: float = 20.0,
    max_batched_tokens: int | None = None,
) -> ClusterResult:
    """Serve ``requests`` (copied, not changed) on ``n_instances`` instances of ``num_blocks`` blocks each
    (``max_batched_tokens``: the instances' chunked-prefill budget, as the engine's).

    ``cost``: the step and migration times (default :meth:`LinearCost.from_roofline`: Llama-2-7B on an H100).
    ``policy`` chooses the dispatch (see the module docstring); ``"llumnix"`` also migrates every
    ``migrate_interval`` seconds from instances with freeness below ``migrate_low`` to those above
    ``migrate_high``. Deterministic: ties go to the lowest instance index and simultaneous events run in the
    order they were scheduled.
    """
    n_instances = check_positive_int("n_instances", n_instances)
    policy = check_choice("policy", policy, POLICIES)
    migrate_interval = check_float("migrate_interval", migrate_interval, min_value=0.0, min_inclusive=False)
    cost = LinearCost.from_roofline() if cost is None else cost
    instances = [Instance(i, num_blocks, block_size, max_batch_size, max_batched_tokens) for i in range(n_instances)]
    reqs = [SimRequest(r.request_id, r.arrival_time, r.prompt_len, r.output_len) for r in requests]
    if len({r.request_id for r in reqs}) != len(reqs):
        raise ValueError("requests must have distinct request_id values")
    for r in reqs:
        check_positive_int(f"request {r.request_id}: prompt_len", r.prompt_len)
        check_positive_int(f"request {r.request_id}: output_len", r.output_len)
        check_float(f"request {r.request_id}: arrival_time", r.arrival_time, min_value=0.0)
        if instances[0].blocks_for(r.prompt_len + r.output_len - 1) > num_blocks:
            raise ValueError(
                f"request {r.request_id}: prompt_len + output_len - 1 = {r.prompt_len + r.output_len - 1} tokens "
                f"exceed an instance's {num_blocks} blocks of {block_size} tokens"
            )
    events: list[tuple[float, int, str, object]] = []
    seq = 0

    def push(t: float, kind: str, payload: object) -> None:
        nonlocal seq
        heapq.heappush(events, (t, seq, kind, payload))
        seq += 1

    def start_step(inst: Instance, now: float) -> None:
        log = inst.step()
        end = now + cost.step_time(log.prefill_tokens, log.n_decode, log.kv_tokens)
        for rid in log.emitted:
            r = by_id[rid]
            if r.first_token_time is None:
                r.first_token_time = end
        for rid in log.finished:
            r = by_id[rid]
            r.finish_time = end
            r.completions += 1
        inst.busy = True
        push(end, "step_end", inst)

    def kick(inst: Instance, now: float) -> None:
        if not inst.busy:
            inst.busy = True
            push(now, "kick", inst)

    by_id = {r.request_id: r for r in reqs}
    for r in sorted(reqs, key=lambda r: (r.arrival_time, r.request_id)):
        push(r.arrival_time, "arrival", r)
    if policy == "llumnix":
        push(migrate_interval, "schedule", None)
    rr = 0
    migrations = aborted = 0
    migrating: set[int] = set()  # instances sending or receiving a request: one migration each at a time
    remaining = len(reqs)
    now = 0.0
    arrivals = fragmented = 0
    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrival":
            arrivals += 1
            fragmented += _stranded(instances)
            if policy == "round_robin":
                inst = instances[rr % n_instances]
                rr += 1
            elif policy == "least_loaded":
                inst = max(instances, key=lambda i: (i.free_blocks - _queued_demand(i), -i.index))
            else:
                inst = max(instances, key=lambda i: (i.freeness(), -i.index))
            inst.waiting.append(payload)
            kick(inst, now)
        elif kind == "kick":  # after every event of this instant (arrivals at equal times are batched)
            start_step(payload, now)
        elif kind == "step_end":
            inst = payload
            inst.busy = False
            remaining -= sum(1 for rid in inst.log[-1].finished)
            if inst.has_work():
                start_step(inst, now)
        elif kind == "schedule":
            idle = [i for i in instances if i.index not in migrating]
            for src, dst, r in _pick_migrations(idle, migrate_low, migrate_high):
                migrating |= {src.index, dst.index}
                push(now + cost.migration_seconds(r.context_len - 1), "migrated", (src, dst, r))
            if remaining > 0:
                push(now + migrate_interval, "schedule", None)
        else:  # "migrated": the copy is done; hand the request over if it is still running and fits
            src, dst, r = payload
            migrating -= {src.index, dst.index}
            need = dst.blocks_for(r.context_len - 1)
            fits = len(dst.running) < dst.max_batch_size and need + len(dst.running) + 1 <= dst.free_blocks
            if r in src.running and not r.finished and src.pending(r) == 1 and fits:
                src.running.remove(r)
                del src.held[r.request_id]
                dst.running.append(r)
                dst.held[r.request_id] = need
                dst.cached[r.request_id] = src.cached.pop(r.request_id)
                dst._note_peak()
                r.migrations += 1
                migrations += 1
                kick(dst, now)
            else:
                aborted += 1
    return ClusterResult(reqs, instances, migrations, aborted, now, fragmented / arrivals)


def _stranded(instances: list[Instance]) -> float:
    """The fraction of the cluster's free blocks that sit on instances whose queue is not blocked while another
    instance's queue is: its head lacks blocks there (as the engine admits: the prompt plus one block per
    running request). Memory a waiting request cannot reach without migration; 0 if no queue is blocked."""
    free = sum(i.free_blocks for i in instances)
    blocked = [bool(i.waiting) and i.blocks_for(i.waiting[0].context_len) + len(i.running) > i.free_blocks
               for i in instances]  # fmt: skip
    if free == 0 or not any(blocked):
        return 0.0
    return sum(i.free_blocks for i, b in zip(instances, blocked, strict=True) if not b) / free


def _queued_demand(inst: Instance) -> int:
    return sum(inst.blocks_for(r.context_len) for r in inst.waiting)


def _pick_migrations(instances: list[Instance], low: float, high: float) -> list[tuple[Instance, Instance, SimRequest]]:
    """Pair the least free instances (freeness < ``low``) with the most free (> ``high``), one request each: the
    running request of the source holding the fewest blocks."""
    by_free = sorted(instances, key=lambda i: (i.freeness(), i.index))
    sources = [i for i in by_free if i.freeness() < low]
    dests = [i for i in reversed(by_free) if i.freeness() > high]
    out = []
    for src, dst in zip(sources, dests):
        if src is dst:
            break
        cands = [r for r in src.running if not r.finished and src.pending(r) == 1]  # decoding, not prefilling
        if cands:
            r = min(cands, key=lambda r: (src.held[r.request_id], r.request_id))
            out.append((src, dst, r))
    return out


def policy_sweep(
    seeds: Sequence[int],
    n_requests: int,
    rate: float,
    n_instances: int,
    num_blocks: int,
    cost: LinearCost | UnitCost | None = None,
    **kwargs: float,
) -> dict[str, dict[str, np.ndarray]]:
    """Every policy on the same trace per seed: ``{policy: {metric: (len(seeds),) values}}`` with the metrics
    of :meth:`ClusterResult.summary`; ``kwargs`` go to :func:`simulate`."""
    cost = LinearCost.from_roofline() if cost is None else cost
    out: dict[str, dict[str, list[float]]] = {p: {} for p in POLICIES}
    for seed in seeds:
        trace = poisson_workload(n_requests, rate, seed)
        for p in POLICIES:
            summary = simulate(trace, n_instances, num_blocks, policy=p, cost=cost, **kwargs).summary()
            for k, v in summary.items():
                out[p].setdefault(k, []).append(v)
    return {p: {k: np.array(v) for k, v in m.items()} for p, m in out.items()}


def load_sweep(
    rates: Sequence[float],
    seeds: Sequence[int],
    n_requests: int,
    n_instances: int,
    num_blocks: int,
    cost: LinearCost | UnitCost | None = None,
    **kwargs: float,
) -> dict[str, dict[str, np.ndarray]]:
    """:func:`policy_sweep` at each arrival rate: ``{policy: {metric: (len(rates), len(seeds)) values}}``."""
    if not rates:
        raise ValueError("rates must hold at least one arrival rate")
    cost = LinearCost.from_roofline() if cost is None else cost
    per_rate = [policy_sweep(seeds, n_requests, r, n_instances, num_blocks, cost, **kwargs) for r in rates]
    return {p: {k: np.stack([s[p][k] for s in per_rate]) for k in per_rate[0][p]} for p in POLICIES}


def paired_change(x: np.ndarray, base: np.ndarray) -> Increase:
    """``x / base - 1`` per seed (``x, base: (S,)``, the same traces), its mean and standard error over the seeds
    (:class:`refimpl.llm.Increase`; ``beyond(k)``: a ranking beyond ``k`` standard errors). Pairing by seed removes
    the traces' own difficulty from the comparison."""
    x, base = np.asarray(x, dtype=float), np.asarray(base, dtype=float)
    if x.ndim != 1 or x.shape != base.shape or len(x) == 0:
        raise ValueError(f"x and base must be (S,) values of the same seeds, got {x.shape} and {base.shape}")
    if np.any(base <= 0):
        raise ValueError(f"base must be positive, got {base.tolist()}")
    change = x / base - 1
    se = float(change.std(ddof=1) / np.sqrt(len(change))) if len(change) > 1 else float("nan")
    return Increase(float(change.mean()), se, tuple(change.tolist()))


def run_timed(engine: Engine) -> list[float]:
    """Step ``engine`` until every request has finished; returns each iteration's wall seconds."""
    seconds = []
    while engine.has_unfinished():
        t0 = time.perf_counter()
        engine.step()
        seconds.append(time.perf_counter() - t0)
    return seconds


def replay(engine: Engine, cost: LinearCost | UnitCost) -> ClusterResult:
    """``engine``'s requests (in the order they were added, all queued at time 0, request ids ``0, 1, ..``)
    served by one simulated instance with its pool and batch size and the step cost ``cost``."""
    trace = [SimRequest(i, 0.0, len(r.prompt), r.max_new_tokens) for i, r in enumerate(engine.requests.values())]
    pool = engine.pool
    return simulate(trace, 1, pool.num_blocks, cost=cost, block_size=pool.block_size,
                    max_batch_size=engine.max_batch_size, max_batched_tokens=engine.max_batched_tokens)  # fmt: skip
