"""The command line's table of cache policies (``refimpl.caches``), above the techniques that define them."""

from __future__ import annotations

import types

import pytest

from refimpl.caches import CACHE_NAMES, cache_factory, make_caches
from refimpl.eviction import H2OCache, ScissorhandsCache, SlidingWindowCache, StreamingLLMCache
from refimpl.kivi import KIVICache
from refimpl.llm.cache import FullCache

_CONFIG = types.SimpleNamespace(rope_base=10000.0)  # the field of a model's config a policy reads (LlamaConfig)


def test_names_build_one_cache_per_layer():
    caches = make_caches("full", 4)
    assert len(caches) == 4 and all(isinstance(c, FullCache) for c in caches)
    assert len({id(c) for c in caches}) == 4, "one distinct cache per layer"
    assert make_caches("full", 2, capacity=3)[0]._capacity == 3
    assert "full" in CACHE_NAMES


def test_every_name_maps_to_its_class_with_defaults():
    expected = {
        "full": FullCache,
        "kivi2": KIVICache,
        "kivi4": KIVICache,
        "scissorhands": ScissorhandsCache,
        "h2o": H2OCache,
        "streamingllm": StreamingLLMCache,
        "window": SlidingWindowCache,
    }
    assert {name: cls for name, (cls, _) in CACHE_NAMES.items()} == expected
    for name, cls in expected.items():
        kwargs = {"budget": 32} if name not in ("full", "kivi2", "kivi4") else {}
        assert type(cache_factory(name, _CONFIG, **kwargs)()) is cls
    # StreamingLLM reads its RoPE base from the model's config unless told otherwise; without either, it says so.
    assert cache_factory("streamingllm", _CONFIG, budget=32)().rope_base == _CONFIG.rope_base
    assert cache_factory("streamingllm", _CONFIG, budget=32, rope_base=5.0)().rope_base == 5.0
    with pytest.raises(ValueError, match="rope_base"):
        cache_factory("streamingllm", budget=32)
    assert cache_factory("kivi2")().bits == 2 and cache_factory("kivi4")().bits == 4


def test_unknown_name_and_bad_arguments_raise_at_once():
    with pytest.raises(ValueError, match="cache name must be one of"):
        make_caches("no-such-policy", 2)
    with pytest.raises(ValueError, match="budget"):
        cache_factory("h2o")  # validated when the factory is made, not at the first layer of a run
    with pytest.raises(TypeError):
        cache_factory("full", colour="red")
