"""Tensor parallelism: Megatron-LM's column- and row-parallel MLP and attention (Shoeybi et al. 2019, sec. 3).

A transformer block has two matrix pairs ``Y = f(X A) B``. Split ``A`` by columns and ``B`` by rows over ``P``
ranks, ``A = [A_1, ..., A_P]``, ``B = [B_1; ...; B_P]``: rank ``r`` computes ``f(X A_r) B_r`` on its own (the
nonlinearity ``f`` acts on columns independently) and the sum over ranks is ``Y`` (eq. 3). One all-reduce in
the forward pass, and one in the backward pass for the gradient of ``X``. Megatron names the two conjugate
operators (Fig. 3):

* ``f``: identity in forward, all-reduce in backward (before the column-parallel matmul);
* ``g``: all-reduce in forward, identity in backward (after the row-parallel matmul).

For SwiGLU ``A = [W_gate | W_up]`` is split by columns within each half, ``B = W_down`` by rows. For
attention, ``A = [W_q | W_k | W_v]`` is split by heads (the columns of ``H / P`` heads of each of ``Q, K, V``),
``B = W_o`` by the rows of the same heads: each rank runs ``H / P`` heads whole (Fig. 3b). Norm weights are
replicated; since ``f`` all-reduces the gradient of the normalized input, their gradients come out equal on
every rank.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from refimpl._checks import check_int
from refimpl.llm.config import LlamaConfig
from refimpl.llm.model import rms_norm, rope_cos_sin
from refimpl.parallel.model import GPTBlock, check_stream

__all__ = [
    "TensorParallelBlock",
    "check_tensor_parallel",
    "copy_to_tp",
    "reduce_from_tp",
    "shard_block",
    "tensor_parallel_step",
]


class _CopyToTP(torch.autograd.Function):
    """Megatron's ``f``: identity forward, all-reduce of the gradient backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """Megatron's ``g``: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def copy_to_tp(x: Tensor, group: Any = None) -> Tensor:
    """``f`` of Megatron-LM (Fig. 3): ``x`` unchanged; its gradient is summed over the tensor-parallel ranks."""
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: Tensor, group: Any = None) -> Tensor:
    """``g`` of Megatron-LM (Fig. 3): the sum of ``x`` over the tensor-parallel ranks; gradient passes through."""
    return _ReduceFromTP.apply(x, group)


def check_tensor_parallel(config: LlamaConfig, world_size: int) -> int:
    """Return ``world_size`` if it divides the heads and the MLP width of ``config``; else raise naming it."""
    world = check_int("world_size", world_size, min_value=1)
    if config.n_heads % world:
        raise ValueError(f"world_size must divide n_heads={config.n_heads}, got {world}")
    if config.ffn_dim % world:
        raise ValueError(f"world_size must divide ffn_dim={config.ffn_dim}, got {world}")
    return world


def shard_block(block: GPTBlock, rank: int, world_size: int) -> dict[str, Tensor]:
    """Rank ``rank``'s slices of a full block's weights (module docstring); norms are copied whole.

    Returns ``wqkv (d, 3 H/P D)`` as ``[W_q | W_k | W_v]`` of heads ``[r H/P, (r+1) H/P)``, ``wo (H/P D, d)``,
    ``w_gate_up (d, 2 F/P)`` as ``[W_gate | W_up]`` of columns ``[r F/P, (r+1) F/P)``, ``w_down (F/P, d)``.
    """
    c = block.config
    world = check_tensor_parallel(c, world_size)
    rank = check_int("rank", rank, min_value=0, max_value=world - 1)
    cols = c.q_dim // world  # H/P heads of D columns
    fcols = c.ffn_dim // world
    q, k, v = block.wqkv.detach().split(c.q_dim, dim=1)
    gate, up = block.w_gate_up.detach().chunk(2, dim=1)
    own = slice(rank * cols, (rank + 1) * cols)
    fown = slice(rank * fcols, (rank + 1) * fcols)
    return {
        "attn_norm": block.attn_norm.detach().clone(),
        "wqkv": torch.cat([q[:, own], k[:, own], v[:, own]], dim=1),
        "wo": block.wo.detach()[own].clone(),
        "ffn_norm": block.ffn_norm.detach().clone(),
        "w_gate_up": torch.cat([gate[:, fown], up[:, fown]], dim=1),
        "w_down": block.w_down.detach()[fown].clone(),
    }


class TensorParallelBlock(nn.Module):
    """This rank's part of a :class:`GPTBlock` under ``P``-way tensor parallelism; ``forward`` as the full block.

    Build it on every rank of ``group`` from the same full block (:func:`shard_block` takes this rank's slices).
    """

    def __init__(self, block: GPTBlock, group: Any = None) -> None:
        super().__init__()
        self.config = block.config
        self.group = group
        self.world = dist.get_world_size(group)
        self.n_heads = self.config.n_heads // check_tensor_parallel(self.config, self.world)
        for name, value in shard_block(block, dist.get_rank(group), self.world).items():
            setattr(self, name, nn.Parameter(value))

    def attention_out(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # same names as GPTBlock's
        """This rank's partial sum of ``Attention(RMSNorm(x)) W_o`` (the all-reduce ``g`` not yet applied)."""
        h = copy_to_tp(rms_norm(x, self.attn_norm, self.config.norm_eps), self.group)  # f
        return GPTBlock.attention(h, self.wqkv, self.n_heads, cos, sin) @ self.wo  # row-parallel W_o

    def mlp_out(self, x: Tensor) -> Tensor:
        """This rank's partial sum of ``SwiGLU(RMSNorm(x))`` (before ``g``)."""
        h = copy_to_tp(rms_norm(x, self.ffn_norm, self.config.norm_eps), self.group)  # f
        return GPTBlock.mlp(h, self.w_gate_up, self.w_down)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """``x: (B, T, d)`` replicated on every rank -> the full block's output, replicated."""
        x = x + reduce_from_tp(self.attention_out(x, cos, sin), self.group)  # g
        return x + reduce_from_tp(self.mlp_out(x), self.group)  # g


def tensor_parallel_step(config: LlamaConfig, x: Tensor, grad_y: Tensor, seed: int = 0) -> dict[str, Any]:
    """On each rank: build block ``seed`` of ``config`` whole, shard it, run forward and backward of ``grad_y``.

    ``x, grad_y: (B, T, d)``. Returns this rank's ``y``, ``grad_x`` and its shards' gradients (``grads``), for
    the comparison with the unsharded block.
    """
    block = GPTBlock(config, torch.Generator().manual_seed(seed))
    check_stream(config, "x", x)
    check_stream(config, "grad_y", grad_y)
    if grad_y.shape != x.shape:
        raise ValueError(f"grad_y must have x's shape {tuple(x.shape)}, got {tuple(grad_y.shape)}")
    check_tensor_parallel(config, dist.get_world_size())
    tp = TensorParallelBlock(block)
    x = x.clone().requires_grad_(True)
    t = x.shape[1]
    cos, sin = rope_cos_sin(torch.arange(t), config.head_dim, config.rope_base)
    y = tp(x, cos, sin)
    y.backward(grad_y)
    return {"y": y.detach(), "grad_x": x.grad, "grads": {n: p.grad for n, p in tp.named_parameters()}}
