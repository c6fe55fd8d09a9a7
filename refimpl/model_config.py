"""The shape of a Llama-style decoder: the one definition the cost model and the model share.

Every model of the book is a Llama-style decoder (Touvron et al. 2023): RMSNorm before attention and before the
MLP, rotary position embeddings, grouped-query attention (GQA, Ainslie et al. 2023) with ``n_kv_heads``
key/value heads shared by ``n_heads`` query heads, and a SwiGLU MLP (Shazeer 2020) with three matrices of size
``d_model x ffn_dim``. A Mixture-of-Experts model (Mixtral, Jiang et al. 2024) replaces the MLP with
``n_experts`` SwiGLU experts of which ``experts_per_token`` run per token, chosen by a ``d_model x n_experts``
router.

:class:`ModelConfig` holds these shapes and the counts that follow from them. The roofline cost model
(:mod:`refimpl.roofline.models`) describes models with it; the LLM (:class:`refimpl.llm.config.LlamaConfig`)
extends it with what running the model needs (RoPE base, norm epsilon, context length, special tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

from refimpl._checks import check_positive_int

__all__ = ["ModelConfig"]


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of a Llama-style decoder.

    Attributes:
        name: the model's name (a key of :func:`refimpl.roofline.get_model` for the built-in ones).
        n_layers: decoder layers ``L``.
        d_model: hidden size ``d``.
        n_heads: query heads ``H``.
        n_kv_heads: key/value heads ``H_kv`` (GQA; ``H_kv = H`` is multi-head attention).
        head_dim: per-head size ``D`` (``H * D`` need not equal ``d``).
        ffn_dim: SwiGLU inner size ``d_ff`` (of one expert for an MoE model).
        vocab_size: ``V``.
        tie_embeddings: the LM head reuses the token embedding matrix (no separate ``V x d`` weight).
        n_experts: experts per MoE layer ``E`` (1 for a dense model).
        experts_per_token: experts each token runs, top-``k`` (1 for a dense model).
        source: where the numbers come from.

    Raises ``ValueError`` for a size below 1, ``n_heads`` not a multiple of ``n_kv_heads``, or
    ``experts_per_token > n_experts``.
    """

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    tie_embeddings: bool = False
    n_experts: int = 1
    experts_per_token: int = 1
    source: str = ""

    def __post_init__(self) -> None:
        for attr in ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size"):
            check_positive_int(attr, getattr(self, attr))
        check_positive_int("n_experts", self.n_experts)
        check_positive_int("experts_per_token", self.experts_per_token)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads must be a multiple of n_kv_heads, got {self.n_heads} and {self.n_kv_heads}")
        if self.experts_per_token > self.n_experts:
            raise ValueError(f"experts_per_token must be <= n_experts={self.n_experts}, got {self.experts_per_token}")

    @property
    def is_moe(self) -> bool:
        """True when the MLP is a Mixture of Experts."""
        return self.n_experts > 1

    @property
    def group_size(self) -> int:
        """Query heads per KV head, ``H / H_kv`` (GQA)."""
        return self.n_heads // self.n_kv_heads

    @property
    def q_dim(self) -> int:
        """``H * D``: width of the query projection's output."""
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """``H_kv * D``: width of the key (and of the value) projection's output."""
        return self.n_kv_heads * self.head_dim

    def attention_params(self) -> int:
        """Parameters of one attention block: ``W_q, W_o`` (``d x H D``) and ``W_k, W_v`` (``d x H_kv D``)."""
        return 2 * self.d_model * self.q_dim + 2 * self.d_model * self.kv_dim

    def expert_params(self) -> int:
        """Parameters of one SwiGLU MLP (gate, up, down): ``3 d d_ff``."""
        return 3 * self.d_model * self.ffn_dim

    def router_params(self) -> int:
        """Parameters of the MoE router ``d x E`` (0 for a dense model)."""
        return self.d_model * self.n_experts if self.is_moe else 0

    def embedding_params(self) -> int:
        """Token embedding plus (if untied) LM head: ``V d`` or ``2 V d``."""
        return self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)

    def n_params(self) -> int:
        """Total parameters, all experts included (weights of norms included; a tied embedding counted once)."""
        per_layer = (
            self.attention_params()
            + self.n_experts * self.expert_params()
            + self.router_params()
            + 2 * self.d_model  # two RMSNorm weight vectors
        )
        return self.n_layers * per_layer + self.embedding_params() + self.d_model  # + final norm

    def n_active_params(self) -> int:
        """Parameters one token uses: only ``experts_per_token`` experts of each MoE layer."""
        inactive = self.n_layers * (self.n_experts - self.experts_per_token) * self.expert_params()
        return self.n_params() - inactive
