"""KV-cache policies by name: the table the command line uses, above the techniques that define the caches.

``refimpl.llm`` names no technique: its evaluation and generation take a factory of one layer's cache. This
module, which sits above :mod:`refimpl.kivi` and :mod:`refimpl.eviction`, maps the names of the command line
(``python -m refimpl.llm perplexity FILE --cache kivi2``) to those factories.
"""

from __future__ import annotations

import functools
from typing import Any

from refimpl._checks import check_choice
from refimpl.eviction import H2OCache, ScissorhandsCache, SlidingWindowCache, StreamingLLMCache
from refimpl.kivi import KIVICache
from refimpl.llm.cache import CacheFactory, FullCache, KVCache
from refimpl.llm.cache import make_caches as make_layer_caches

__all__ = ["CACHE_NAMES", "MODEL_ARGUMENTS", "cache_factory", "make_caches"]

#: name -> (cache class, default keyword arguments).
CACHE_NAMES: dict[str, tuple[type[KVCache], dict[str, Any]]] = {
    "full": (FullCache, {}),
    "kivi2": (KIVICache, {"bits": 2}),
    "kivi4": (KIVICache, {"bits": 4}),
    "scissorhands": (ScissorhandsCache, {}),
    "h2o": (H2OCache, {}),
    "streamingllm": (StreamingLLMCache, {}),
    "window": (SlidingWindowCache, {}),
}


#: name -> the cache arguments a policy takes from the model it serves (read from its config, same name).
MODEL_ARGUMENTS: dict[str, tuple[str, ...]] = {"streamingllm": ("rope_base",)}


def cache_factory(name: str, model_config: Any = None, **kwargs: Any) -> CacheFactory:
    """A factory of one layer's cache of the policy registered as ``name`` in :data:`CACHE_NAMES`.

    ``kwargs`` override the policy's defaults (e.g. ``budget=128``). A policy listed in
    :data:`MODEL_ARGUMENTS` takes those arguments from ``model_config`` (e.g. StreamingLLM's RoPE base from
    ``model.config``) unless ``kwargs`` gives them. One cache is built at once, so bad arguments raise here
    (``ValueError``/``TypeError`` from the cache), as does an unknown ``name``.
    """
    check_choice("cache name", name, CACHE_NAMES)
    cls, defaults = CACHE_NAMES[name]
    if model_config is not None:
        kwargs = {k: getattr(model_config, k) for k in MODEL_ARGUMENTS.get(name, ())} | kwargs
    factory = functools.partial(cls, **{**defaults, **kwargs})
    factory()  # validate the arguments now, not at the first layer of a run
    return factory


def make_caches(name: str, n_layers: int, model_config: Any = None, **kwargs: Any) -> list[KVCache]:
    """One cache per layer of the policy ``name`` (:func:`cache_factory`, :func:`refimpl.llm.cache.make_caches`)."""
    return make_layer_caches(cache_factory(name, model_config, **kwargs), n_layers)
