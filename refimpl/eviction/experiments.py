"""Running eviction policies on the book's LLM: recorded attention, and the positions a cache kept.

Perplexity under eviction caches is measured by the book's one evaluation path,
:func:`refimpl.llm.perplexity.evaluate_many`, with the caches' factories (``lambda: H2OCache(budget=64)``): the
configurations are the rows of one batch, and those that store full precision share one prefill pass
(:meth:`~refimpl.eviction.policies.EvictionCache.prefill_key`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from refimpl._checks import check_tensor
from refimpl.eviction.analysis import AttentionRecorder
from refimpl.llm.cache import KVCache

__all__ = ["kept_positions", "realised_compression", "record_attention"]


def kept_positions(cache: KVCache) -> Tensor:
    """Positions a one-sequence cache holds, ``(H_kv, T)`` (a shared ``(T,)`` is repeated per head): e.g. the
    tokens an eviction policy kept, read from ``result.caches[layer]`` of
    :func:`refimpl.llm.perplexity.evaluate_many`."""
    pos = cache.key_positions()
    if pos.dim() == 1:
        return pos.view(1, -1).expand(cache.keys_values()[0].shape[1], -1)
    return pos[0]


def realised_compression(run: Any, full: Any) -> float:
    """How many times fewer tokens an evicting run held than the full cache, over the same evaluation:
    ``full.mean_cache_tokens / run.mean_cache_tokens`` (both results of one
    :func:`~refimpl.llm.perplexity.evaluate_many` call; the means are over the records taken after the prefill
    and after every decode step, per layer and KV head). A budget ``B`` over a context that grows from ``P``
    to ``N`` tokens realises less than ``N / B``: early in the decode the context is short. Raises
    ``ValueError`` if the two runs recorded different numbers of steps or ``run`` held no token."""
    if len(run.cache_tokens) != len(full.cache_tokens):
        raise ValueError(
            f"run and full must come from one evaluation, got {len(run.cache_tokens)} and "
            f"{len(full.cache_tokens)} records"
        )
    if run.mean_cache_tokens <= 0:
        raise ValueError(f"run must hold tokens, got mean_cache_tokens={run.mean_cache_tokens}")
    return full.mean_cache_tokens / run.mean_cache_tokens


def record_attention(model: Any, ids: Tensor, per_query_head: bool = False) -> Tensor:
    """Attention of every layer over ``ids: (T,)`` in one causal prefill: ``(L, H, T, T)`` float32.

    ``H`` is the KV heads (each the mean of its query group, the granularity at which the caches evict) or,
    with ``per_query_head=True``, the query heads. Row ``t`` is the query at position ``t``.
    """
    check_tensor("ids", ids, ndim=1, dtypes=[torch.int64, torch.int32])
    recorders = [AttentionRecorder(per_query_head=per_query_head) for _ in range(model.config.n_layers)]
    model.hidden(ids.long().view(1, -1), recorders, 0)
    return torch.stack([r.attention()[0] for r in recorders])
