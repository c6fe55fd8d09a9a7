"""KV-cache eviction (chapter ``scissorhands``): Scissorhands and its peers as caches, and attention analysis.

* :mod:`refimpl.eviction.policies`: :class:`ScissorhandsCache` (Liu et al. 2023), :class:`H2OCache` (Zhang et
  al. 2023), :class:`StreamingLLMCache` (Xiao et al. 2023), :class:`SlidingWindowCache`, on one base class
  :class:`EvictionCache`; registered by name in :data:`refimpl.caches.CACHE_NAMES`.
* :mod:`refimpl.eviction.analysis`: attention sparsity and the persistence of importance, measured from
  recorded attention weights.
* :mod:`refimpl.eviction.experiments`: recording a model's attention, and the positions a cache kept.

Perplexity under these caches: :func:`refimpl.llm.perplexity.evaluate_many` with their factories.
"""

from __future__ import annotations

from refimpl._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {  # submodule -> the names it exports, as one string each
        "policies": "EvictionCache H2OCache ScissorhandsCache SlidingWindowCache StreamingLLMCache kv_head_attention",
        "analysis": "",  # reached as the submodules, nothing re-exported
        "experiments": "",
    },
)
