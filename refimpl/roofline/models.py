"""Transformer configurations the analyzer knows: the shapes that decide FLOPs and bytes.

Every model here is a Llama-style decoder (Touvron et al. 2023): RMSNorm before attention and before the MLP,
rotary position embeddings, grouped-query attention (GQA, Ainslie et al. 2023) with ``n_kv_heads`` key/value heads
shared by ``n_heads`` query heads, and a SwiGLU MLP (Shazeer 2020) with three matrices of size
``d_model x ffn_dim``. A Mixture-of-Experts model (Mixtral, Jiang et al. 2024) replaces the MLP with
``n_experts`` SwiGLU experts of which ``experts_per_token`` run per token, chosen by a ``d_model x n_experts``
router.

Sources: Llama-2-7B and Llama-3-8B and Mixtral-8x7B from their published ``config.json`` files (Hugging Face
model cards), held in ``refimpl/data/models.yaml``; SmolLM2-135M from the metadata of the GGUF file that the
book's LLM chapter loads.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

from refimpl._checks import check_choice, check_positive_int, resolve_named

__all__ = ["ModelConfig", "get_model", "list_models", "resolve_model"]


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of a Llama-style decoder.

    Attributes:
        name: key for :func:`get_model`.
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
        """Total parameters, all experts included (weights of norms included)."""
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


MODELS_YAML = resources.files("refimpl") / "data" / "models.yaml"  # published config.json values


@functools.lru_cache(maxsize=1)
def _builtin() -> dict[str, ModelConfig]:
    import yaml

    table = yaml.safe_load(MODELS_YAML.read_text(encoding="utf-8"))
    return {name: ModelConfig(name=name, **entry) for name, entry in table.items()}


_GGUF_MODELS = ("smollm2-135m",)


def list_models() -> list[str]:
    """Names accepted by :func:`get_model`."""
    return [*_builtin(), *_GGUF_MODELS]


@functools.lru_cache(maxsize=1)
def _smollm2_from_gguf() -> ModelConfig:
    # The shapes come from the GGUF file's metadata, read by the LLM chapter's loader, so the cost model and
    # the model it predicts cannot disagree.
    from refimpl.llm.gguf_file import read_config

    cfg = read_config()
    return ModelConfig(
        name="smollm2-135m",
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        ffn_dim=cfg.ffn_dim,
        vocab_size=cfg.vocab_size,
        tie_embeddings=cfg.tie_embeddings,
        source="GGUF metadata of SmolLM2-135M-Instruct (refimpl.llm.gguf_file.read_config)",
    )


def get_model(name: str) -> ModelConfig:
    """Return the :class:`ModelConfig` called ``name`` (see :func:`list_models`).

    ``"smollm2-135m"`` is read from the GGUF file's metadata via :func:`refimpl.llm.gguf_file.read_config`.
    Raises ``ValueError`` listing the known names for an unknown ``name``.
    """
    check_choice("model", name, list_models())
    if name == "smollm2-135m":
        return _smollm2_from_gguf()
    return _builtin()[name]


def resolve_model(model: ModelConfig | str) -> ModelConfig:
    """Accept a :class:`ModelConfig` or a name for :func:`get_model`; return the config."""
    return resolve_named("model", model, ModelConfig, get_model)
