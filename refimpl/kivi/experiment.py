"""Measuring KIVI on the book's LLM: cache configurations side by side, and the channel statistics of K and V.

Decoding is memory-bound (see the roofline chapter): one step reads every weight once whether it serves one
sequence or ten. :func:`evaluate_side_by_side` uses that to compare cache configurations cheaply: each
configuration is one row of a batch that decodes the same text, every row with its own per-layer cache
(:class:`RowCaches`), so the weights are read once per step for all of them. Row ``i`` computes exactly what a
separate :func:`refimpl.llm.perplexity.evaluate` with configuration ``i`` computes (a test checks it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from refimpl._checks import check_int, check_tensor
from refimpl.llm.cache import FullCache, KVCache
from refimpl.llm.model import Llama
from refimpl.llm.perplexity import PerplexityResult, token_nll

__all__ = ["RowCaches", "channel_magnitude", "collect_kv", "evaluate_side_by_side"]


def _as_ids(ids: Tensor | Sequence[int]) -> Tensor:
    """``ids`` as a 1-D LongTensor of at least 2 tokens (the model checks the vocabulary and the length)."""
    ids = torch.as_tensor(ids, dtype=torch.long) if not isinstance(ids, Tensor) else ids
    check_tensor("ids", ids, ndim=1, dtypes=[torch.int64, torch.int32])
    if ids.shape[0] < 2:
        raise ValueError(f"ids must hold at least 2 tokens (one to predict), got {ids.shape[0]}")
    return ids.long()


class RowCaches(KVCache):
    """One layer's cache for a batch whose row ``i`` is stored by ``caches[i]`` (each a batch-1 cache).

    ``update`` and ``attend`` split the batch dimension and concatenate the rows' outputs; ``nbytes`` sums
    the rows. All rows must keep every token (no eviction), so they share positions and length.
    """

    def __init__(self, caches: Sequence[KVCache]) -> None:
        self.caches = list(caches)
        if not self.caches or not all(isinstance(c, KVCache) for c in self.caches):
            raise ValueError(f"caches must be a non-empty sequence of KVCache objects, got {caches!r}")

    def _check_rows(self, x: Tensor, name: str) -> None:
        if x.shape[0] != len(self.caches):
            raise ValueError(f"{name} must have batch size {len(self.caches)} (one row per cache), got {x.shape[0]}")

    def update(self, k: Tensor, v: Tensor, positions: Tensor) -> None:
        self._check_rows(k, "k")
        for i, c in enumerate(self.caches):
            c.update(k[i : i + 1], v[i : i + 1], positions)

    def attend(self, q: Tensor, q_positions: Tensor, scale: float) -> Tensor:
        self._check_rows(q, "q")
        return torch.cat([c.attend(q[i : i + 1], q_positions, scale) for i, c in enumerate(self.caches)])

    def keys_values(self) -> tuple[Tensor, Tensor]:
        kv = [c.keys_values() for c in self.caches]
        return torch.cat([k for k, _ in kv]), torch.cat([v for _, v in kv])

    def key_positions(self) -> Tensor:
        return self.caches[0].key_positions()

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.caches)

    def __len__(self) -> int:
        return len(self.caches[0])


def evaluate_side_by_side(
    model: Llama,
    ids: Tensor | Sequence[int],
    policies: Mapping[str, Callable[[], KVCache]],
    prefill: int = 1,
) -> dict[str, PerplexityResult]:
    """Perplexity of ``ids: (N,)`` under each cache policy, all decoded together as rows of one batch.

    ``policies`` maps a name to a factory of one layer's cache (``FullCache``, ``lambda: KIVICache(bits=4)``).
    Like :func:`refimpl.llm.perplexity.evaluate`: the first ``prefill`` tokens go in one call, then one token
    per decode step; every token ``1 .. N-1`` is predicted once. ``seconds``/``tokens_per_s`` of each result
    are those of the shared run. Raises ``ValueError`` for no policies, or ``ids``/``prefill`` as ``evaluate``.
    """
    if not policies:
        raise ValueError("policies must name at least one cache policy")
    ids = _as_ids(ids)
    n = ids.shape[0]
    prefill = check_int("prefill", prefill, min_value=1, max_value=n)
    rows = len(policies)
    layers = [RowCaches([make() for make in policies.values()]) for _ in range(model.config.n_layers)]
    batch = ids[None, :].expand(rows, n)  # (rows, N): the same text in every row
    nll = torch.empty(rows, n - 1, dtype=torch.float64)

    def score(start: int, end: int) -> None:
        h = model.hidden(batch[:, start:end], layers, start)  # (rows, end - start, d)
        targets = ids[start + 1 : end + 1].repeat(rows)
        nll[:, start:end] = token_nll(model, h.reshape(-1, h.shape[-1]), targets).view(rows, -1)

    t0 = time.perf_counter()
    p = min(prefill, n - 1)
    score(0, p)
    for pos in range(p, n - 1):  # token-by-token decoding, as evaluate(step=1)
        score(pos, pos + 1)
    seconds = time.perf_counter() - t0
    out = {}
    for i, name in enumerate(policies):
        nbytes = sum(layer.caches[i].nbytes() for layer in layers)
        mean = float(nll[i].mean())
        out[name] = PerplexityResult(
            nll=mean,
            perplexity=math.exp(mean),
            n_tokens=n - 1,
            cache_bytes=nbytes,
            tokens_per_s=rows * (n - 1) / max(seconds, 1e-9),
            seconds=seconds,
            nll_per_token=nll[i].clone(),
            cache=name,
            prefill=prefill,
            peak_cache_bytes=nbytes,  # caches only grow, so the end is the peak
        )
    return out


def collect_kv(model: Llama, ids: Tensor | Sequence[int]) -> list[tuple[Tensor, Tensor]]:
    """Keys (after RoPE) and values of every layer for ``ids: (N,)``: a list of ``(K, V)``, each
    ``(1, H_kv, N, D)``, from one prefill into full-precision caches."""
    ids = _as_ids(ids)
    caches = [FullCache() for _ in range(model.config.n_layers)]
    model.hidden(ids[None, :], caches, 0)
    return [c.keys_values() for c in caches]


def channel_magnitude(x: Tensor) -> Tensor:
    """Mean absolute value of each channel of ``x: (B, H, T, D)`` over batch and tokens: ``(H * D,)``.

    The statistic behind KIVI's Figure 2: a few key channels are large in every token (outlier channels),
    while value magnitudes show no such channel structure.
    """
    check_tensor("x", x, ndim=4, floating=True)
    return x.abs().mean(dim=(0, 2)).reshape(-1)  # (H, D) -> (H * D,)
