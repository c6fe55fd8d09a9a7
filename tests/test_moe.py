"""Tests of refimpl.moe: routers, capacity and dropping, losses, the three dispatch paths, the layer, training,
and the benchmark's output format. Expert parallelism across processes is in test_moe_parallel.py."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.moe import (
    Routing,
    TopKGate,
    apply_capacity,
    dense_dispatch_bytes,
    dense_dispatch_tensors,
    expert_capacity,
    expert_choice,
    expert_fractions,
    grouped_matmul,
    grouped_mm_supported,
    grouped_top_k_gating,
    imbalance_score,
    load_balancing_loss,
    moe_dense,
    moe_gather_loop,
    moe_masked_loop,
    moe_sorted,
    null_expert_gating,
    queue_positions,
    router_z_loss,
    top_k_gating,
)
from refimpl.moe.layer import MoELayer
from refimpl.moe.train import ClusterTask, TrainConfig, train_moe

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _choose(max_n: int) -> st.SearchStrategy[tuple[int, int]]:
    """``(n, k)`` with ``1 <= k <= n <= max_n``: ``k`` experts chosen out of ``n`` (top-k of ``e``, or the experts
    a token takes in each group of ``size``)."""
    return st.integers(1, max_n).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n)))


def _problem(n: int, e: int, d: int = 4, h: int = 8, seed: int = 0, dtype: torch.dtype = F64):
    g = _gen(seed)
    x = torch.randn(n, d, generator=g, dtype=F64).to(dtype)
    w1 = torch.randn(e, d, h, generator=g, dtype=F64).to(dtype)
    w2 = torch.randn(e, h, d, generator=g, dtype=F64).to(dtype)
    logits = torch.randn(n, e, generator=g, dtype=F64).to(dtype)
    return x, w1, w2, logits


def _naive_moe(x: torch.Tensor, routing: Routing, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Independent reference: one Python iteration per assignment, y[t] += w * FFN_e(x[t])."""
    y = torch.zeros_like(x)
    for t, e, w in zip(routing.token.tolist(), routing.expert.tolist(), routing.weight.tolist()):
        y[t] += w * (F.gelu(x[t] @ w1[e]) @ w2[e])
    return y


def _naive_positions(expert: list[int]) -> list[int]:
    seen: dict[int, int] = {}
    out = []
    for e in expert:
        out.append(seen.get(e, 0))
        seen[e] = seen.get(e, 0) + 1
    return out


# ----------------------------------------------------------------------------------------------------------
# Top-k gating


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_gates_sum_to_one_over_chosen_experts(k: int) -> None:
    _, _, _, logits = _problem(30, 6, seed=k)
    gate = top_k_gating(logits, k, normalize=True)
    torch.testing.assert_close(gate.gate.sum(-1), torch.ones(30, dtype=F64))
    assert gate.index.shape == (30, k) and gate.probs.shape == (30, 6)


def test_top_k_matches_naive_sort_and_raw_probs() -> None:
    _, _, _, logits = _problem(20, 7, seed=1)
    gate = top_k_gating(logits, 3, normalize=False)
    probs = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    for n in range(20):
        ranked = sorted(range(7), key=lambda i: -probs[n, i].item())[:3]
        assert gate.index[n].tolist() == ranked
        torch.testing.assert_close(gate.gate[n], probs[n, ranked])


def test_routing_is_rank_major() -> None:
    """All 1st choices come before any 2nd choice, each rank in token order (the priority rule)."""
    _, _, _, logits = _problem(5, 4, seed=2)
    gate = top_k_gating(logits, 2)
    routing = gate.routing()
    assert routing.token.tolist() == [0, 1, 2, 3, 4] * 2
    assert routing.expert.tolist() == gate.index[:, 0].tolist() + gate.index[:, 1].tolist()


# ----------------------------------------------------------------------------------------------------------
# Capacity and dropping


@pytest.mark.parametrize(
    ("n", "e", "k", "cf"), [(8192, 64, 2, 1.0), (50, 10, 2, 1.1), (7, 3, 1, 0.5), (0, 4, 1, 2.0), (1, 1, 1, 0.01)]
)
def test_expert_capacity_formula(n: int, e: int, k: int, cf: float) -> None:
    expected = math.ceil(Fraction(str(cf)) * n * k / e)  # exact rational arithmetic
    assert expert_capacity(n, e, k, cf) == expected


def test_queue_positions_match_naive() -> None:
    expert = torch.randint(0, 5, (200,), generator=_gen(3))
    assert queue_positions(expert, 5).tolist() == _naive_positions(expert.tolist())


def test_first_choices_win_over_second_choices() -> None:
    # Token 0's 2nd choice and token 3's 1st choice are both expert 2; capacity 1 keeps the 1st choice.
    index = torch.tensor([[0, 2], [1, 0], [1, 3], [2, 1]])
    routing = TopKGate(torch.full((4, 4), 0.25), index, torch.full((4, 2), 0.5)).routing()
    kept, dropped = apply_capacity(routing, 1)
    pairs = set(zip(kept.token.tolist(), kept.expert.tolist()))
    assert (3, 2) in pairs and (0, 2) not in pairs
    # Queue of expert 1: token 1 (1st), token 2 (1st), token 3 (2nd); only token 1 fits.
    assert pairs == {(0, 0), (1, 1), (3, 2), (2, 3)}
    assert dropped.tolist() == [1, 2, 1, 0]


@settings(max_examples=40, deadline=None)
@given(
    ek=_choose(8),
    n=st.integers(0, 40),
    cf=st.floats(0.05, 3.0),
    seed=st.integers(0, 2**16),
)
def test_dropped_count_is_overflow_and_kept_are_queue_heads(ek: tuple[int, int], n: int, cf: float, seed: int) -> None:
    e, k = ek
    logits = torch.randn(n, e, generator=_gen(seed))
    routing = top_k_gating(logits, k).routing()
    capacity = expert_capacity(n, e, k, cf)
    kept, dropped = apply_capacity(routing, capacity)
    counts = routing.tokens_per_expert()
    assert dropped.tolist() == [max(0, c - capacity) for c in counts.tolist()]
    assert kept.tokens_per_expert().tolist() == [min(c, capacity) for c in counts.tolist()]
    # Kept = the first `capacity` assignments of each expert in priority order (naive scan).
    pos = _naive_positions(routing.expert.tolist())
    expected = [(t, x) for t, x, p in zip(routing.token.tolist(), routing.expert.tolist(), pos) if p < capacity]
    assert list(zip(kept.token.tolist(), kept.expert.tolist())) == expected


# ----------------------------------------------------------------------------------------------------------
# Expert choice, AdaMoE null experts, MoGE grouped top-k


@settings(max_examples=30, deadline=None)
@given(e=st.integers(1, 8), n=st.integers(1, 40), cf=st.floats(0.1, 4.0), seed=st.integers(0, 2**16))
def test_expert_choice_gives_each_expert_its_quota(e: int, n: int, cf: float, seed: int) -> None:
    logits = torch.randn(n, e, generator=_gen(seed), dtype=F64)
    routing = expert_choice(logits, cf)
    quota = min(math.ceil(Fraction(str(cf)) * n / e), n)
    assert routing.tokens_per_expert().tolist() == [quota] * e
    scores = torch.softmax(logits, -1)
    for i in range(e):
        mine = routing.expert == i
        assert len(set(routing.token[mine].tolist())) == quota  # distinct tokens
        top = sorted(scores[:, i].tolist(), reverse=True)[:quota]  # the expert's top scores
        torch.testing.assert_close(sorted(routing.weight[mine].tolist(), reverse=True), top)


def test_null_experts_only_gives_zero_expert_output_and_identity_layer() -> None:
    x, w1, w2, _ = _problem(6, 3, seed=13)
    logits = torch.zeros(6, 5, dtype=F64)  # 3 real experts, then 2 null experts
    logits[:3, 3:] = 10.0  # tokens 0..2 choose only null experts
    logits[3:, :2] = 10.0  # tokens 3..5 choose real experts 0 and 1
    _, routing = null_expert_gating(logits, 2, 2)
    assert set(routing.token.tolist()) == {3, 4, 5} and int(routing.expert.max()) < 3
    y = moe_sorted(x, routing, w1, w2)
    assert torch.equal(y[:3], torch.zeros(3, 4, dtype=F64))
    assert torch.all(y[3:].abs().sum(-1) > 0)
    torch.testing.assert_close(y, _naive_moe(x, routing, w1, w2))
    # Through the layer: a router that sends every token to the null experts leaves x unchanged.
    layer = MoELayer(4, 8, 3, router="null", k=2, n_null=2).double()
    with torch.no_grad():
        layer.norm.weight.zero_()
        layer.norm.bias.fill_(1.0)  # u = LayerNorm(x) = 1 for every token
        layer.router.weight.zero_()
        layer.router.weight[3:] = 1.0  # null logits 4, real logits 0
    x = torch.randn(5, 4, dtype=F64)
    out, aux = layer(x)
    assert aux.routing.n_assignments == 0 and aux.real_per_token == 0.0
    assert torch.equal(out, x)


def test_null_expert_real_gates_renormalized() -> None:
    logits = torch.randn(50, 6, generator=_gen(4))
    gate, routing = null_expert_gating(logits, 3, 2)
    per_token = torch.zeros(50).index_add(0, routing.token, routing.weight)
    has_real = (gate.index < 4).any(-1)
    torch.testing.assert_close(per_token[has_real], torch.ones(int(has_real.sum())))
    assert torch.all(per_token[~has_real] == 0)
    assert routing.n_assignments == int((gate.index < 4).sum())


@settings(max_examples=30, deadline=None)
@given(
    groups=st.integers(1, 4),
    size_per=_choose(4),
    n=st.integers(0, 30),
    seed=st.integers(0, 999),
)
def test_moge_same_count_per_group(groups: int, size_per: tuple[int, int], n: int, seed: int) -> None:
    size, per = size_per  # ``per`` of the ``size`` experts of each group
    e, k = groups * size, groups * per
    logits = torch.randn(n, e, generator=_gen(seed), dtype=F64)
    gate = grouped_top_k_gating(logits, k, groups)
    group_of = gate.index // size  # (N, k)
    for g in range(groups):
        assert torch.all((group_of == g).sum(-1) == per)  # every token: K' experts in every group
    probs = torch.softmax(logits, -1)  # global softmax
    for t in range(n):
        for g in range(groups):
            block = probs[t, g * size : (g + 1) * size].tolist()
            best = sorted(range(size), key=lambda i: -block[i])[:per]
            assert gate.index[t, g * per : (g + 1) * per].tolist() == [g * size + i for i in best]
    if n:
        assert imbalance_score(gate.index, e, groups, n) == 0.0


def test_imbalance_score_matches_definition() -> None:
    index = torch.randint(0, 8, (100, 2), generator=_gen(5))
    load = [sum(1 for x in index.flatten().tolist() if x // 2 == dev) for dev in range(4)]
    assert imbalance_score(index, 8, 4, 100) == (max(load) - min(load)) / 100


# ----------------------------------------------------------------------------------------------------------
# Losses


@pytest.mark.parametrize(("e", "k", "alpha"), [(4, 1, 0.01), (8, 2, 1.0), (6, 3, 0.5)])
def test_balancing_loss_is_alpha_under_uniform_routing(e: int, k: int, alpha: float) -> None:
    n = 4 * e
    probs = torch.full((n, e), 1.0 / e, dtype=F64)
    index = (torch.arange(n * k) % e).view(n, k)  # every expert gets exactly n k / e assignments
    assert load_balancing_loss(probs, index, alpha).item() == pytest.approx(alpha, rel=1e-12)


def test_balancing_loss_matches_naive_formula_and_grad_goes_through_probs() -> None:
    logits = torch.randn(40, 5, generator=_gen(6), dtype=F64, requires_grad=True)
    probs = torch.softmax(logits, -1)
    gate = top_k_gating(logits, 2)
    loss = load_balancing_loss(gate.probs, gate.index, 0.1)
    f = [sum(1 for x in gate.index.flatten().tolist() if x == i) / 80 for i in range(5)]
    p = probs.mean(0).tolist()
    assert loss.item() == pytest.approx(0.1 * 5 * sum(a * b for a, b in zip(f, p)), rel=1e-12)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    torch.testing.assert_close(expert_fractions(gate.index, 5), torch.tensor(f, dtype=torch.float32))


@settings(max_examples=30, deadline=None)
@given(e=st.integers(1, 10), seed=st.integers(0, 2**16))
def test_balancing_loss_with_f_equal_p_is_at_least_alpha(e: int, seed: int) -> None:
    """If choices follow the probabilities (f = P), E sum P_i^2 >= 1 (Cauchy-Schwarz), equality iff uniform."""
    p = torch.softmax(torch.randn(e, generator=_gen(seed), dtype=F64), 0)
    value = e * torch.sum(p * p).item()
    assert value >= 1.0 - 1e-12
    assert e * torch.sum(torch.full((e,), 1.0 / e, dtype=F64) ** 2).item() == pytest.approx(1.0)


def test_router_z_loss_matches_definition() -> None:
    logits = torch.randn(12, 5, generator=_gen(7), dtype=F64)
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 12
    assert router_z_loss(logits, 0.5).item() == pytest.approx(0.5 * expected, rel=1e-12)
    assert router_z_loss(10 * logits, 1.0) > router_z_loss(logits, 1.0)
    assert router_z_loss(torch.zeros(0, 5), 1.0).item() == 0.0


# ----------------------------------------------------------------------------------------------------------
# Dispatch: three paths (plus the gather loop) equal to an independent per-assignment reference


def _routings(logits: torch.Tensor, k: int, cf: float | None) -> list[tuple[Routing, int]]:
    """(routing, dense capacity) for top-k (dropping or not) and expert choice."""
    n, e = logits.shape
    routing = top_k_gating(logits, k).routing()
    out = [(routing, int(routing.tokens_per_expert().max()) if n else 0)]
    if cf is not None:
        cap = expert_capacity(n, e, k, cf)
        out.append((apply_capacity(routing, cap)[0], cap))
        if n:
            ec = expert_choice(logits, cf)
            out.append((ec, int(ec.tokens_per_expert().max())))
    return out


@settings(max_examples=30, deadline=None)
@given(
    ek=_choose(6),
    n=st.integers(0, 24),
    cf=st.one_of(st.none(), st.floats(0.2, 2.5)),
    seed=st.integers(0, 2**16),
)
def test_dispatch_paths_equal_reference(ek: tuple[int, int], n: int, cf: float | None, seed: int) -> None:
    e, k = ek
    x, w1, w2, logits = _problem(n, e, seed=seed)
    for routing, capacity in _routings(logits, k, cf):
        reference = _naive_moe(x, routing, w1, w2)
        torch.testing.assert_close(moe_masked_loop(x, routing, w1, w2), reference)
        torch.testing.assert_close(moe_gather_loop(x, routing, w1, w2), reference)
        torch.testing.assert_close(moe_dense(x, routing, w1, w2, capacity), reference)
        torch.testing.assert_close(moe_sorted(x, routing, w1, w2), reference)


def test_sorted_float32_grouped_mm_close_to_float64_reference() -> None:
    x, w1, w2, logits = _problem(300, 8, d=16, h=32, seed=8)
    routing = top_k_gating(logits, 2).routing()
    r32 = Routing(routing.token, routing.expert, routing.weight.float(), 300, 8)
    assert grouped_mm_supported(x.float(), w1.float())
    y = moe_sorted(x.float(), r32, w1.float(), w2.float(), impl="grouped_mm")
    torch.testing.assert_close(y.double(), moe_masked_loop(x, routing, w1, w2), rtol=1e-4, atol=1e-4)


def test_experts_with_zero_tokens() -> None:
    x, w1, w2, _ = _problem(10, 5, seed=9)
    logits = torch.full((10, 5), -10.0, dtype=F64)
    logits[:, 1] = 5.0  # every token picks expert 1 first, expert 0 second (ties broken by index)
    logits[:, 0] = 1.0
    routing = top_k_gating(logits, 2).routing()
    assert routing.tokens_per_expert().tolist() == [10, 10, 0, 0, 0]
    reference = _naive_moe(x, routing, w1, w2)
    for impl in ("loop",):
        torch.testing.assert_close(moe_sorted(x, routing, w1, w2, impl=impl), reference)
    torch.testing.assert_close(moe_dense(x, routing, w1, w2, 10), reference)
    xf, w1f, w2f = x.float(), w1.float(), w2.float()
    rf = Routing(routing.token, routing.expert, routing.weight.float(), 10, 5)
    torch.testing.assert_close(
        moe_sorted(xf, rf, w1f, w2f, impl="grouped_mm").double(), reference, rtol=1e-4, atol=1e-4
    )


def test_dense_dispatch_tensor_layout_and_bytes() -> None:
    _, _, _, logits = _problem(16, 4, seed=10)
    routing, _ = apply_capacity(top_k_gating(logits, 2).routing(), 6)
    dispatch, combine = dense_dispatch_tensors(routing, 6)
    assert dispatch.shape == combine.shape == (16, 4, 6)
    assert int(dispatch.sum()) == routing.n_assignments
    assert torch.all(dispatch.sum(0) <= 1)  # each (expert, slot) holds at most one token
    pairs = dispatch.sum(-1)  # (N, E): 1 where token n was kept for expert e
    for t, e in zip(routing.token.tolist(), routing.expert.tolist()):
        assert pairs[t, e] == 1
    torch.testing.assert_close(
        combine.sum((1, 2)), torch.zeros(16, dtype=F64).index_add(0, routing.token, routing.weight)
    )
    assert dense_dispatch_bytes(16, 4, 6, torch.float32) == dispatch.float().numel() * 4 == 16 * 4 * 6 * 4
    assert dense_dispatch_bytes(8192, 64, 256, torch.bfloat16) == 8192 * 64 * 256 * 2
    with pytest.raises(ValueError, match="capacity must be >="):
        dense_dispatch_tensors(top_k_gating(logits, 2).routing(), 1)


@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
def test_grouped_matmul_matches_naive_with_empty_groups(impl: str) -> None:
    counts = torch.tensor([3, 0, 5, 0, 2])
    a = torch.randn(10, 8, generator=_gen(11))
    b = torch.randn(5, 8, 4, generator=_gen(12))
    expected = torch.cat([a[0:3] @ b[0], a[3:8] @ b[2], a[8:10] @ b[4]])
    torch.testing.assert_close(grouped_matmul(a, b, counts, impl=impl), expected)


def test_grouped_matmul_backward_accepts_expanded_grad() -> None:
    counts = torch.tensor([4, 4])
    a = torch.randn(8, 8, requires_grad=True)
    b = torch.randn(2, 8, 4, requires_grad=True)
    grouped_matmul(a, b, counts, impl="grouped_mm").sum().backward()  # expanded (zero-stride) grad
    a2, b2 = a.detach().requires_grad_(), b.detach().requires_grad_()
    grouped_matmul(a2, b2, counts, impl="loop").sum().backward()
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


def test_grouped_matmul_rejects_unsupported_grouped_mm() -> None:
    with pytest.raises(ValueError, match="grouped_mm"):
        grouped_matmul(
            torch.randn(4, 3, dtype=F64), torch.randn(2, 3, 2, dtype=F64), torch.tensor([2, 2]), impl="grouped_mm"
        )


# ----------------------------------------------------------------------------------------------------------
# Gradients and the layer


@pytest.mark.parametrize("dispatch", ["gather_loop", "dense", "masked_loop"])
def test_gradients_equal_across_dispatch_paths(dispatch: str) -> None:
    torch.manual_seed(0)
    base = MoELayer(4, 8, 4, k=2, capacity_factor=1.0, alpha=0.01, z_coef=0.001).double()
    other = MoELayer(4, 8, 4, k=2, capacity_factor=1.0, alpha=0.01, z_coef=0.001, dispatch=dispatch).double()
    other.load_state_dict(base.state_dict())
    x = torch.randn(24, 4, dtype=F64)
    grads = []
    for layer in (base, other):
        out, aux = layer(x)
        (out.pow(2).sum() + aux.aux_loss).backward()
        grads.append({n: p.grad.clone() for n, p in layer.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)
    assert grads[0]["router.weight"].abs().sum() > 0  # gradient flows to the router


def test_router_gradient_from_task_loss_needs_unnormalized_top1() -> None:
    """Switch's k=1 keeps p_i(x) as the gate; normalizing it to 1 cuts the router off from the task loss."""
    torch.manual_seed(1)
    x = torch.randn(16, 4, dtype=F64)
    for normalize, flows in ((False, True), (True, False)):
        layer = MoELayer(4, 8, 4, k=1, normalize=normalize).double()
        out, _ = layer(x)
        out.pow(2).sum().backward()
        grad = layer.router.weight.grad.abs().max().item()
        assert grad > 1e-6 if flows else grad < 1e-12  # 1 = p / p holds up to round-off


def test_dropped_tokens_pass_through_residual() -> None:
    torch.manual_seed(2)
    layer = MoELayer(4, 8, 2, k=1, capacity_factor=0.25).double()
    x = torch.randn(16, 4, dtype=F64)
    out, aux = layer(x)
    capacity = expert_capacity(16, 2, 1, 0.25)
    assert aux.routing.tokens_per_expert().max() <= capacity
    assert aux.dropped == 16 - aux.routing.n_assignments > 0
    assert aux.requested == int(aux.requested_per_expert.sum()) == 16
    expected_kept = [min(n, capacity) for n in aux.requested_per_expert.tolist()]
    assert aux.tokens_per_expert.tolist() == expected_kept
    untouched = torch.ones(16, dtype=torch.bool)
    untouched[aux.routing.token] = False
    assert torch.equal(out[untouched], x[untouched])
    assert not torch.allclose(out[~untouched], x[~untouched])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(router="top_k", k=2, capacity_factor=1.25),
        dict(router="expert_choice", capacity_factor=2.0),
        dict(router="null", k=2, n_null=2, alpha=0.01),
        dict(router="grouped", k=2, n_groups=2, alpha=0.01),
    ],
)
def test_layer_routers_match_masked_loop(kwargs: dict) -> None:
    torch.manual_seed(3)
    layer = MoELayer(8, 16, 4, **kwargs).double()
    x = torch.randn(20, 8, dtype=F64)
    out, aux = layer(x)
    expected = x + moe_masked_loop(layer.norm(x), aux.routing, layer.w1, layer.w2)
    torch.testing.assert_close(out, expected)
    assert aux.aux_loss.shape == ()


def test_train_moe_is_deterministic_and_records_shapes() -> None:
    task = ClusterTask.make(4, 6, 3, seed=1)
    config = TrainConfig(steps=4, batch=32, layer=dict(d_model=8, d_hidden=8, n_experts=4, k=1, alpha=0.01))
    a, b = train_moe(task, config), train_moe(task, config)
    torch.testing.assert_close(a.loss, b.loss)
    assert a.eval_loss == b.eval_loss
    assert a.tokens_per_expert.shape == (4, 4) and torch.all(a.tokens_per_expert.sum(1) == 32)
    assert torch.equal(a.requested_per_expert, a.tokens_per_expert)  # dropless: nothing dropped
    assert a.loss.shape == a.dropped_fraction.shape == a.real_per_token.shape == (4,)


def test_cluster_task_targets_follow_their_teacher() -> None:
    task = ClusterTask.make(3, 5, 2, seed=2)
    x, y, cluster = task.sample(30, _gen(0))
    assert set(cluster.tolist()) == {0, 1, 2}
    for i in range(30):
        c = int(cluster[i])
        torch.testing.assert_close(y[i], torch.tanh(x[i] @ task.teacher_a[c]) @ task.teacher_b[c])


# ----------------------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_inputs_raise_clear_errors() -> None:
    logits = torch.randn(4, 3)
    with pytest.raises(ValueError, match="k must be <= 3, got 4"):
        top_k_gating(logits, 4)
    with pytest.raises(ValueError, match="capacity_factor must be > 0.0, got 0.0"):
        expert_capacity(4, 3, 1, 0.0)
    with pytest.raises(ValueError, match="capacity_factor must be > 0.0"):
        expert_choice(logits, -1.0)
    with pytest.raises(ValueError, match="n_groups must divide the number of experts 3, got 2"):
        grouped_top_k_gating(logits, 2, 2)
    with pytest.raises(ValueError, match="k must be a multiple of n_groups=2, got 3"):
        grouped_top_k_gating(torch.randn(4, 4), 3, 2)
    with pytest.raises(ValueError, match="n_null must be <= 2"):
        null_expert_gating(logits, 1, 3)
    with pytest.raises(ValueError, match="logits must have 2 dimensions"):
        top_k_gating(torch.randn(3), 1)
    with pytest.raises(ValueError, match="k must be <= 4"):
        MoELayer(4, 4, 4, k=5)
    with pytest.raises(ValueError, match="capacity_factor must be > 0.0"):
        MoELayer(4, 4, 4, capacity_factor=0.0)
    with pytest.raises(ValueError, match="n_groups must divide n_experts=6"):
        MoELayer(4, 4, 6, router="grouped", k=4, n_groups=4)
    with pytest.raises(ValueError, match="router must be one of"):
        MoELayer(4, 4, 4, router="hash")
    with pytest.raises(ValueError, match="capacity_factor must be given"):
        MoELayer(4, 4, 4, router="expert_choice")
    x, w1, w2, logits = _problem(5, 3)
    routing = top_k_gating(logits, 1).routing()
    with pytest.raises(ValueError, match="routing must cover x's 4 tokens"):
        moe_sorted(x[:4], routing, w1, w2)
    with pytest.raises(ValueError, match="w1 must be"):
        moe_dense(x, routing, w1[:, :2], w2, 5)
    with pytest.raises(ValueError, match="n_devices must divide n_experts=3"):
        imbalance_score(routing.expert, 3, 2, 5)
    with pytest.raises(TypeError, match="routing must be a Routing"):
        moe_masked_loop(x, (routing.token, routing.expert), w1, w2)


# ----------------------------------------------------------------------------------------------------------
# Benchmark output format


def test_benchmark_quick_prints_numeric_lines(run_benchmark) -> None:
    _, lines = run_benchmark("bench_moe", ["--quick", "--repeats", "1", "--threads", "1"])
    values = {name: float(value) for name, value in lines.items()}
    for name in ("sorted_vs_loop_speedup", "sorted_vs_dense_speedup", "dense_dispatch_tensor_bytes"):
        assert name in values and values[name] > 0
    assert values["dense_dispatch_tensor_bytes"] == values["tokens"] * values["experts"] * values["capacity"] * 4
