"""The KV-cache interface of the book's LLM, and the full-precision cache.

One :class:`KVCache` object serves one decoder layer. Per step the model calls, for every layer:

1. ``cache.update(k, v, positions)`` with this step's keys (already rotated by RoPE) and values,
   ``k, v: (B, H_kv, T_new, D)``, ``positions: (T_new,)`` absolute token positions;
2. ``out = cache.attend(q, q_positions, scale)`` with the step's queries ``q: (B, H_q, T_new, D)``,
   which returns ``(B, H_q, T_new, D)``.

The default :meth:`KVCache.attend` is exact softmax attention (grouped-query: ``H_q`` is a multiple of ``H_kv``
and query head ``h`` reads KV head ``h // (H_q // H_kv)``) over what :meth:`KVCache.keys_values` returns, masked
by position: query at position ``p`` sees cached tokens at positions ``<= p``. Because the mask comes from the
stored positions, a cache may hold any subset of past tokens (eviction) or any representation of them
(quantization) and attention stays correct, including a multi-token prefill.

A cache subclass chooses how tokens are stored:

* a quantized cache (KIVI) stores packed codes and overrides :meth:`keys_values` to dequantize;
* an evicting cache (Scissorhands, H2O, ...) sets ``needs_attention = True`` and receives each step's attention
  weights in :meth:`observe`; it drops tokens and keeps each kept token's original position in
  :meth:`key_positions` (per head if it evicts per head: shape ``(B, H_kv, T)``).

:meth:`nbytes` reports the bytes of the tensors the cache actually holds (codes, scales, buffers, positions
excluded by convention since every policy needs them equally; subclasses say what they count).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import Tensor

from refimpl._checks import check_choice, check_int, check_tensor

__all__ = [
    "CACHE_NAMES",
    "FullCache",
    "KVCache",
    "check_step",
    "grouped_attention",
    "make_caches",
]


def grouped_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_positions: Tensor,
    k_positions: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Softmax attention with grouped-query heads and a position mask; returns ``(out, weights)``.

    ``softmax(q k^T * scale + mask) v`` (Vaswani et al. 2017, eq. 1) where ``mask = -inf`` wherever the key's
    position exceeds the query's (causal by position, so it holds for caches that dropped tokens).

    Shapes: ``q: (B, H_q, T_q, D)``, ``k, v: (B, H_kv, T_k, D)``, ``q_positions: (T_q,)``,
    ``k_positions: (T_k,)`` or ``(B, H_kv, T_k)``. Returns ``out: (B, H_q, T_q, D)`` and
    ``weights: (B, H_q, T_q, T_k)``. A query that sees no key gets zero output (no NaN).
    """
    b, h_q, t_q, d = q.shape
    h_kv, t_k = k.shape[1], k.shape[2]
    g = h_q // h_kv  # query heads per KV head
    # the G query heads of a group share one KV head: stack their queries as rows, one matmul per KV head
    qg = q.reshape(b, h_kv, g * t_q, d)  # (B, H_kv, G*T_q, D)
    scores = (torch.matmul(qg, k.transpose(-1, -2)) * scale).view(b, h_kv, g, t_q, t_k)  # (B, H_kv, G, T_q, T_k)
    kp = k_positions if k_positions.dim() == 1 else k_positions.unsqueeze(2).unsqueeze(3)  # (.., 1, 1, T_k)
    visible = kp <= q_positions.view(-1, 1)  # (T_q, T_k) or (B, H_kv, 1, T_q, T_k)
    if bool(visible.all()):  # e.g. a decode step: every cached token is in the past
        weights = torch.softmax(scores, dim=-1)
    else:
        weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        weights = torch.nan_to_num(weights, nan=0.0)  # rows with no visible key: all -inf -> NaN -> 0
    out = torch.matmul(weights.view(b, h_kv, g * t_q, t_k), v)  # (B, H_kv, G*T_q, D)
    return out.view(b, h_q, t_q, d), weights.view(b, h_q, t_q, t_k)


class KVCache:
    """Base class of a one-layer KV cache; see the module docstring for the protocol.

    Subclasses implement :meth:`update`, :meth:`keys_values`, :meth:`key_positions`, :meth:`nbytes` and
    ``__len__``; evicting caches also set ``needs_attention = True`` and implement :meth:`observe`.
    """

    #: ``True`` if :meth:`attend` must pass each step's attention weights to :meth:`observe`.
    needs_attention: bool = False

    def update(self, k: Tensor, v: Tensor, positions: Tensor) -> None:
        """Store this step's keys/values ``(B, H_kv, T_new, D)`` at absolute ``positions: (T_new,)``."""
        raise NotImplementedError

    def keys_values(self) -> tuple[Tensor, Tensor]:
        """Return what attention attends over: keys and values, each ``(B, H_kv, T, D)``, in compute dtype."""
        raise NotImplementedError

    def key_positions(self) -> Tensor:
        """Absolute positions of the cached tokens, ``(T,)`` or per head ``(B, H_kv, T)``, in the order of
        :meth:`keys_values`."""
        raise NotImplementedError

    def observe(self, weights: Tensor, q_positions: Tensor) -> None:
        """Receive this step's attention weights ``(B, H_q, T_new, T)`` (columns in cache order)."""

    def nbytes(self) -> int:
        """Bytes of the tensors this cache holds for keys and values (storage actually allocated for them)."""
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def attend(self, q: Tensor, q_positions: Tensor, scale: float) -> Tensor:
        """Attention of queries ``q: (B, H_q, T_new, D)`` at ``q_positions: (T_new,)`` over the cache."""
        k, v = self.keys_values()
        out, weights = grouped_attention(q, k, v, q_positions, self.key_positions(), scale)
        if self.needs_attention:
            self.observe(weights, q_positions)
        return out

    def truncate(self, length: int) -> None:
        """Forget every token after the first ``length`` (a rollback, e.g. of rejected speculative tokens).

        Optional: the base class raises ``NotImplementedError``; a cache that compressed or evicted tokens
        cannot always restore an earlier state.
        """
        raise NotImplementedError(f"{type(self).__name__} does not support truncate()")


class FullCache(KVCache):
    """The full-precision cache: every token, in the dtype it arrives in.

    Storage grows by doubling a preallocated buffer (amortized O(1) append; a decode step writes one token in
    place, no per-step reallocation of the whole cache); ``capacity`` sets the first allocation, so a cache
    sized to the longest context never reallocates. :meth:`nbytes` counts the filled part of the key and value
    buffers, i.e. ``2 * B * H_kv * T * D * itemsize`` bytes, the quantity the roofline chapter calls the
    KV-cache size.

    :meth:`attend` computes the same attention as :func:`grouped_attention` with PyTorch's fused
    ``scaled_dot_product_attention`` (one operation instead of about ten, which matters at batch-1 decode,
    where a step is 30 layers of small operations); a subclass that sets ``needs_attention`` gets the
    base class's attention and its weights.
    """

    def __init__(self, capacity: int = 256) -> None:
        self._capacity = max(int(capacity), 1)
        self._k: Tensor | None = None  # (B, H_kv, capacity, D)
        self._v: Tensor | None = None
        self._pos: Tensor | None = None  # (capacity,)
        self._len = 0

    def _grow(self, like: Tensor, needed: int) -> None:
        b, h, _, d = like.shape
        cap = self._capacity
        while cap < needed:
            cap *= 2
        k = like.new_empty(b, h, cap, d)
        v = like.new_empty(b, h, cap, d)
        pos = torch.empty(cap, dtype=torch.long, device=like.device)
        if self._k is not None:
            k[:, :, : self._len] = self._k[:, :, : self._len]
            v[:, :, : self._len] = self._v[:, :, : self._len]
            pos[: self._len] = self._pos[: self._len]
        self._k, self._v, self._pos, self._capacity = k, v, pos, cap

    def update(self, k: Tensor, v: Tensor, positions: Tensor) -> None:
        t_new = k.shape[2]
        end = self._len + t_new
        if self._k is None or end > self._capacity or self._k.shape[:2] != k.shape[:2]:
            if self._k is not None and self._k.shape[:2] != k.shape[:2]:
                raise ValueError(
                    f"k must keep batch and KV-head sizes {tuple(self._k.shape[:2])}, got {tuple(k.shape[:2])}"
                )
            self._grow(k, end)
        self._k[:, :, self._len : end] = k
        self._v[:, :, self._len : end] = v
        self._pos[self._len : end] = positions
        self._len = end

    def keys_values(self) -> tuple[Tensor, Tensor]:
        if self._k is None:
            raise RuntimeError("the cache is empty: call update() before keys_values()")
        return self._k[:, :, : self._len], self._v[:, :, : self._len]

    def key_positions(self) -> Tensor:
        if self._pos is None:
            raise RuntimeError("the cache is empty: call update() before key_positions()")
        return self._pos[: self._len]

    def nbytes(self) -> int:
        if self._k is None:
            return 0
        b, h, _, d = self._k.shape
        return 2 * b * h * self._len * d * self._k.element_size()

    def attend(self, q: Tensor, q_positions: Tensor, scale: float) -> Tensor:
        if self.needs_attention:  # a subclass that observes the weights
            return super().attend(q, q_positions, scale)
        k, v = self.keys_values()
        visible = self.key_positions() <= q_positions[:, None]  # (T_q, T_k): causal by position
        # a query that sees no key gets zero output, as in grouped_attention (a test checks it)
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=visible, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )

    def truncate(self, length: int) -> None:
        length = check_int("length", length, min_value=0, max_value=self._len)
        self._len = length  # the buffers keep their capacity; later updates overwrite the dropped tokens

    def __len__(self) -> int:
        return self._len


# Cache policies by name, for `make_caches` and the command line (`--cache NAME`). Each entry is
# (module, class, default keyword arguments); modules are imported only when a name is used.
CACHE_NAMES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "full": ("refimpl.llm.cache", "FullCache", {}),
    "kivi2": ("refimpl.kivi", "KIVICache", {"bits": 2}),
    "kivi4": ("refimpl.kivi", "KIVICache", {"bits": 4}),
    "scissorhands": ("refimpl.eviction", "ScissorhandsCache", {}),
    "h2o": ("refimpl.eviction", "H2OCache", {}),
    "streamingllm": ("refimpl.eviction", "StreamingLLMCache", {}),
    "window": ("refimpl.eviction", "SlidingWindowCache", {}),
}


def make_caches(name: str, n_layers: int, **kwargs: Any) -> list[KVCache]:
    """Build one cache per layer of the policy registered as ``name`` in :data:`CACHE_NAMES`.

    ``kwargs`` override the policy's defaults (e.g. ``budget=128``). Raises ``ValueError`` for an unknown name.
    """
    check_choice("cache name", name, CACHE_NAMES)
    module, cls_name, defaults = CACHE_NAMES[name]
    cls = getattr(importlib.import_module(module), cls_name)
    return [cls(**{**defaults, **kwargs}) for _ in range(n_layers)]


def check_step(k: Tensor, v: Tensor, positions: Tensor) -> None:
    """Validate one step's ``k, v: (B, H_kv, T_new, D)`` and ``positions: (T_new,)`` (for cache subclasses)."""
    check_tensor("k", k, ndim=4, floating=True)
    check_tensor("v", v, ndim=4, floating=True)
    check_tensor("positions", positions, ndim=1)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if positions.shape[0] != k.shape[2]:
        raise ValueError(f"positions must have length T_new={k.shape[2]}, got {positions.shape[0]}")
