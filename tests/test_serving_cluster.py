"""Tests of refimpl.serving.cluster: the simulated instance makes the real Engine's decisions step for step
(admissions, preemptions, completions) on the same trace with unit steps; determinism by seed; conservation
(every request completes exactly once, blocks within capacity, none left held); the dispatch policies on
hand-made cases; migration; bad inputs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.serving import Engine
from refimpl.serving.cluster import (
    POLICIES,
    Instance,
    LinearCost,
    SimRequest,
    StepLog,
    UnitCost,
    load_sweep,
    paired_change,
    poisson_workload,
    policy_sweep,
    replay,
    run_timed,
    simulate,
)
from tests.test_serving_engine import TINY, tiny  # noqa: F401  (the fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


class LoggingEngine(Engine):
    """The real Engine, recording what each step admitted, preempted and finished."""

    def step(self):
        before = {r.request_id: r.preemptions for r in self.requests.values()}
        self._admitted: list = []
        done = super().step()
        preempted = [rid for rid, r in self.requests.items() if r.preemptions > before[rid]]
        self.log.append((self._admitted, sorted(preempted), [r.request_id for r in done]))
        return done

    def _admit(self, budget):
        admitted = super()._admit(budget)
        self._admitted = [r.request_id for r in admitted]
        return admitted


def engine_log(model, trace, num_blocks, block_size, batch, budget=None):
    eng = LoggingEngine(
        model, num_blocks=num_blocks, block_size=block_size, max_batch_size=batch, max_batched_tokens=budget
    )
    eng.log = []
    for i, (p, n) in enumerate(trace):
        eng.add_request(i, [(7 * i + j) % TINY.vocab_size for j in range(p)], n)
    eng.run()
    assert eng.pool.num_free_blocks == num_blocks
    return eng.log


def sim_log(trace, num_blocks, block_size, batch, budget=None):
    reqs = [SimRequest(i, 0.0, p, n) for i, (p, n) in enumerate(trace)]
    res = simulate(
        reqs, 1, num_blocks, cost=UnitCost(), block_size=block_size, max_batch_size=batch, max_batched_tokens=budget
    )
    return [(s.admitted, sorted(s.preempted), s.finished) for s in res.instances[0].log], res


@pytest.mark.parametrize("budget", [None, 3])
def test_simulator_matches_engine_with_preemption(tiny, budget):  # noqa: F811
    trace = [(5, 12), (3, 14), (6, 4), (2, 16), (4, 3)]
    log = engine_log(tiny, trace, num_blocks=7, block_size=4, batch=3, budget=budget)
    slog, res = sim_log(trace, 7, 4, 3, budget)
    assert slog == log
    assert sum(len(p) for _, p, _ in log) > 0, "the trace must exercise preemption"
    assert res.makespan == len(log)  # unit steps


def test_chunked_prefill_delays_the_first_token_and_keeps_decodes_going():
    # a 10-token prompt under a budget of 4, beside a request that decodes one token per step (1 of the 4):
    # chunks of 3, 3, 3, then its last prompt token goes like a decode token, and its first token comes then
    reqs = [SimRequest(0, 0.0, 2, 8), SimRequest(1, 0.5, 10, 2)]
    res = simulate(reqs, 1, 16, cost=UnitCost(), block_size=4, max_batched_tokens=4)
    log = res.instances[0].log
    assert [s.prefill_tokens for s in log[:5]] == [2, 3, 3, 3, 0]
    assert [s.n_decode for s in log[:5]] == [0, 1, 1, 1, 2]
    assert res.requests[1].first_token_time == 5.0
    whole = simulate(reqs, 1, 16, cost=UnitCost(), block_size=4)
    assert whole.requests[1].first_token_time == 2.0


@settings(max_examples=30, deadline=None)
@given(
    trace=st.lists(st.tuples(st.integers(1, 8), st.integers(1, 12)), min_size=1, max_size=6),
    num_blocks=st.integers(6, 12),
    batch=st.integers(1, 4),
    budget=st.one_of(st.none(), st.integers(1, 10)),
)
def test_simulator_matches_engine_property(tiny, trace, num_blocks, batch, budget):  # noqa: F811
    """Whole prompts or chunked prefill under a token budget: the same admissions, preemptions and
    completions at the same steps."""
    trace = [(p, n) for p, n in trace if -(-(p + n - 1) // 4) <= num_blocks]
    if not trace:
        return
    assert sim_log(trace, num_blocks, 4, batch, budget)[0] == engine_log(tiny, trace, num_blocks, 4, batch, budget)


def test_workload_deterministic_and_heavy_tailed():
    a, b = poisson_workload(2000, 10.0, 3), poisson_workload(2000, 10.0, 3)
    assert [(r.arrival_time, r.prompt_len, r.output_len) for r in a] == [
        (r.arrival_time, r.prompt_len, r.output_len) for r in b
    ]
    assert poisson_workload(50, 10.0, 4)[0].arrival_time != a[0].arrival_time
    gaps = np.diff([0.0] + [r.arrival_time for r in a])
    assert abs(gaps.mean() - 0.1) < 0.01  # rate 10 per second
    out = np.array([r.output_len for r in a])
    assert np.median(out) < 0.6 * out.mean()  # heavy tail: the mean well above the median


@pytest.mark.parametrize("policy", POLICIES)
def test_simulate_deterministic_and_conserving(policy):
    reqs = poisson_workload(300, 50.0, 1)
    cost = LinearCost.from_roofline()
    a = simulate(reqs, 3, 400, policy=policy, cost=cost)
    b = simulate(reqs, 3, 400, policy=policy, cost=cost)
    assert a.summary() == b.summary()
    assert all(r.completions == 1 and r.generated == r.output_len for r in a.requests)
    assert all(r.arrival_time < r.first_token_time <= r.finish_time for r in a.requests)
    for inst in a.instances:
        assert inst.peak_blocks <= inst.num_blocks
        assert not inst.held and not inst.running and not inst.waiting
    assert [r.output_len for r in reqs] == [r.output_len for r in a.requests]  # inputs untouched
    assert all(r.generated == 0 for r in reqs)


def test_round_robin_and_least_loaded_dispatch():
    # a long request, then four short ones at once: round-robin alternates; least-loaded avoids the long one
    reqs = [SimRequest(0, 0.0, 64, 200)] + [SimRequest(i, 0.5, 4, 2) for i in range(1, 5)]
    rr = simulate(reqs, 2, 80, policy="round_robin", cost=UnitCost(), block_size=4)
    ll = simulate(reqs, 2, 80, policy="least_loaded", cost=UnitCost(), block_size=4)
    served = {
        p: [sorted(x for s in i.log for x in s.admitted) for i in r.instances] for p, r in (("rr", rr), ("ll", ll))
    }
    assert served["rr"] == [[0, 2, 4], [1, 3]]
    assert served["ll"] == [[0], [1, 2, 3, 4]]


def test_freeness_counts_the_queue_head():
    inst = Instance(0, num_blocks=20, block_size=4, max_batch_size=8)
    assert inst.freeness() == 20
    inst.running = [SimRequest(0, 0.0, 8, 4), SimRequest(1, 0.0, 8, 4)]
    inst.held = {0: 4, 1: 6}
    assert inst.freeness() == (20 - 10) / 2
    inst.waiting.append(SimRequest(2, 0.0, 17, 4))  # 5 blocks
    assert inst.freeness() == (20 - 10 - 5) / 2


def test_migration_moves_blocks_between_instances():
    # A and C (long) land on instance 0, B (short) on instance 1 and finishes at once; as A and C grow,
    # instance 0's freeness drops and Llumnix moves one of them to the idle instance 1: no preemption, while
    # least-loaded dispatch (same placement, no migration) must preempt
    reqs = [SimRequest(0, 0.0, 8, 120), SimRequest(1, 0.0, 8, 2), SimRequest(2, 0.5, 8, 120)]
    kw = {"cost": UnitCost(migration_time=3.0), "block_size": 4}
    res = simulate(reqs, 2, 40, policy="llumnix", migrate_interval=1.0, migrate_low=3.0, migrate_high=5.0, **kw)
    ref = simulate(reqs, 2, 40, policy="least_loaded", **kw)
    assert [sorted({x for s in i.log for x in s.admitted}) for i in ref.instances] == [[0, 2], [1]]
    assert ref.preemptions > 0
    assert res.migrations == 1 and res.preemptions == 0
    assert sum(r.migrations for r in res.requests) == 1
    assert all(r.completions == 1 for r in res.requests)
    assert all(not i.held for i in res.instances)
    assert res.latency().max() < ref.latency().max()


def test_roofline_cost_matches_analyzer():
    from refimpl.roofline import Workload, analyze

    cost = LinearCost.from_roofline("llama-2-7b", "a100-80gb")
    for b, s in ((1, 256), (8, 1024), (64, 512)):
        exact = analyze("llama-2-7b", "a100-80gb", Workload(stage="decode", batch=b, seq=s)).time
        assert cost.step_time(0, b, b * s) == pytest.approx(exact, rel=0.02)
    assert cost.migration_seconds(1000) == pytest.approx(1000 * cost.kv_bytes_per_token / cost.link_bandwidth)


def test_bad_inputs():
    ok = [SimRequest(0, 0.0, 4, 4)]
    with pytest.raises(ValueError, match="policy"):
        simulate(ok, 1, 8, policy="random", cost=UnitCost())
    with pytest.raises(ValueError, match="n_instances"):
        simulate(ok, 0, 8, cost=UnitCost())
    with pytest.raises(ValueError, match="num_blocks"):
        simulate(ok, 1, 0, cost=UnitCost())
    with pytest.raises(ValueError, match="distinct request_id"):
        simulate(ok + ok, 1, 8, cost=UnitCost())
    with pytest.raises(ValueError, match="output_len"):
        simulate([SimRequest(0, 0.0, 4, 0)], 1, 8, cost=UnitCost())
    with pytest.raises(ValueError, match="exceed an instance"):
        simulate([SimRequest(0, 0.0, 100, 100)], 1, 8, cost=UnitCost(), block_size=4)
    with pytest.raises(ValueError, match="rate"):
        poisson_workload(10, 0.0, 0)
    with pytest.raises(ValueError, match="alpha"):
        poisson_workload(10, 1.0, 0, alpha=1.0)


def test_benchmark_quick_prints_numbers(run_benchmark):
    positive = ("migration_p99_vs_round_robin", "migration_ttft_p99_vs_least_loaded", "llumnix_throughput")
    _, values = run_benchmark("bench_cluster", ["--quick"], positive=positive)
    assert float(values["round_robin_migrations"]) == 0
    for key in (
        "sweep_25_llumnix_fragmentation",
        "sweep_75_round_robin_tpot_p99",
        "sweep_75_migration_ttft_p99_vs_round_robin_se",
    ):
        assert 0 <= float(values[key]) < 1, key


def test_linear_cost_fit_recovers_coefficients():
    rng = np.random.default_rng(0)
    steps = [
        StepLog(prefill_tokens=int(p), n_decode=int(d), kv_tokens=int(k)) for p, d, k in rng.integers(0, 200, (30, 3))
    ]
    true = LinearCost(0.01, 0.002, 1e-5, 3e-4)
    fitted = LinearCost.fit(steps, [true.step_time(s.prefill_tokens, s.n_decode, s.kv_tokens) for s in steps])
    for name in ("t_weights", "t_seq", "t_kv", "t_prefill"):
        assert getattr(fitted, name) == pytest.approx(getattr(true, name), rel=1e-6), name
    with pytest.raises(ValueError, match="at least 4 steps"):
        LinearCost.fit(steps[:3], [1.0] * 3)
    with pytest.raises(ValueError, match="t_kv must be >= 0.0, got -1.0"):
        LinearCost(0.0, 0.0, -1.0, 0.0)
    with pytest.raises(ValueError, match="link_bandwidth must be > 0.0, got 0.0"):
        LinearCost(0.0, 0.0, 0.0, 0.0, link_bandwidth=0.0)
    with pytest.raises(ValueError, match="kv_bytes_per_token must be >= 0.0"):
        LinearCost(0.0, 0.0, 0.0, 0.0, kv_bytes_per_token=-2.0)
    with pytest.raises(TypeError):
        LinearCost(0.0, 0.0, 0.0, 0.0, 2.0)  # kv_bytes_per_token and link_bandwidth are keyword-only


def test_linear_cost_is_a_frozen_value():
    cost = LinearCost(1, 0.5, 0.0, 2, link_bandwidth=4)
    assert (cost.t_weights, cost.link_bandwidth) == (1.0, 4.0) and isinstance(cost.t_weights, float)
    assert cost == LinearCost(1.0, 0.5, 0.0, 2.0, link_bandwidth=4.0) and "t_prefill=2.0" in repr(cost)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cost.t_kv = 1.0
    with pytest.raises(ValueError, match="t_seq must be >= 0.0"):
        dataclasses.replace(cost, t_seq=-0.1)  # replace validates again
    assert cost.step_time(3, 2, 10) == 1.0 + 2 * 0.5 + 3 * 2.0 and cost.migration_seconds(8) == 2.0


def test_run_timed_and_replay(tiny):  # noqa: F811
    eng = Engine(tiny, num_blocks=7, block_size=4, max_batch_size=3)
    for i, (p, n) in enumerate([(5, 12), (3, 14), (6, 4), (2, 16)]):
        eng.add_request(f"r{i}", list(range(1, p + 1)), n)
    seconds = run_timed(eng)
    assert len(seconds) == eng.steps and all(s > 0 for s in seconds)
    res = replay(eng, UnitCost())
    assert res.makespan == eng.steps and res.preemptions == eng.preemptions > 0
    fitted = LinearCost.fit(res.instances[0].log, seconds)
    assert fitted.step_time(4, 2, 20) > 0


@settings(max_examples=40, deadline=None)
@given(
    reqs=st.lists(
        st.tuples(st.floats(0, 20, allow_nan=False), st.integers(1, 30), st.integers(1, 30)), min_size=1, max_size=12
    ),
    n_instances=st.integers(1, 3),
    num_blocks=st.integers(16, 30),
    batch=st.integers(1, 5),
    policy=st.sampled_from(POLICIES),
)
def test_conservation_property(reqs, n_instances, num_blocks, batch, policy):
    trace = [SimRequest(i, a, p, n) for i, (a, p, n) in enumerate(reqs)]
    res = simulate(
        trace, n_instances, num_blocks, policy=policy, cost=UnitCost(migration_time=1.5), block_size=4,
        max_batch_size=batch, migrate_interval=1.0, migrate_low=4.0, migrate_high=6.0,
    )  # fmt: skip
    assert all(r.completions == 1 and r.generated == r.output_len for r in res.requests)
    assert all(r.arrival_time < r.first_token_time <= r.finish_time for r in res.requests)
    assert sum(r.migrations for r in res.requests) == res.migrations
    for inst in res.instances:
        assert inst.peak_blocks <= inst.num_blocks and not inst.held and not inst.running and not inst.waiting
    finished = sorted(x for inst in res.instances for s in inst.log for x in s.finished)
    assert finished == list(range(len(trace))), "every request finishes exactly once, on one instance"


def test_tpot_and_fragmentation_on_hand_made_cases():
    # one request alone on one instance with unit steps: first token after step 1, one token per step after
    res = simulate([SimRequest(0, 0.0, 4, 5)], 1, 8, cost=UnitCost(), block_size=4)
    assert res.tpot().tolist() == [1.0] and res.ttft().tolist() == [1.0] and res.fragmentation == 0.0
    # round-robin puts a second long request (8 blocks + 1 per running) behind a half-full instance (8 of 16
    # blocks free) while the other holds 1 block: the fourth arrival finds 15 of the 23 free blocks stranded
    reqs = [SimRequest(0, 0.0, 30, 20), SimRequest(1, 0.1, 4, 2), SimRequest(2, 0.2, 30, 2), SimRequest(3, 0.3, 4, 1)]
    rr = simulate(reqs, 2, 16, policy="round_robin", cost=UnitCost(), block_size=4)
    ll = simulate(reqs, 2, 16, policy="least_loaded", cost=UnitCost(), block_size=4)
    assert rr.fragmentation == (15 / 23) / 4 and ll.fragmentation == 0.0, (rr.fragmentation, ll.fragmentation)
    assert set(rr.summary()) >= {"tpot_p50", "tpot_p99", "fragmentation", "ttft_p99", "preemptions"}


def test_load_sweep_stacks_policy_sweeps_and_paired_change():
    cost = LinearCost.from_roofline()
    sweep = load_sweep([20.0, 40.0], [0, 1], 40, 2, 300, cost)
    for p in POLICIES:
        assert sweep[p]["ttft_p99"].shape == (2, 2)
    one = policy_sweep([0, 1], 40, 40.0, 2, 300, cost)
    for p in POLICIES:
        np.testing.assert_array_equal(sweep[p]["fragmentation"][1], one[p]["fragmentation"])
    inc = paired_change(np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 2.0]))
    assert inc.mean == 0.0 and inc.per_slice == (-0.5, 0.0, 0.5) and abs(inc.se - 0.5 / np.sqrt(3)) < 1e-12
    assert not inc.beyond() and paired_change(np.array([1.0, 1.1]), np.array([2.0, 2.0])).beyond()
    with pytest.raises(ValueError, match="base must be positive"):
        paired_change(np.array([1.0]), np.array([0.0]))
    with pytest.raises(ValueError, match="same seeds"):
        paired_change(np.array([1.0, 2.0]), np.array([1.0]))
    with pytest.raises(ValueError, match="rates"):
        load_sweep([], [0], 10, 1, 100, cost)
