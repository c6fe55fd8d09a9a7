"""Transformer configurations the analyzer knows: the shapes that decide FLOPs and bytes.

Each is a :class:`~refimpl.model_config.ModelConfig` (the shape definition shared with the book's LLM), a
datasheet entry with its source, held in ``refimpl/data/models.yaml``: Llama-2-7B, Llama-3-8B, Mixtral-8x7B and
TinyLlama-1.1B from their published ``config.json`` files (Hugging Face model cards); SmolLM2-135M from the metadata
of the GGUF file that the book's LLM chapter loads (a test checks the entry against :func:`refimpl.llm.read_config`);
GPT-3 175B from its paper's table, its MLP written as a SwiGLU of the same size. The cost model reads no model
file: to analyze another model, build its :class:`ModelConfig` (``refimpl.llm.read_config`` returns one for a GGUF).
"""

from __future__ import annotations

import functools
from importlib import resources

from refimpl._checks import check_choice, resolve_named
from refimpl.model_config import ModelConfig

__all__ = ["MODELS_YAML", "ModelConfig", "get_model", "list_models", "resolve_model"]

#: The datasheet entries, shipped inside the package (a :class:`~importlib.resources.abc.Traversable`).
MODELS_YAML = resources.files("refimpl") / "data" / "models.yaml"


@functools.lru_cache(maxsize=1)
def _builtin() -> dict[str, ModelConfig]:
    import yaml

    table = yaml.safe_load(MODELS_YAML.read_text(encoding="utf-8"))
    return {name: ModelConfig(name=name, **entry) for name, entry in table.items()}


def list_models() -> list[str]:
    """Names accepted by :func:`get_model`."""
    return list(_builtin())


def get_model(name: str) -> ModelConfig:
    """Return the :class:`ModelConfig` called ``name`` (see :func:`list_models`).

    Raises ``ValueError`` listing the known names for an unknown ``name``.
    """
    check_choice("model", name, list_models())
    return _builtin()[name]


def resolve_model(model: ModelConfig | str) -> ModelConfig:
    """Accept a :class:`ModelConfig` or a name for :func:`get_model`; return the config."""
    return resolve_named("model", model, ModelConfig, get_model)
