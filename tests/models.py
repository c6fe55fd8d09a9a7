"""Models that several test modules build: the GGUF tensor names and shapes of a Llama configuration, and a Llama
of any configuration with random weights."""

from __future__ import annotations

import torch

from refimpl.llm.config import LlamaConfig
from refimpl.llm.model import Llama


def gguf_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """GGUF's tensor names and ``(out, in)`` shapes for ``cfg`` (what ``Llama.from_gguf_tensors`` reads)."""
    d, f, q, kv = cfg.d_model, cfg.ffn_dim, cfg.q_dim, cfg.kv_dim
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (cfg.vocab_size, d), "output_norm.weight": (d,)}
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        shapes |= {
            p + "attn_norm.weight": (d,),
            p + "attn_q.weight": (q, d),
            p + "attn_k.weight": (kv, d),
            p + "attn_v.weight": (kv, d),
            p + "attn_output.weight": (d, q),
            p + "ffn_norm.weight": (d,),
            p + "ffn_gate.weight": (f, d),
            p + "ffn_up.weight": (f, d),
            p + "ffn_down.weight": (d, f),
        }
    return shapes


def random_llama(cfg: LlamaConfig, seed: int, scale: float, dtype: torch.dtype = torch.float32) -> Llama:
    """A Llama of configuration ``cfg`` whose every GGUF tensor is drawn from a normal distribution seeded by
    ``seed``: standard for the norm gains (1-D), times ``scale`` for the matrices; in ``dtype``, in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        name: torch.randn(shape, generator=gen, dtype=dtype) * (1.0 if len(shape) == 1 else scale)
        for name, shape in gguf_shapes(cfg).items()
    }
    return Llama.from_gguf_tensors(cfg, tensors, unpermute=False).eval()
