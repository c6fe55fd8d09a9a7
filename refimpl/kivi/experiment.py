"""Looking inside the book's LLM for KIVI: the keys and values of every layer, their channel statistics, and
which layers and heads a quantized cache's error comes from.

Perplexity under KIVI caches is measured by the book's one evaluation path,
:func:`refimpl.llm.perplexity.evaluate_many`, with KIVI cache factories (``lambda: KIVICache(bits=2)``);
:class:`LayerFactory` gives each layer its own configuration (e.g. KIVI-2 except a few layers in full
precision), and :func:`attention_error` attributes a configuration's error to layers and KV heads.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from refimpl._checks import check_int, check_positive_int, check_tensor
from refimpl.llm.cache import FULL_PRECISION_PREFILL, CacheFactory, FullCache, KVCache
from refimpl.llm.model import Llama
from refimpl.llm.perplexity import RowCaches, evaluate_many, token_ids

__all__ = [
    "AttentionError",
    "AttentionErrorProbe",
    "LayerFactory",
    "attention_error",
    "channel_magnitude",
    "collect_kv",
]


def collect_kv(model: Llama, ids: Tensor | Sequence[int]) -> list[tuple[Tensor, Tensor]]:
    """Keys (after RoPE) and values of every layer for ``ids: (N,)``: a list of ``(K, V)``, each
    ``(1, H_kv, N, D)``, from one prefill into full-precision caches. Raises ``ValueError`` for ids as
    :func:`refimpl.llm.perplexity.token_ids` (at least one token)."""
    ids = token_ids(model, ids, min_tokens=1)
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


class LayerFactory:
    """A cache factory that gives layer ``i`` the cache of ``overrides[i]`` and every other layer ``default()``.

    :func:`refimpl.llm.cache.make_caches` (which every evaluation uses) calls a factory once per layer, in layer
    order, for each row; this factory counts its calls and cycles through the ``n_layers`` layers, so one
    object serves any number of rows. ``n_layers`` must be the model's layer count. Raises ``ValueError`` for
    ``n_layers < 1`` or a layer index outside ``[0, n_layers)``, ``TypeError`` for a factory that is not
    callable.
    """

    def __init__(self, n_layers: int, default: CacheFactory, overrides: Mapping[int, CacheFactory]) -> None:
        self.n_layers = check_positive_int("n_layers", n_layers)
        for name, f in [("default", default), *((f"overrides[{i}]", f) for i, f in overrides.items())]:
            if not callable(f):
                raise TypeError(f"{name} must be a callable returning a KVCache, got {f!r}")
        self.overrides = {check_int("layer", i, min_value=0, max_value=n_layers - 1): f for i, f in overrides.items()}
        self.default = default
        self._calls = 0

    def __call__(self) -> KVCache:
        layer = self._calls % self.n_layers
        self._calls += 1
        return self.overrides.get(layer, self.default)()


class AttentionErrorProbe(KVCache):
    """One layer's cache that follows the exact model and measures what another cache would change.

    Every step's keys and values go to a :class:`~refimpl.llm.cache.FullCache` and to ``cache``; :meth:`attend`
    returns the exact attention output ``o`` (so the model's trajectory, and every later layer's input, stay
    exact) and also computes ``o' = cache.attend(...)``. For the queries at positions ``>= start`` it adds up,
    per query head, ``sum ||o' - o||^2`` (``err_sq``) and ``sum ||o||^2`` (``ref_sq``), each ``(H_q,)``:
    the error this layer's cache alone introduces into its attention output, given exact inputs.
    """

    def __init__(self, cache: KVCache, start: int = 0) -> None:
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
        self.exact, self.cache = FullCache(), cache
        self.start = check_int("start", start, min_value=0)
        self.err_sq: Tensor | None = None  # (H_q,) float64
        self.ref_sq: Tensor | None = None

    def update(self, k: Tensor, v: Tensor, positions: Tensor) -> None:
        self.exact.update(k, v, positions)
        self.cache.update(k, v, positions)

    def attend(self, q: Tensor, q_positions: Tensor, scale: float) -> Tensor:
        out = self.exact.attend(q, q_positions, scale)  # (B, H_q, T_new, D)
        approx = self.cache.attend(q, q_positions, scale)  # always: a cache may observe its attention
        sel = q_positions >= self.start  # (T_new,)
        if self.err_sq is None:
            self.err_sq = torch.zeros(q.shape[1], dtype=torch.float64)
            self.ref_sq = torch.zeros(q.shape[1], dtype=torch.float64)
        if bool(sel.any()):
            o, d = out[:, :, sel].double(), (approx - out)[:, :, sel].double()
            self.err_sq += d.pow(2).sum((0, 2, 3))
            self.ref_sq += o.pow(2).sum((0, 2, 3))
        return out

    def prefill_key(self) -> Hashable | None:
        return FULL_PRECISION_PREFILL  # it returns the exact attention

    def keys_values(self) -> tuple[Tensor, Tensor]:
        return self.exact.keys_values()

    def key_positions(self) -> Tensor:
        return self.exact.key_positions()

    def nbytes(self) -> int:
        return self.cache.nbytes()

    def __len__(self) -> int:
        return len(self.exact)


@dataclass(frozen=True)
class AttentionError:
    """Squared attention-output errors of a cache, per layer and KV head: ``err_sq``, ``ref_sq``: ``(L, H_kv)``
    float64 (sums over the KV head's query heads, the evaluated queries and the head dimension)."""

    err_sq: Tensor
    ref_sq: Tensor

    @property
    def per_head(self) -> Tensor:
        """Relative error ``||O' - O||_F / ||O||_F`` of each layer's KV-head group, ``(L, H_kv)``."""
        return (self.err_sq / self.ref_sq).sqrt()

    @property
    def per_layer(self) -> Tensor:
        """Relative error of each layer's attention output (all heads), ``(L,)``."""
        return (self.err_sq.sum(1) / self.ref_sq.sum(1)).sqrt()


def attention_error(model: Llama, ids: Tensor, cache: CacheFactory, prefill: int) -> AttentionError:
    """Which layers and KV heads a cache's error comes from, from one teacher-forced pass.

    ``ids``: ``(N,)`` or ``S`` texts ``(S, N)``, consumed as :func:`refimpl.llm.perplexity.evaluate_many` does
    (``prefill`` tokens in one call, then one token per step). Each layer holds an :class:`AttentionErrorProbe`
    around ``cache()``: the model follows the exact trajectory, and each layer's attention output over its
    ``cache()`` is compared with the exact one for the decoded queries (positions ``>= prefill``). So layer
    ``l``'s error is the error its own cache introduces given exact inputs, not the error propagated from the
    layers below. Errors as :func:`~refimpl.llm.perplexity.evaluate_many`; ``ValueError`` if no token is
    decoded (``prefill >= N - 1``).
    """
    n = ids.shape[-1] if isinstance(ids, Tensor) else len(ids)
    if prefill >= n - 1:
        raise ValueError(f"prefill must leave decoded tokens (< N - 1 = {n - 1}), got {prefill}")
    result = evaluate_many(model, ids, {"probe": lambda: AttentionErrorProbe(cache(), start=prefill)}, prefill)
    err, ref = [], []
    for layer in result["probe"].caches:
        probes = layer.caches if isinstance(layer, RowCaches) else [layer]
        err.append(sum(p.err_sq for p in probes))
        ref.append(sum(p.ref_sq for p in probes))
    h_kv = model.config.n_kv_heads
    # query head h reads KV head h // (H_q / H_kv): sum the group's query heads
    err_sq, ref_sq = (torch.stack(x).view(len(x), h_kv, -1).sum(-1) for x in (err, ref))  # (L, H_kv)
    return AttentionError(err_sq, ref_sq)
