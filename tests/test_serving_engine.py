"""Tests of refimpl.serving.engine: every request's greedy output equals the request decoded alone, for any
arrival pattern and batch mix, with preemption; blocks all free at the end; bad requests rejected without
disturbing the others; the per-row ``start_pos`` of the model's forward.

Most tests use a tiny random Llama in float64 (fast, and far from floating-point near-ties); one test runs
SmolLM2-135M itself (marked ``model``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.llm.config import LlamaConfig
from refimpl.llm.generate import generate_ids
from refimpl.llm.model import Llama, load_model
from refimpl.serving import Engine

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = LlamaConfig(
    n_layers=2,
    d_model=32,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
    ffn_dim=48,
    vocab_size=64,
    rope_base=10000.0,
    norm_eps=1e-5,
    max_seq_len=48,
    name="tiny",
)


@pytest.fixture(scope="module")
def tiny() -> Llama:
    gen = torch.Generator().manual_seed(0)
    c = TINY

    def w(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * shape[0] ** -0.5

    # strong attention and FFN outputs (gain 6) so the next token depends on the context and the position,
    # not only on the current token (whose tied embedding otherwise dominates the logits)
    blocks = [
        {
            "attn_norm": torch.ones(c.d_model, dtype=torch.float64),
            "wqkv": w(c.d_model, c.q_dim + 2 * c.kv_dim) * 2,
            "wo": w(c.q_dim, c.d_model) * 6,
            "ffn_norm": torch.ones(c.d_model, dtype=torch.float64),
            "w_gate_up": w(c.d_model, 2 * c.ffn_dim),
            "w_down": w(c.ffn_dim, c.d_model) * 6,
        }
        for _ in range(c.n_layers)
    ]
    head = w(c.d_model, c.vocab_size) * 4
    return Llama(c, head, torch.ones(c.d_model, dtype=torch.float64), blocks).double().eval()


def alone(model: Llama, prompt: list[int], max_new: int, stop_ids=()) -> list[int]:
    return generate_ids(model, prompt, max_new, stop_ids=stop_ids)


def serve(engine: Engine, arrivals: list[tuple[int, object, list[int], int]]) -> dict:
    """Add each request at its arrival step (requests arriving at the same step in list order), then run."""
    arrivals = sorted(arrivals, key=lambda a: a[0])
    step, i = 0, 0
    while i < len(arrivals) or engine.has_unfinished():
        while i < len(arrivals) and arrivals[i][0] <= step:
            _, rid, prompt, max_new = arrivals[i]
            engine.add_request(rid, prompt, max_new)
            i += 1
        engine.step()
        step += 1
        assert engine.pool.num_blocks - engine.pool.num_free_blocks <= engine.pool.num_blocks
        assert len(engine.running) <= engine.max_batch_size
    return {rid: engine.result(rid) for _, rid, _, _ in arrivals}


request = st.tuples(
    st.integers(0, 6),  # arrival step
    st.lists(st.integers(0, TINY.vocab_size - 1), min_size=1, max_size=9),  # prompt, after the common prefix
    st.integers(1, 10),  # max_new_tokens
)


@settings(max_examples=40, deadline=None)
@given(
    reqs=st.lists(request, min_size=1, max_size=6),
    block_size=st.integers(1, 5),
    spare_blocks=st.integers(0, 12),
    max_batch=st.integers(1, 4),
    policy=st.sampled_from(["continuous", "static"]),
    stop=st.booleans(),
    prefix=st.lists(st.integers(0, TINY.vocab_size - 1), max_size=8),
    share=st.booleans(),
    budget=st.one_of(st.none(), st.integers(1, 12)),
)
def test_outputs_equal_each_request_decoded_alone(
    tiny, reqs, block_size, spare_blocks, max_batch, policy, stop, prefix, share, budget
):
    """Any arrival pattern, batch size and pool size (down to the largest single request, which forces
    preemptions), prompts with a common prefix, shared or not, whole prompts batched into one forward or
    chunked under a token budget (mixed with decodes in one forward): each output equals the request decoded
    alone, and all blocks are free at the end."""
    stop_ids = (7,) if stop else ()
    reqs = [(t, prefix + p, n) for t, p, n in reqs]
    largest = max(-(-(len(p) + n - 1) // block_size) for _, p, n in reqs)
    engine = Engine(
        tiny, largest + spare_blocks, block_size, max_batch, stop_ids=stop_ids, policy=policy, share_prefixes=share,
        max_batched_tokens=budget,
    )  # fmt: skip
    arrivals = [(t, f"r{i}", p, n) for i, (t, p, n) in enumerate(reqs)]
    got = serve(engine, arrivals)
    for _, rid, prompt, max_new in arrivals:
        assert got[rid] == alone(tiny, prompt, max_new, stop_ids), rid
    assert engine.pool.num_free_blocks == engine.pool.num_blocks and not engine.pool.tables
    assert engine.peak_blocks <= engine.pool.num_blocks


def test_preemption_by_recompute_keeps_outputs(tiny):
    """A pool too small for three long requests at once: sequences are preempted and resumed, outputs hold."""
    prompts = [[1, 2, 3, 4, 5, 6], [9, 8, 7], [11, 12, 13, 14]]
    engine = Engine(tiny, num_blocks=6, block_size=4, max_batch_size=3)
    for i, p in enumerate(prompts):
        engine.add_request(i, p, 16)
    out = engine.run()
    assert engine.preemptions > 0, "the pool was sized to force preemptions"
    assert any(engine.requests[i].preemptions for i in range(3))
    for r in engine.requests.values():  # one emission time per token, in order, the first one the TTFT's
        assert len(r.token_times) == len(r.output) and r.token_times == sorted(r.token_times)
        assert r.token_times[0] == r.first_token_time and r.token_times[-1] <= r.finish_time
    for i, p in enumerate(prompts):
        assert out[i] == alone(tiny, p, 16)
    assert engine.pool.num_free_blocks == 6


def test_shared_prefixes_save_blocks_and_keep_outputs(tiny):
    """Four requests with a common 16-token system prompt, the first a step ahead of the others: with sharing,
    later requests fork the first one's cached blocks, the pool's peak use drops, and every output is
    unchanged."""
    system = [(7 * i) % 64 for i in range(16)]
    prompts = [system + [40 + i, 41 + i] for i in range(4)]
    peaks, outs = {}, {}
    for share in (False, True):
        engine = Engine(tiny, num_blocks=40, block_size=4, max_batch_size=4, share_prefixes=share)
        outs[share] = serve(engine, [(min(i, 1), i, p, 6) for i, p in enumerate(prompts)])
        peaks[share] = engine.peak_blocks
        assert engine.pool.num_free_blocks == 40
        assert (engine.prefix_tokens_shared > 0) == share
    assert outs[True] == outs[False] == {i: alone(tiny, p, 6) for i, p in enumerate(prompts)}
    assert peaks[True] < peaks[False], peaks


def test_continuous_batching_runs_fewer_steps_than_static(tiny):
    """Mixed output lengths: continuous batching refills the slots of short requests, so it needs fewer
    iterations than static batching for the same outputs."""
    lengths = [2, 20, 3, 18, 2, 19, 4, 17]
    results = {}
    for policy in ("continuous", "static"):
        engine = Engine(tiny, num_blocks=64, block_size=4, max_batch_size=4, policy=policy)
        for i, n in enumerate(lengths):
            engine.add_request(i, [i + 1, 2 * i + 3], n)
        results[policy] = (engine.run(), engine.steps)
    assert results["continuous"][0] == results["static"][0]
    assert results["continuous"][1] < results["static"][1], results


def test_one_forward_per_step_and_chunks_within_the_budget(tiny):
    """Batched prefill: the prompts admitted in a step and the running decodes share one forward; under a token
    budget (Sarathi's chunked prefill) no forward holds more tokens than the budget, decodes are never
    starved, and a long prompt is spread over several steps."""
    calls = []
    hidden = tiny.hidden

    def counting(ids, *args, **kwargs):
        calls.append(ids.shape[1])
        return hidden(ids, *args, **kwargs)

    prompts = [[1 + i, 2, 3, 4, 5, 6, 7, 8, 9, 10][: 3 + 2 * i] for i in range(4)]
    outs = {}
    for budget in (None, 4):
        calls.clear()
        engine = Engine(tiny, num_blocks=32, block_size=4, max_batch_size=4, max_batched_tokens=budget)
        tiny.hidden = counting
        try:
            for i, p in enumerate(prompts):
                engine.add_request(i, p, 5)
            outs[budget] = engine.run()
        finally:
            del tiny.hidden
        assert len(calls) == engine.steps, "one forward per iteration"
        if budget is None:
            assert calls[0] == sum(map(len, prompts)), "all four prompts prefilled in the first forward"
        else:
            assert max(calls) <= budget and engine.steps > 5 + 1, calls
    assert outs[None] == outs[4] == {i: alone(tiny, p, 5) for i, p in enumerate(prompts)}
    with pytest.raises(ValueError, match="max_batched_tokens"):
        Engine(tiny, 4, max_batched_tokens=0)


def test_bad_requests_are_rejected_and_the_batch_is_unaffected(tiny):
    engine = Engine(tiny, num_blocks=8, block_size=4, max_batch_size=4)
    engine.add_request("a", [1, 2, 3], 6)
    engine.step()
    with pytest.raises(ValueError, match="empty prompt"):
        engine.add_request("bad", [], 4)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 64\), got 64"):
        engine.add_request("bad", [1, 64], 4)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 64\), got -1"):
        engine.add_request("bad", [-1], 4)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len=48"):
        engine.add_request("bad", [1, 2], 47)
    with pytest.raises(ValueError, match="exceed the pool's capacity of 32 tokens"):
        engine.add_request("bad", [1, 2], 40)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.add_request("bad", [1, 2], 0)
    with pytest.raises(ValueError, match="'a' is already in use"):
        engine.add_request("a", [1], 1)
    with pytest.raises(KeyError, match="unknown request_id 'nope'"):
        engine.result("nope")
    with pytest.raises(RuntimeError, match="has not finished"):
        engine.result("a")
    engine.add_request("b", [5, 6], 5)
    out = engine.run()
    assert set(out) == {"a", "b"}  # no trace of the rejected requests
    assert out["a"] == alone(tiny, [1, 2, 3], 6) and out["b"] == alone(tiny, [5, 6], 5)
    assert engine.pool.num_free_blocks == 8
    with pytest.raises(ValueError, match="policy"):
        Engine(tiny, 4, policy="fifo")


def test_forward_with_per_row_start_pos_equals_rows_alone(tiny):
    """The model's forward with ``start_pos`` a (B,) tensor (cache-less path): row b equals the row alone."""
    ids = torch.tensor([[3, 4, 5], [6, 7, 8]])
    start = torch.tensor([0, 5])
    got = tiny(ids, start_pos=start)
    for b in range(2):
        torch.testing.assert_close(got[b : b + 1], tiny(ids[b : b + 1], start_pos=int(start[b])))
    with pytest.raises(ValueError, match="one position per row"):
        tiny(ids, start_pos=torch.tensor([0]))
    with pytest.raises(ValueError, match="start_pos must be >= 0"):
        tiny(ids, start_pos=torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
        tiny(ids, start_pos=torch.tensor([0, 46]))


@pytest.mark.model
def test_smollm2_outputs_equal_each_request_decoded_alone():
    """The real model (float32): three requests of mixed lengths arriving at different steps, batched with
    per-row positions over the paged cache, give the outputs of each decoded alone."""
    model, tok = load_model()
    prompts = [tok.encode(t) for t in ("def fibonacci(n):", "The capital of France is", "1, 2, 3, 4,")]
    engine = Engine(model, num_blocks=16, block_size=4, max_batch_size=3, stop_ids=tok.stop_ids)
    arrivals = [(0, 0, prompts[0], 8), (1, 1, prompts[1], 3), (2, 2, prompts[2], 6)]
    got = serve(engine, arrivals)
    for _, rid, prompt, n in arrivals:
        assert got[rid] == alone(model, prompt, n, tok.stop_ids), rid
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


def test_tiny_model_outputs_depend_on_context(tiny):
    """Guard of the tests above: the tiny model's greedy outputs change within a sequence and between
    prompts, so equal outputs are evidence (a model that repeats its input token would make them vacuous)."""
    outs = [alone(tiny, p, 14) for p in ([1, 2, 3], [5], [9, 9, 9, 9])]
    assert all(len(set(o)) >= 3 for o in outs), outs
    assert len({tuple(o) for o in outs}) == 3


@pytest.mark.model
def test_benchmark_quick_prints_numbers(run_benchmark):
    positive = ("continuous_vs_static_throughput", "static_tokens_per_s", "continuous_ttft_p99_s")
    _, values = run_benchmark("bench_serving", ["--quick"], positive=positive)
    assert values["outputs_identical"] == "1"
    assert 0 <= float(values["paged_memory_waste"]) < 1
    assert 0 <= float(values["simulator_latency_error"]) < 1
