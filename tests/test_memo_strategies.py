"""Tests of refimpl.memo.strategies: bit-exact gradients for every policy, exact peak and traffic accounting,
hooks removed after use, and bad inputs."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from refimpl.memo.block import make_stack
from refimpl.memo.ledger import Ledger, OutOfMemoryError, block_activation_bytes
from refimpl.memo.strategies import (
    FullOffload,
    FullRecompute,
    KeepAll,
    MemoTokenwise,
    Strategy,
    forward_stack,
    train_step,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ALPHAS = (0.0, 0.25, 0.5, 1.0)
STRATEGIES = [KeepAll, FullRecompute, FullOffload] + [lambda a=a: MemoTokenwise(a) for a in ALPHAS]
L, S, B, H, A, TILE = 3, 16, 2, 8, 2, 4  # 4 tiles, so every alpha in ALPHAS is a whole number of tiles


def _grads(layers, x0, g, strategy):  # noqa: ANN001, ANN202
    """Output, input gradient and parameter gradients of one step (baseline: no hooks at all)."""
    for p in layers.parameters():
        p.grad = None
    x = x0.clone().requires_grad_(True)
    if strategy is None:
        out = x
        for layer in layers:
            out = layer(out)
        out.backward(g)
        ledger = None
    else:
        result = train_step(layers, x, g, strategy)
        out, ledger = result.output, result.ledger
    return [out.detach(), x.grad] + [p.grad.clone() for p in layers.parameters()], ledger


@pytest.fixture(scope="module")
def stack():  # noqa: ANN201
    torch.manual_seed(0)
    layers = make_stack(L, H, A, tile=TILE, dropout=0.1, seed=7)
    x0, g = torch.randn(S, B, H), torch.randn(S, B, H)
    return layers, x0, g, _grads(layers, x0, g, None)[0]


@pytest.mark.parametrize("make", STRATEGIES, ids=["keep", "recompute", "offload"] + [f"memo{a}" for a in ALPHAS])
def test_gradients_equal_the_baseline_bit_for_bit(stack, make):
    layers, x0, g, baseline = stack
    got, ledger = _grads(layers, x0, g, make())
    assert len(got) == len(baseline)
    for i, (u, v) in enumerate(zip(baseline, got)):
        assert torch.equal(u, v), f"tensor {i} differs"
    assert ledger.device.live == 0 and ledger.host.live == 0  # everything freed by the end of the step


def test_gradients_bit_exact_with_a_short_last_tile_and_batch_one():
    torch.manual_seed(1)
    layers = make_stack(2, 12, 3, tile=5, dropout=0.2, seed=1)
    x0, g = torch.randn(13, 1, 12), torch.randn(13, 1, 12)
    base, _ = _grads(layers, x0, g, None)
    for strategy in (FullRecompute(), FullOffload(), MemoTokenwise(0.4), MemoTokenwise(0.99)):
        got, _ = _grads(layers, x0, g, strategy)
        assert all(torch.equal(u, v) for u, v in zip(base, got)), strategy


def test_generic_strategies_restore_rng_for_stateful_dropout():
    """FullRecompute and FullOffload work on any module; recomputation restores the global RNG state."""
    torch.manual_seed(2)
    layers = nn.ModuleList(
        [nn.Sequential(nn.Linear(6, 6), nn.GELU(), nn.Dropout(0.5), nn.Linear(6, 6)) for _ in range(3)]
    )
    x0, g = torch.randn(5, 6), torch.randn(5, 6)

    def run(strategy):  # noqa: ANN001, ANN202
        torch.manual_seed(123)  # same dropout masks in every run
        return _grads(layers, x0, g, strategy)[0]

    base = run(None)
    for strategy in (KeepAll(), FullRecompute(), FullOffload()):
        assert all(torch.equal(u, v) for u, v in zip(base, run(strategy))), strategy


def test_peaks_and_traffic_match_closed_forms(stack):
    """Device peaks: keep L A, recompute (L-1) X + A, offload A, MEMO (L-1)(1-alpha) X + A; host and traffic
    alpha L A (no prefetch on the CPU)."""
    layers, x0, g, _ = stack
    act = sum(block_activation_bytes(S, B, H, A, act_bytes=4).values())
    x_bytes = 4 * S * B * H
    peaks = {}
    for name, strategy, alpha in [
        ("keep", KeepAll(), None),
        ("recompute", FullRecompute(), 0.0),
        ("offload", FullOffload(), 1.0),
    ] + [(f"memo{a}", MemoTokenwise(a), a) for a in ALPHAS]:
        _, led = _grads(layers, x0, g, strategy)
        peaks[name] = led.device.peak
        if alpha is None:
            assert led.device.peak == L * act and led.host.peak == 0
            continue
        assert led.device.peak == (L - 1) * (1 - alpha) * x_bytes + act, name
        assert led.host.peak == led.bytes_to_host == led.bytes_to_device == alpha * L * act, name
    assert peaks["offload"] < peaks["recompute"] < peaks["keep"]
    assert [peaks[f"memo{a}"] for a in ALPHAS] == sorted((peaks[f"memo{a}"] for a in ALPHAS), reverse=True)
    assert peaks["memo0.0"] == peaks["recompute"] and peaks["memo1.0"] == peaks["offload"]


def test_ledger_names_memo_and_offload_activations(stack):
    layers, x0, g, _ = stack
    _, led = _grads(layers, x0, g, MemoTokenwise(0.5))
    assert "unnamed" not in led.by_name and "x_kept" in led.by_name


def test_hooks_are_removed_and_nothing_leaks_across_steps(stack):
    layers, x0, g, _ = stack
    for make in STRATEGIES:
        strategy = make()
        ledger = Ledger()
        for _ in range(2):  # two steps on one ledger: it returns to zero after each
            _grads_ledger = train_step(layers, x0.clone().requires_grad_(True), g, strategy, ledger)
            assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
            assert ledger.device.live == 0 and ledger.host.live == 0
        state = strategy._last
        del _grads_ledger
        gc.collect()
        assert state is None or state() is None, "a layer state outlived its step"
        # A forward outside the strategy is not seen by the ledger: no hook is left installed.
        before = len(ledger.timeline)
        layers[0](x0.clone().requires_grad_(True)).sum().backward()
        assert len(ledger.timeline) == before


def test_dropping_the_graph_without_backward_frees_everything(stack):
    layers, x0, _, _ = stack
    for make in STRATEGIES:
        ledger = Ledger()
        out = forward_stack(layers, x0.clone().requires_grad_(True), make(), ledger)
        assert ledger.device.live + ledger.host.live > 0
        del out
        gc.collect()
        assert ledger.device.live == 0 and ledger.host.live == 0, make


def test_no_grad_forward_saves_nothing(stack):
    layers, x0, _, _ = stack
    for make in STRATEGIES:
        ledger = Ledger()
        with torch.no_grad():
            forward_stack(layers, x0, make(), ledger)
        assert ledger.host.peak == 0 and ledger.device.live == 0, make


# ----------------------------------------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), float("inf")])
def test_alpha_outside_unit_interval_is_rejected(alpha):
    with pytest.raises(ValueError, match="alpha"):
        MemoTokenwise(alpha)


def test_alpha_of_wrong_type_is_rejected():
    with pytest.raises(TypeError, match="alpha"):
        MemoTokenwise("0.5")


@pytest.mark.parametrize("make", STRATEGIES)
def test_empty_model_is_rejected(make):
    with pytest.raises(ValueError, match="empty model"):
        forward_stack(nn.ModuleList(), torch.randn(4, 1, 8), make())


@pytest.mark.parametrize("strategy", [FullOffload(), MemoTokenwise(0.5)])
def test_host_budget_smaller_than_one_layer_is_rejected(stack, strategy):
    layers, x0, _, _ = stack
    act = sum(block_activation_bytes(S, B, H, A, act_bytes=4).values())
    with pytest.raises(ValueError, match=r"host_capacity=\d+ bytes is smaller than one layer's offload"):
        forward_stack(layers, x0.clone().requires_grad_(True), strategy, Ledger(host_capacity=act // 4))
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None


def test_host_budget_for_some_layers_runs_out_with_out_of_memory(stack):
    layers, x0, _, _ = stack
    act = sum(block_activation_bytes(S, B, H, A, act_bytes=4).values())
    with pytest.raises(OutOfMemoryError, match="host capacity exceeded"):
        forward_stack(layers, x0.clone().requires_grad_(True), FullOffload(), Ledger(host_capacity=2 * act))


def test_device_budget_is_enforced(stack):
    layers, x0, g, _ = stack
    act = sum(block_activation_bytes(S, B, H, A, act_bytes=4).values())
    with pytest.raises(OutOfMemoryError, match="device capacity exceeded"):
        train_step(layers, x0.clone().requires_grad_(True), g, KeepAll(), Ledger(device_capacity=2 * act))
    # Offloading fits where keeping everything does not.
    train_step(layers, x0.clone().requires_grad_(True), g, FullOffload(), Ledger(device_capacity=2 * act))


def test_memo_needs_the_book_block_and_other_misuse():
    with pytest.raises(TypeError, match="TransformerBlock"):
        forward_stack([nn.Linear(4, 4)], torch.randn(2, 4), MemoTokenwise(0.5))
    with pytest.raises(TypeError, match="strategy"):
        forward_stack([nn.Linear(4, 4)], torch.randn(2, 4), "keep")
    layers = make_stack(1, 8, 2)
    with pytest.raises(ValueError, match="grad_output"):
        train_step(layers, torch.randn(4, 1, 8, requires_grad=True), torch.randn(3, 1, 8), KeepAll())
    assert isinstance(MemoTokenwise(0.5), Strategy) and "alpha=0.5" in repr(MemoTokenwise(0.5))
    assert weakref.ref(KeepAll())  # policies are plain objects
