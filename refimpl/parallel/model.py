"""A small trainable GPT-shaped decoder built from the book's own blocks, for the parallel-training chapter.

The block is the Llama block of :mod:`refimpl.llm.model` (RMSNorm, RoPE, causal attention, SwiGLU), with the
same weight names and ``(in, out)`` layout, but its weights are ``nn.Parameter`` so it trains::

    h = RMSNorm(x);  q, k, v = h W_qkv;  x = x + Attention(RoPE(q), RoPE(k), v) W_o
    h = RMSNorm(x);  x = x + (SiLU(h W_gate) * h W_up) W_down
    logits = RMSNorm(x) W_head                  # untied head, so a pipeline's first and last stage share nothing

The shape is a :class:`~refimpl.llm.config.LlamaConfig` (one definition of a model shape in the book), here with
``n_kv_heads == n_heads``. :meth:`TinyGPT.stage_forward` runs a contiguous range of blocks, which is what a
pipeline stage holds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from refimpl._checks import check_int, check_positive_int, check_tensor
from refimpl.llm.config import LlamaConfig
from refimpl.llm.model import apply_rope, causal_attention, rms_norm, rope_cos_sin

__all__ = ["GPTBlock", "TinyGPT", "check_stream", "tiny_config"]


def tiny_config(
    *,
    n_layers: int = 4,
    d_model: int = 32,
    n_heads: int = 4,
    ffn_dim: int = 64,
    vocab_size: int = 64,
    max_seq_len: int = 32,
) -> LlamaConfig:
    """A small :class:`LlamaConfig` (head size ``d_model / n_heads``, no GQA, untied head) for the chapter."""
    n_layers, d_model = check_positive_int("n_layers", n_layers), check_positive_int("d_model", d_model)
    n_heads, ffn_dim = check_positive_int("n_heads", n_heads), check_positive_int("ffn_dim", ffn_dim)
    if d_model % n_heads:
        raise ValueError(f"n_heads must divide d_model={d_model}, got {n_heads}")
    if (d_model // n_heads) % 2:
        raise ValueError(f"head size d_model / n_heads must be even for RoPE, got {d_model // n_heads}")
    return LlamaConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=n_heads,
        head_dim=d_model // n_heads,
        ffn_dim=ffn_dim,
        vocab_size=check_positive_int("vocab_size", vocab_size),
        rope_base=10000.0,
        norm_eps=1e-5,
        max_seq_len=check_positive_int("max_seq_len", max_seq_len),
        tie_embeddings=False,
        name="tiny-gpt",
    )


def check_stream(config: LlamaConfig, name: str, x: Tensor) -> None:
    """Raise naming ``name`` unless ``x`` is a float residual stream ``(B, T, d_model)`` of ``config``."""
    check_tensor(name, x, ndim=3, floating=True)
    if x.shape[-1] != config.d_model or not 0 < x.shape[1] <= config.max_seq_len or x.shape[0] == 0:
        raise ValueError(
            f"{name} must have shape (B >= 1, 1..{config.max_seq_len}, {config.d_model}), got {tuple(x.shape)}"
        )


class GPTBlock(nn.Module):
    """One trainable decoder block with the weights of :class:`refimpl.llm.model.Block` (``(in, out)``)."""

    def __init__(self, config: LlamaConfig, generator: torch.Generator) -> None:
        super().__init__()
        c = config
        d, f = c.d_model, c.ffn_dim

        def init(n_in: int, n_out: int, scale: float = 1.0) -> nn.Parameter:
            return nn.Parameter(torch.randn(n_in, n_out, generator=generator) * scale / n_in**0.5)

        self.config = config
        self.attn_norm = nn.Parameter(torch.ones(d))  # (d,)
        self.wqkv = init(d, c.q_dim + 2 * c.kv_dim)  # (d, 3 H D): [W_q | W_k | W_v]
        self.wo = init(c.q_dim, d, 0.5)  # (H D, d)
        self.ffn_norm = nn.Parameter(torch.ones(d))  # (d,)
        self.w_gate_up = init(d, 2 * f)  # (d, 2 F): [W_gate | W_up]
        self.w_down = init(f, d, 0.5)  # (F, d)

    @staticmethod
    def attention(h: Tensor, wqkv: Tensor, n_heads: int, cos: Tensor, sin: Tensor) -> Tensor:
        """Causal self-attention of ``n_heads`` heads whose ``[W_q | W_k | W_v]`` is ``wqkv``; ``(B, T, H D)``.

        ``h: (B, T, d)``, ``wqkv: (d, 3 H D)``, RoPE tables ``cos, sin: (T, D)``.
        """
        b, t, _ = h.shape
        head_dim = cos.shape[-1]
        qkv = (h @ wqkv).view(b, t, 3 * n_heads, head_dim).transpose(1, 2)  # (B, 3H, T, D)
        q, k, v = qkv.split(n_heads, dim=1)
        o = causal_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)  # (B, H, T, D)
        return o.transpose(1, 2).reshape(b, t, n_heads * head_dim)

    @staticmethod
    def mlp(h: Tensor, w_gate_up: Tensor, w_down: Tensor) -> Tensor:
        """SwiGLU ``(SiLU(h W_gate) * h W_up) W_down`` with ``[W_gate | W_up] = w_gate_up``."""
        gate, up = (h @ w_gate_up).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ w_down

    def attention_out(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """The attention branch ``Attention(RMSNorm(x)) W_o``, ``(B, T, d)``."""
        h = rms_norm(x, self.attn_norm, self.config.norm_eps)
        return self.attention(h, self.wqkv, self.config.n_heads, cos, sin) @ self.wo

    def mlp_out(self, x: Tensor) -> Tensor:
        """The MLP branch ``SwiGLU(RMSNorm(x))``, ``(B, T, d)``."""
        return self.mlp(rms_norm(x, self.ffn_norm, self.config.norm_eps), self.w_gate_up, self.w_down)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """``x: (B, T, d)`` with RoPE tables ``cos, sin: (T, D)`` -> ``(B, T, d)``."""
        x = x + self.attention_out(x, cos, sin)
        return x + self.mlp_out(x)


class TinyGPT(nn.Module):
    """Embedding, ``n_layers`` :class:`GPTBlock` s, final RMSNorm and an untied head; ``forward(ids) -> logits``."""

    def __init__(self, config: LlamaConfig, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(check_int("seed", seed))
        self.config = config
        self.embed = nn.Parameter(torch.randn(config.vocab_size, config.d_model, generator=g))  # (V, d)
        self.blocks = nn.ModuleList(GPTBlock(config, g) for _ in range(config.n_layers))
        self.norm = nn.Parameter(torch.ones(config.d_model))  # (d,)
        self.head = nn.Parameter(torch.randn(config.d_model, config.vocab_size, generator=g) / config.d_model**0.5)
        cos, sin = rope_cos_sin(torch.arange(config.max_seq_len), config.head_dim, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, D)
        self.register_buffer("rope_sin", sin, persistent=False)

    def check_ids(self, ids: Tensor) -> None:
        """Raise ``ValueError`` unless ``ids`` is a non-empty ``(B, T)`` int64 tensor of valid tokens."""
        check_tensor("ids", ids, ndim=2, dtypes=[torch.int64])
        if ids.numel() == 0 or ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"ids must have 1..{self.config.max_seq_len} tokens per row, got {tuple(ids.shape)}")
        if int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size:
            raise ValueError(f"ids must be in [0, {self.config.vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")

    def stage_forward(self, x: Tensor, first: int, last: int) -> Tensor:
        """Blocks ``first .. last - 1`` on the residual stream ``x: (B, T, d)``; a pipeline stage's body."""
        t = x.shape[1]
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        for block in self.blocks[first:last]:
            x = block(x, cos, sin)
        return x

    def output(self, x: Tensor) -> Tensor:
        """Logits ``(B, T, V)`` of the final residual stream ``x: (B, T, d)``."""
        return rms_norm(x, self.norm, self.config.norm_eps) @ self.head

    def forward(self, ids: Tensor) -> Tensor:
        """Logits ``(B, T, V)`` of ``ids: (B, T)``."""
        self.check_ids(ids)
        return self.output(self.stage_forward(F.embedding(ids, self.embed), 0, self.config.n_layers))

    def loss(self, ids: Tensor, targets: Tensor) -> Tensor:
        """Mean next-token cross-entropy of ``forward(ids)`` against ``targets: (B, T)``."""
        logits = self(ids)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
