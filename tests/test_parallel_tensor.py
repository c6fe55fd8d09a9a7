"""Megatron tensor parallelism and the Ladder residual across processes (gloo, CPU): a sharded block's forward
and backward equal the unsharded block's; the tensor-parallel Ladder model equals a single-process Ladder model."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.llm.model import rope_cos_sin
from refimpl.parallel import (
    GPTBlock,
    TinyGPT,
    block_branches,
    check_tensor_parallel,
    ladder_step,
    residual_forward,
    run_tasks,
    shard_block,
    tensor_parallel_step,
    tiny_config,
)

CONFIG = tiny_config(n_layers=2, d_model=32, n_heads=4, ffn_dim=48, vocab_size=16, max_seq_len=8)


def _full_block_step(x: torch.Tensor, grad_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, GPTBlock]:
    block = GPTBlock(CONFIG, torch.Generator().manual_seed(0))
    x = x.clone().requires_grad_(True)
    cos, sin = rope_cos_sin(torch.arange(x.shape[1]), CONFIG.head_dim, CONFIG.rope_base)
    y = block(x, cos, sin)
    y.backward(grad_y)
    return y.detach(), x.grad, block


def _expected_shard_grads(block: GPTBlock, rank: int, world: int) -> dict[str, torch.Tensor]:
    """The full block's gradients cut the Megatron way, written out independently of shard_block."""
    c = CONFIG
    heads = c.n_heads // world
    cols = [h * c.head_dim + j for h in range(rank * heads, (rank + 1) * heads) for j in range(c.head_dim)]
    f = c.ffn_dim // world
    fcols = list(range(rank * f, (rank + 1) * f))
    g = block.wqkv.grad
    return {
        "attn_norm": block.attn_norm.grad,
        "wqkv": torch.cat([g[:, cols], g[:, [c.q_dim + i for i in cols]], g[:, [2 * c.q_dim + i for i in cols]]], 1),
        "wo": block.wo.grad[cols],
        "ffn_norm": block.ffn_norm.grad,
        "w_gate_up": torch.cat(
            [block.w_gate_up.grad[:, fcols], block.w_gate_up.grad[:, [c.ffn_dim + i for i in fcols]]], 1
        ),
        "w_down": block.w_down.grad[fcols],
    }


def _ladder_naive(model: TinyGPT, x: torch.Tensor) -> torch.Tensor:
    """Ladder residual written as its equation: branch i reads x_{i-2}, its output joins at x_i."""
    cos, sin = rope_cos_sin(torch.arange(x.shape[1]), CONFIG.head_dim, CONFIG.rope_base)
    fs = []
    for b in model.blocks:
        fs += [lambda h, b=b: b.attention_out(h, cos, sin), b.mlp_out]
    xs = [x]  # xs[i] = x_i
    for i, f in enumerate(fs, start=1):
        xs.append(xs[i - 1] + f(xs[max(i - 2, 0)]))
    return xs[-1]


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_block_and_ladder_equal_single_process(world: int) -> None:
    g = torch.Generator().manual_seed(world)
    x, grad_y = torch.randn(2, 6, CONFIG.d_model, generator=g), torch.randn(2, 6, CONFIG.d_model, generator=g)
    tp, ladder = run_tasks(world, [(tensor_parallel_step, (CONFIG, x, grad_y)), (ladder_step, (CONFIG, x, 0, 1))])
    y, grad_x, block = _full_block_step(x, grad_y)
    for rank, res in enumerate(tp):
        torch.testing.assert_close(res["y"], y)
        torch.testing.assert_close(res["grad_x"], grad_x)
        for name, expected in _expected_shard_grads(block, rank, world).items():
            torch.testing.assert_close(res["grads"][name], expected, msg=name)

    model = TinyGPT(CONFIG, 0)
    with torch.no_grad():
        standard = model.stage_forward(x, 0, CONFIG.n_layers)
        expected_ladder = _ladder_naive(model, x)
    for res in ladder:
        torch.testing.assert_close(res["standard"], standard)
        torch.testing.assert_close(res["ladder"], expected_ladder)
        assert res["ladder_wait_s"] >= 0 and res["standard_wait_s"] >= 0
    assert not torch.allclose(expected_ladder, standard)  # Ladder is a different model


def test_residual_forward_single_process_matches_the_equations() -> None:
    model = TinyGPT(CONFIG, 3)
    x = torch.randn(1, 5, CONFIG.d_model, generator=torch.Generator().manual_seed(3))
    cos, sin = rope_cos_sin(torch.arange(5), CONFIG.head_dim, CONFIG.rope_base)
    branches = block_branches(model.blocks, cos, sin)
    with torch.no_grad():
        standard, wait = residual_forward(branches, x, ladder=False)
        torch.testing.assert_close(standard, model.stage_forward(x, 0, CONFIG.n_layers))
        torch.testing.assert_close(residual_forward(branches, x, ladder=True)[0], _ladder_naive(model, x))
        torch.testing.assert_close(residual_forward(branches[:1], x, ladder=True)[0], x + branches[0](x))
    assert wait < 1.0


@settings(deadline=None, max_examples=25)
@given(st.sampled_from([1, 2, 4]), st.integers(1, 3), st.sampled_from([2, 4]), st.integers(1, 3))
def test_shards_reassemble_the_block(world: int, heads_per_rank: int, head_dim: int, ffn_per_rank: int) -> None:
    n_heads = world * heads_per_rank
    config = tiny_config(n_layers=1, d_model=n_heads * head_dim, n_heads=n_heads, ffn_dim=world * ffn_per_rank)
    block = GPTBlock(config, torch.Generator().manual_seed(n_heads))
    shards = [shard_block(block, r, world) for r in range(world)]
    assert torch.equal(torch.cat([s["wo"] for s in shards]), block.wo.detach())
    assert torch.equal(torch.cat([s["w_down"] for s in shards]), block.w_down.detach())
    # each rank's [W_q | W_k | W_v] holds its heads' columns of each of W_q, W_k, W_v, in order
    qkv = [torch.cat([s["wqkv"].chunk(3, dim=1)[i] for s in shards], dim=1) for i in range(3)]
    assert torch.equal(torch.cat(qkv, dim=1), block.wqkv.detach())
    gate_up = [torch.cat([s["w_gate_up"].chunk(2, dim=1)[i] for s in shards], dim=1) for i in range(2)]
    assert torch.equal(torch.cat(gate_up, dim=1), block.w_gate_up.detach())
    for s in shards:
        assert torch.equal(s["attn_norm"], block.attn_norm.detach())


@settings(deadline=None, max_examples=15)
@given(st.integers(1, 3), st.integers(1, 6), st.integers(0, 100))
def test_ladder_matches_its_equation_for_any_depth(n_layers: int, t: int, seed: int) -> None:
    config = tiny_config(n_layers=n_layers, d_model=16, n_heads=2, ffn_dim=16, max_seq_len=8)
    model = TinyGPT(config, seed)
    x = torch.randn(2, t, 16, generator=torch.Generator().manual_seed(seed))
    cos, sin = rope_cos_sin(torch.arange(t), config.head_dim, config.rope_base)
    fs = block_branches(model.blocks, cos, sin)
    with torch.no_grad():
        xs = [x]
        for i, f in enumerate(fs, start=1):
            xs.append(xs[i - 1] + f(xs[max(i - 2, 0)]))
        torch.testing.assert_close(residual_forward(fs, x, ladder=True)[0], xs[-1])
        torch.testing.assert_close(residual_forward(fs, x, ladder=False)[0], model.stage_forward(x, 0, n_layers))


def test_bad_tensor_parallel_sizes_name_the_argument() -> None:
    with pytest.raises(ValueError, match="world_size must divide n_heads=4, got 3"):
        check_tensor_parallel(CONFIG, 3)
    with pytest.raises(ValueError, match="world_size must divide ffn_dim=48, got 32"):
        check_tensor_parallel(tiny_config(d_model=64, n_heads=32, ffn_dim=48), 32)
    with pytest.raises(ValueError, match="rank must be <= 1, got 2"):
        shard_block(GPTBlock(CONFIG, torch.Generator()), 2, 2)
    with pytest.raises(ValueError, match="world_size must be >= 1, got 0"):
        check_tensor_parallel(CONFIG, 0)


def test_bad_streams_raise_before_any_communication() -> None:
    x = torch.zeros(1, 4, CONFIG.d_model)
    with pytest.raises(ValueError, match=r"x must have shape \(B >= 1, 1..8, 32\), got \(1, 4, 31\)"):
        tensor_parallel_step(CONFIG, x[..., :31], x[..., :31])
    with pytest.raises(ValueError, match=r"grad_y must have x's shape \(1, 4, 32\), got \(1, 3, 32\)"):
        tensor_parallel_step(CONFIG, x, x[:, :3])
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        ladder_step(CONFIG, x[0])
