"""The shape of a Llama-architecture decoder, read from a GGUF file's metadata.

SmolLM2-135M (Allal et al. 2025) is a Llama-2-style decoder (Touvron et al. 2023): pre-normalization with
RMSNorm, rotary position embeddings (RoPE), grouped-query attention (GQA, Ainslie et al. 2023), a SwiGLU
feed-forward block, and an output head tied to the token embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LlamaConfig"]


@dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-architecture decoder.

    ``n_layers`` decoder blocks of width ``d_model``; attention has ``n_heads`` query heads and ``n_kv_heads``
    key/value heads (GQA group size ``n_heads // n_kv_heads``) of size ``head_dim``; the SwiGLU block has hidden
    size ``ffn_dim``; RoPE uses base ``rope_base`` (the ``10000`` of Su et al. 2021, eq. 15);
    RMSNorm adds ``norm_eps``. ``max_seq_len`` is the context length the model was trained for.
    ``tie_embeddings`` is True when the output head reuses the token-embedding matrix.
    """

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    rope_base: float
    norm_eps: float
    max_seq_len: int
    tie_embeddings: bool = True
    bos_id: int = 1
    eos_id: int = 2
    name: str = ""

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.n_heads // self.n_kv_heads

    @property
    def q_dim(self) -> int:
        """Width of the concatenated query heads, ``n_heads * head_dim``."""
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of the concatenated key (or value) heads, ``n_kv_heads * head_dim``."""
        return self.n_kv_heads * self.head_dim

    def layer_params(self) -> dict[str, int]:
        """Parameter count of each weight of one decoder block, by name (the names of ``model.py``)."""
        d, f = self.d_model, self.ffn_dim
        return {
            "attn_norm": d,
            "wq": self.q_dim * d,
            "wk": self.kv_dim * d,
            "wv": self.kv_dim * d,
            "wo": d * self.q_dim,
            "ffn_norm": d,
            "w_gate": f * d,
            "w_up": f * d,
            "w_down": d * f,
        }

    def n_params(self) -> int:
        """Total parameter count (the tied embedding counted once)."""
        head = 0 if self.tie_embeddings else self.vocab_size * self.d_model
        per_layer = sum(self.layer_params().values())
        return self.vocab_size * self.d_model + self.n_layers * per_layer + self.d_model + head

    def decode_weight_bytes(self, weight_bits: float = 32) -> float:
        """Bytes of weights one batch-1 decode step reads at ``weight_bits`` per weight (float32: 32): every
        block, the final norm and the output head.

        The embedding lookup reads one row (``d_model`` values), negligible, so a tied table is counted once,
        as the output head, which reads all of it.
        """
        head = self.vocab_size * self.d_model
        per_layer = sum(self.layer_params().values())
        return (self.n_layers * per_layer + self.d_model + head) * weight_bits / 8

    def kv_bytes_per_token(self, kv_bits: float = 32) -> float:
        """Bytes the full KV cache holds per token at ``kv_bits`` per value (float32: 32; the convention of
        :func:`refimpl.roofline.kv_cache_bytes`): keys and values of every layer (GQA: ``n_kv_heads``)."""
        return 2 * self.n_layers * self.kv_dim * kv_bits / 8
