"""Transformer configurations the analyzer knows: the shapes that decide FLOPs and bytes.

Each is a :class:`~refimpl.model_config.ModelConfig` (the shape definition shared with the book's LLM), a
datasheet entry with its source: Llama-2-7B, Llama-3-8B and Mixtral-8x7B from their published ``config.json``
files (Hugging Face model cards); SmolLM2-135M from the metadata of the GGUF file that the book's LLM chapter
loads (a test checks the entry against :func:`refimpl.llm.read_config`). The cost model reads no model file:
to analyze another model, build its :class:`ModelConfig` (``refimpl.llm.read_config`` returns one for a GGUF).
"""

from __future__ import annotations

from refimpl._checks import check_choice
from refimpl.model_config import ModelConfig

__all__ = ["ModelConfig", "get_model", "list_models", "resolve_model"]


# Published config.json values (Hugging Face model cards).
_BUILTIN: dict[str, ModelConfig] = {
    "llama-2-7b": ModelConfig(
        name="llama-2-7b",
        n_layers=32,
        d_model=4096,
        n_heads=32,
        n_kv_heads=32,
        head_dim=128,
        ffn_dim=11008,
        vocab_size=32000,
        source="meta-llama/Llama-2-7b-hf config.json (Touvron et al. 2023)",
    ),
    "llama-3-8b": ModelConfig(
        name="llama-3-8b",
        n_layers=32,
        d_model=4096,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        ffn_dim=14336,
        vocab_size=128256,
        source="meta-llama/Meta-Llama-3-8B config.json",
    ),
    "mixtral-8x7b": ModelConfig(
        name="mixtral-8x7b",
        n_layers=32,
        d_model=4096,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        ffn_dim=14336,
        vocab_size=32000,
        n_experts=8,
        experts_per_token=2,
        source="mistralai/Mixtral-8x7B-v0.1 config.json (Jiang et al. 2024)",
    ),
    "smollm2-135m": ModelConfig(
        name="smollm2-135m",
        n_layers=30,
        d_model=576,
        n_heads=9,
        n_kv_heads=3,
        head_dim=64,
        ffn_dim=1536,
        vocab_size=49152,
        tie_embeddings=True,
        source="GGUF metadata of SmolLM2-135M-Instruct (Allal et al. 2025), as refimpl.llm.read_config reads it",
    ),
}


def list_models() -> list[str]:
    """Names accepted by :func:`get_model`."""
    return list(_BUILTIN)


def get_model(name: str) -> ModelConfig:
    """Return the :class:`ModelConfig` called ``name`` (see :func:`list_models`).

    Raises ``ValueError`` listing the known names for an unknown ``name``.
    """
    check_choice("model", name, _BUILTIN)
    return _BUILTIN[name]


def resolve_model(model: ModelConfig | str) -> ModelConfig:
    """Accept a :class:`ModelConfig` or a name for :func:`get_model`; return the config."""
    if isinstance(model, ModelConfig):
        return model
    if not isinstance(model, str):
        raise TypeError(f"model must be a ModelConfig or a name, got {type(model).__name__}")
    return get_model(model)
