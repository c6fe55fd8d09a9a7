"""Running eviction policies on the book's LLM: recorded attention and batched step-by-step perplexity.

:func:`evaluate_policies` measures what :func:`refimpl.llm.perplexity.evaluate` measures (prefill, then one
token per decode step through the cache, NLL of every next token) for several cache configurations at once:
the configurations are the rows of one batch, and a :class:`CacheBatch` per layer gives each row its own
cache. The model's weights are read once per step for all rows, and configurations whose prefill is the same
computation share one prefill pass, which on a CPU makes a sweep of policies and budgets several times cheaper
than one :func:`~refimpl.llm.perplexity.evaluate` per configuration. A test checks that each row equals the
single-configuration :func:`~refimpl.llm.perplexity.evaluate`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from refimpl._checks import check_int, check_tensor
from refimpl.eviction.analysis import AttentionRecorder
from refimpl.eviction.policies import EvictionCache
from refimpl.llm.cache import FullCache, KVCache, make_caches

__all__ = ["CacheBatch", "PolicyRun", "evaluate_policies", "record_attention"]


class CacheBatch(KVCache):
    """One layer's cache for a batch whose rows use different caches: row ``i`` goes to ``members[i]``.

    ``update`` and ``attend`` split the batch along dim 0 and delegate; each member observes its own attention
    (if it needs to) inside its own ``attend``. ``nbytes`` is the members' sum.
    """

    def __init__(self, members: Sequence[KVCache]) -> None:
        if not members or not all(isinstance(m, KVCache) for m in members):
            raise TypeError(f"members must be a non-empty sequence of KVCache objects, got {members!r}")
        self.members = list(members)

    def _rows(self, x: Tensor, name: str) -> tuple[Tensor, ...]:
        if x.shape[0] != len(self.members):
            raise ValueError(f"{name} must have batch size {len(self.members)} (one row per member), got {x.shape[0]}")
        return x.split(1, dim=0)

    def update(self, k: Tensor, v: Tensor, positions: Tensor) -> None:
        for m, kr, vr in zip(self.members, self._rows(k, "k"), self._rows(v, "v")):
            m.update(kr, vr, positions)

    def attend(self, q: Tensor, q_positions: Tensor, scale: float) -> Tensor:
        return torch.cat([m.attend(qr, q_positions, scale) for m, qr in zip(self.members, self._rows(q, "q"))])

    def keys_values(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError("a CacheBatch holds one cache per row: read members[i].keys_values()")

    def key_positions(self) -> Tensor:
        raise NotImplementedError("a CacheBatch holds one cache per row: read members[i].key_positions()")

    def nbytes(self) -> int:
        return sum(m.nbytes() for m in self.members)

    def __len__(self) -> int:
        return max(len(m) for m in self.members)


@dataclass
class PolicyRun:
    """One configuration's result in :func:`evaluate_policies`.

    ``nll_per_token: (N-1,)`` float64, entry ``t`` the NLL of token ``t+1`` (as in
    :class:`~refimpl.llm.perplexity.PerplexityResult`); ``mean_tokens``: tokens held per layer and KV head,
    averaged over the decode steps (after each step's eviction); ``mean_bytes``: KV bytes held (all layers),
    averaged likewise; ``peak_bytes``: the largest held after any step; ``sizes``: tokens held per layer after
    the prefill and after each decode step; ``kept``: per layer, the positions held at the end, ``(H_kv, T)``.
    """

    name: str
    kwargs: dict[str, Any]
    nll_per_token: Tensor
    prefill: int
    mean_tokens: float
    mean_bytes: float
    peak_bytes: int
    seconds: float = 0.0
    sizes: list[int] = field(default_factory=list)
    kept: list[Tensor] = field(default_factory=list)

    def perplexity(self, start: int | None = None) -> float:
        """``exp(mean NLL)`` of the tokens predicted from position ``start`` on (default: the decoded ones,
        ``start = prefill``, where the cache policy acts)."""
        start = self.prefill if start is None else start
        return math.exp(float(self.nll_per_token[start:].mean()))


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch single-threaded inside the block (restoring the previous setting after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Fanout(KVCache):
    """Prefill helper: every member receives the same step and must compute the same attention output.

    True for the full cache and for the eviction caches (which evict only after a step's attention) holding the
    same storage (``bits``): the prefill of all of them is one forward pass. The members' outputs are checked.
    """

    def __init__(self, members: Sequence[KVCache]) -> None:
        self.members = list(members)

    def update(self, k: Tensor, v: Tensor, positions: Tensor) -> None:
        for m in self.members:
            m.update(k, v, positions)

    def attend(self, q: Tensor, q_positions: Tensor, scale: float) -> Tensor:
        outs = [m.attend(q, q_positions, scale) for m in self.members]
        for o in outs[1:]:
            if not torch.allclose(o, outs[0], rtol=1e-5, atol=1e-6):
                raise RuntimeError("caches grouped for one prefill computed different attention outputs")
        return outs[0]


def _prefill_group(i: int, cache: KVCache) -> tuple[Any, ...]:
    """Configurations whose prefill is provably identical share a key (see :class:`_Fanout`)."""
    if type(cache) is FullCache or (isinstance(cache, EvictionCache) and cache.bits is None):
        return ("full precision",)
    if isinstance(cache, EvictionCache):
        return ("quantized", cache.bits, cache.group_size)
    return ("own", i)


def evaluate_policies(
    model: Any,
    ids: Tensor,
    configs: Sequence[tuple[str, dict[str, Any]]],
    prefill: int = 1,
) -> list[PolicyRun]:
    """Step-by-step NLL of ``ids: (N,)`` under each ``(cache name, kwargs)`` of ``configs``, in one batch.

    Same protocol as :func:`refimpl.llm.perplexity.evaluate` with ``step=1``: tokens ``0 .. prefill-1`` in one
    call, then one token per call; the NLL of every token ``1 .. N-1``. Configurations whose prefill is the same
    computation (full-precision caches evict only after the prefill's attention) share one prefill pass; then
    every configuration is a row of each decode step. Runs single-threaded: a step is thousands of small
    operations, for which intra-op threads cost more than they gain on a CPU. Raises ``ValueError`` for an
    unknown cache name, ``prefill`` outside ``[1, N-1]`` or fewer than 2 ids.
    """
    from refimpl.llm.perplexity import token_nll

    check_tensor("ids", ids, ndim=1, dtypes=[torch.int64, torch.int32])
    n = ids.shape[0]
    if n < 2:
        raise ValueError(f"ids must hold at least 2 tokens, got {n}")
    prefill = check_int("prefill", prefill, min_value=1, max_value=n - 1)
    if not configs:
        raise ValueError("configs must name at least one (cache name, kwargs) pair")
    n_layers = model.config.n_layers
    per_config = [make_caches(name, n_layers, **kw) for name, kw in configs]  # [config][layer]
    m = len(configs)
    ids = ids.long()
    nll = torch.empty(m, n - 1, dtype=torch.float64)
    tokens: list[list[float]] = [[] for _ in configs]
    nbytes: list[list[int]] = [[] for _ in configs]

    def record() -> None:
        for i, pc in enumerate(per_config):
            tokens[i].append(sum(len(c) for c in pc) / n_layers)
            nbytes[i].append(sum(c.nbytes() for c in pc))

    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, pc in enumerate(per_config):
        groups.setdefault(_prefill_group(i, pc[0]), []).append(i)
    t0 = time.perf_counter()
    with _one_thread():
        for rows in groups.values():  # one prefill pass per group
            fan = [_Fanout([per_config[i][layer] for i in rows]) for layer in range(n_layers)]
            h = model.hidden(ids[None, :prefill], fan, 0)[0]  # (prefill, d)
            nll[rows, :prefill] = token_nll(model, h, ids[1 : prefill + 1])
        record()
        caches = [CacheBatch([pc[layer] for pc in per_config]) for layer in range(n_layers)]
        x = ids.view(1, n).expand(m, n)  # (M, N): the same text in every row
        for pos in range(prefill, n - 1):
            h = model.hidden(x[:, pos : pos + 1].contiguous(), caches, pos)  # (M, 1, d)
            nll[:, pos] = token_nll(model, h[:, 0], ids[pos + 1].expand(m))
            record()
    seconds = time.perf_counter() - t0
    return [
        PolicyRun(
            name=name,
            kwargs=dict(kw),
            nll_per_token=nll[i],
            prefill=prefill,
            mean_tokens=sum(tokens[i]) / len(tokens[i]),
            mean_bytes=sum(nbytes[i]) / len(nbytes[i]),
            peak_bytes=max(nbytes[i]),
            seconds=seconds,
            sizes=[round(t) for t in tokens[i]],
            kept=[_positions(c) for c in per_config[i]],
        )
        for i, (name, kw) in enumerate(configs)
    ]


def _positions(cache: KVCache) -> Tensor:
    """Positions a one-sequence cache holds, ``(H_kv, T)`` (a shared ``(T,)`` is repeated per head)."""
    pos = cache.key_positions()
    if pos.dim() == 1:
        return pos.view(1, -1).expand(cache.keys_values()[0].shape[1], -1)
    return pos[0]


def record_attention(model: Any, ids: Tensor, per_query_head: bool = False) -> Tensor:
    """Attention of every layer over ``ids: (T,)`` in one causal prefill: ``(L, H, T, T)`` float32.

    ``H`` is the KV heads (each the mean of its query group, the granularity at which the caches evict) or,
    with ``per_query_head=True``, the query heads. Row ``t`` is the query at position ``t``.
    """
    check_tensor("ids", ids, ndim=1, dtypes=[torch.int64, torch.int32])
    recorders = [AttentionRecorder(per_query_head=per_query_head) for _ in range(model.config.n_layers)]
    model.hidden(ids.long().view(1, -1), recorders, 0)
    return torch.stack([r.attention()[0] for r in recorders])
