"""Perplexity of the model on a token sequence, with a KV-cache policy in the loop.

Perplexity is ``exp(mean NLL)``, the NLL of token ``t+1`` given tokens ``0..t``:
``PPL = exp(-1/(N-1) * sum_t log p(x_{t+1} | x_{<=t}))``.

To measure what a cache policy costs, the model must *consume* the text the way it would at inference: the
first ``prefill`` tokens in one forward pass, then the rest one token (``step`` tokens) per decode step, each
step attending over whatever the cache kept (dequantized codes, the surviving tokens). So a policy's
compression of early tokens changes the predictions of all later ones, as in the evaluations of KIVI
(Liu et al. 2024) and StreamingLLM (Xiao et al. 2024). With the full-precision cache the result equals the
one-shot evaluation (:func:`evaluate_one_shot`) up to float rounding; a test checks it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from refimpl._checks import check_int, check_positive_int, check_tensor
from refimpl.llm.cache import KVCache
from refimpl.llm.generate import _fresh_caches
from refimpl.llm.model import AttnFn, Llama

__all__ = ["PerplexityResult", "evaluate", "evaluate_one_shot", "token_nll"]

_HEAD_CHUNK = 256  # output-head rows at a time: bounds the (chunk, V) logits buffer


@dataclass
class PerplexityResult:
    """Result of a perplexity evaluation.

    ``nll``: mean negative log-likelihood in nats/token over the ``n_tokens`` predicted tokens;
    ``perplexity = exp(nll)``; ``nll_per_token: (n_tokens,)`` float64, entry ``t`` is the NLL of token
    ``t+1``; ``cache_bytes``: the caches' :meth:`~refimpl.llm.cache.KVCache.nbytes` summed over layers at the
    end (``peak_cache_bytes``: the largest sum seen after any step); ``tokens_per_s``: tokens fed through the
    model per second of wall time.
    """

    nll: float
    perplexity: float
    n_tokens: int
    cache_bytes: int
    tokens_per_s: float
    seconds: float
    nll_per_token: Tensor
    cache: str
    prefill: int
    peak_cache_bytes: int


def token_nll(model: Llama, h: Tensor, targets: Tensor) -> Tensor:
    """NLL (nats) of ``targets: (T,)`` under the output head applied to hidden states ``h: (T, d_model)``.

    ``-log softmax(h E^T)[t, targets[t]] = logsumexp(logits_t) - logits_t[target]``; float64 result ``(T,)``.
    The head is applied in chunks of rows so the ``(T, V)`` logits never exist at once.
    """
    out = torch.empty(h.shape[0], dtype=torch.float64)
    for s in range(0, h.shape[0], _HEAD_CHUNK):
        logits = model.logits(h[s : s + _HEAD_CHUNK]).double()  # (chunk, V)
        tgt = targets[s : s + _HEAD_CHUNK, None]
        out[s : s + _HEAD_CHUNK] = torch.logsumexp(logits, -1) - logits.gather(-1, tgt)[:, 0]
    return out


def _as_ids(model: Llama, ids: Tensor | Sequence[int]) -> Tensor:
    if not isinstance(ids, Tensor):
        ids = torch.tensor([int(i) for i in ids], dtype=torch.long)
    check_tensor("ids", ids, ndim=1, dtypes=[torch.int64, torch.int32])
    n = ids.shape[0]
    if n < 2:
        raise ValueError(f"ids must hold at least 2 tokens (one to predict), got {n}")
    if n - 1 > model.config.max_seq_len:
        raise ValueError(f"ids ({n} tokens) exceed the model's max_seq_len={model.config.max_seq_len} + 1")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= model.config.vocab_size:
        raise ValueError(f"token ids must be in [0, {model.config.vocab_size}), got {lo if lo < 0 else hi}")
    return ids.long()


def _result(nll: Tensor, seconds: float, fed: int, cache: str, prefill: int, nbytes: int, peak: int) -> Any:
    mean = float(nll.mean())
    return PerplexityResult(
        nll=mean,
        perplexity=math.exp(mean),
        n_tokens=nll.shape[0],
        cache_bytes=nbytes,
        tokens_per_s=fed / max(seconds, 1e-9),
        seconds=seconds,
        nll_per_token=nll,
        cache=cache,
        prefill=prefill,
        peak_cache_bytes=peak,
    )


def evaluate(
    model: Llama,
    ids: Tensor | Sequence[int],
    cache: str | Sequence[KVCache] = "full",
    prefill: int = 1,
    cache_kwargs: dict[str, Any] | None = None,
    step: int = 1,
) -> PerplexityResult:
    """Perplexity of ``ids: (N,)`` consumed through a KV-cache policy: prefill, then decode.

    The first ``prefill`` tokens go through the model in one call (their keys/values enter the cache); then
    tokens ``prefill .. N-2`` are fed ``step`` at a time (``step=1``: token-by-token decoding), each call
    attending over the cache. Every token ``1 .. N-1`` is predicted once: ``n_tokens = N - 1``.

    ``cache``: a policy name of :data:`refimpl.llm.cache.CACHE_NAMES` (built with ``cache_kwargs``) or one
    fresh cache object per layer. Raises ``ValueError`` for fewer than 2 ids, ids outside the vocabulary,
    more than ``max_seq_len + 1`` ids, ``prefill`` outside ``[1, N]``, or an unknown cache name.
    """
    ids = _as_ids(model, ids)
    n = ids.shape[0]
    prefill = check_int("prefill", prefill, min_value=1, max_value=n)
    step = check_positive_int("step", step)
    caches = _fresh_caches(model, cache, cache_kwargs)
    name = cache if isinstance(cache, str) else type(caches[0]).__name__
    nll = torch.empty(n - 1, dtype=torch.float64)

    t0 = time.perf_counter()
    p = min(prefill, n - 1)  # tokens fed in the prefill call (the last token is never fed: nothing to predict)
    h = model.hidden(ids[None, :p], caches, 0)[0]  # (p, d)
    nll[:p] = token_nll(model, h, ids[1 : p + 1])
    peak = sum(c.nbytes() for c in caches)
    pos = p
    while pos < n - 1:
        end = min(pos + step, n - 1)
        h = model.hidden(ids[None, pos:end], caches, pos)[0]  # (end - pos, d)
        nll[pos:end] = token_nll(model, h, ids[pos + 1 : end + 1])
        peak = max(peak, sum(c.nbytes() for c in caches))
        pos = end
    seconds = time.perf_counter() - t0
    return _result(nll, seconds, n - 1, name, prefill, sum(c.nbytes() for c in caches), peak)


def evaluate_one_shot(model: Llama, ids: Tensor | Sequence[int], attn_fn: AttnFn | None = None) -> PerplexityResult:
    """Perplexity of ``ids: (N,)`` from one causal forward pass over tokens ``0 .. N-2`` (no cache).

    ``attn_fn`` replaces the attention of the cache-less path (see :meth:`Llama.forward`). The result has
    ``cache="none"`` and ``cache_bytes=0``. Errors as :func:`evaluate`.
    """
    ids = _as_ids(model, ids)
    n = ids.shape[0]
    t0 = time.perf_counter()
    h = model.hidden(ids[None, : n - 1], None, 0, attn_fn)[0]  # (N-1, d)
    nll = token_nll(model, h, ids[1:])
    seconds = time.perf_counter() - t0
    return _result(nll, seconds, n - 1, "none", n - 1, 0, 0)
