"""The shape of a Llama-architecture decoder, read from a GGUF file's metadata.

SmolLM2-135M (Allal et al. 2025) is a Llama-2-style decoder (Touvron et al. 2023): pre-normalization with
RMSNorm, rotary position embeddings (RoPE), grouped-query attention (GQA, Ainslie et al. 2023), a SwiGLU
feed-forward block, and an output head tied to the token embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

from refimpl.model_config import ModelConfig

__all__ = ["LlamaConfig"]


@dataclass(frozen=True, kw_only=True)
class LlamaConfig(ModelConfig):
    """A Llama-architecture decoder the book runs: its shapes (:class:`~refimpl.model_config.ModelConfig`,
    shared with the roofline cost model) plus what running it needs.

    RoPE uses base ``rope_base`` (the ``10000`` of Su et al. 2021, eq. 15); RMSNorm adds ``norm_eps``;
    ``max_seq_len`` is the context length the model was trained for; ``bos_id`` and ``eos_id`` are the
    tokenizer's special tokens. The output head is tied to the token embedding unless ``tie_embeddings=False``.
    The shape fields may be given by position, the others only by keyword. Raises ``ValueError`` as
    :class:`~refimpl.model_config.ModelConfig` does, and for ``n_experts != 1`` (the decoder is dense).
    """

    name: str = ""
    tie_embeddings: bool = True
    rope_base: float
    norm_eps: float
    max_seq_len: int
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_experts != 1:
            raise ValueError(f"n_experts must be 1 (the book's decoder has a dense MLP), got {self.n_experts}")

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
