"""Perplexity of the model on a token sequence, with KV-cache policies in the loop: the book's one evaluation path.

Perplexity is ``exp(mean NLL)``, the NLL of token ``t+1`` given tokens ``0..t``:
``PPL = exp(-1/(N-1) * sum_t log p(x_{t+1} | x_{<=t}))``.

To measure what a cache policy costs, the model must *consume* the text the way it would at inference: the
first ``prefill`` tokens in one forward pass, then the rest one token (``step`` tokens) per decode step, each
step attending over whatever the cache kept (dequantized codes, the surviving tokens). So a policy's
compression of early tokens changes the predictions of all later ones, as in the evaluations of KIVI
(Liu et al. 2024) and StreamingLLM (Xiao et al. 2024). With the full-precision cache the result equals the
one-shot evaluation (:func:`evaluate_one_shot`) up to float rounding; a test checks it.

:func:`evaluate_many` runs several cache configurations at once, as the rows of one batch (:class:`RowCaches`
gives each row its own caches): decoding is memory-bound, so one step reads every weight once for all rows.
Configurations whose caches promise the same prefill (:meth:`~refimpl.llm.cache.KVCache.prefill_key`) share
one prefill pass. The KIVI and Scissorhands chapters, their benchmarks and the command line all use it;
:func:`evaluate` is the one-configuration case.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from refimpl._checks import check_int, check_positive_int, check_tensor
from refimpl.display import progress
from refimpl.llm.cache import CacheFactory, FullCache, KVCache, make_caches
from refimpl.llm.model import AttnFn, Llama

__all__ = [
    "Increase",
    "PerplexityResult",
    "RowCaches",
    "evaluate",
    "evaluate_many",
    "evaluate_one_shot",
    "paired_increase",
    "token_ids",
    "token_nll",
]

_HEAD_CHUNK = 256  # output-head rows at a time: bounds the (chunk, V) logits buffer


@dataclass
class PerplexityResult:
    """Result of a perplexity evaluation of one cache configuration.

    ``nll``: mean negative log-likelihood in nats/token over the ``n_tokens`` predicted tokens;
    ``perplexity = exp(nll)``; ``nll_per_token: (N-1,)`` float64 (``(S, N-1)`` for ``S`` texts evaluated
    together), entry ``t`` is the NLL of token ``t+1``. ``cache`` is the configuration's label, ``prefill``
    the tokens fed in the first call. The cache statistics are taken after the prefill and after every decode
    call: ``cache_tokens`` lists the tokens held per layer (mean over layers and texts; per KV head for an
    evicting cache), ``mean_cache_tokens`` and ``mean_cache_bytes`` average them, ``peak_cache_bytes`` is the
    largest :meth:`~refimpl.llm.cache.KVCache.nbytes` sum over layers (and texts) and ``cache_bytes`` the sum
    at the end. ``caches`` are the per-layer caches at the end (empty for a one-shot run).
    ``seconds``/``tokens_per_s``: wall time of the whole run and the tokens fed through the model per second
    (all rows of a batched run).
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
    mean_cache_bytes: float = 0.0
    mean_cache_tokens: float = 0.0
    cache_tokens: list[float] = field(default_factory=list)
    caches: list[KVCache] = field(default_factory=list, repr=False)

    def decode_perplexity(self, start: int | None = None) -> float:
        """``exp(mean NLL)`` of the tokens predicted from position ``start`` on (default ``prefill``: the decoded
        tokens, where a cache policy acts), over all texts. Raises ``ValueError`` if no token is predicted
        from there."""
        start = self.prefill if start is None else start
        n = self.nll_per_token.shape[-1]
        if not 0 <= start < n:
            raise ValueError(f"start must be in [0, {n}) (a predicted token), got {start}")
        return math.exp(float(self.nll_per_token[..., start:].mean()))

    def slice_nll(self, start: int | None = None) -> Tensor:
        """Mean NLL per text of the tokens predicted from position ``start`` on (default ``prefill``): ``(S,)``
        float64 for ``S`` texts evaluated together, ``(1,)`` for one. Feed two configurations' values to
        :func:`paired_increase`. Raises ``ValueError`` as :meth:`decode_perplexity`."""
        start = self.prefill if start is None else start
        n = self.nll_per_token.shape[-1]
        if not 0 <= start < n:
            raise ValueError(f"start must be in [0, {n}) (a predicted token), got {start}")
        return self.nll_per_token.reshape(-1, n)[:, start:].mean(1)


@dataclass(frozen=True)
class Increase:
    """Relative perplexity increase over a baseline, per slice: mean and its standard error."""

    mean: float
    se: float
    per_slice: tuple[float, ...]

    def __str__(self) -> str:
        return f"{100 * self.mean:+.2f}% +- {100 * self.se:.2f}%"

    def beyond(self, k: float = 2.0) -> bool:
        """Whether the mean is more than ``k`` standard errors from zero: a ranking of the two configurations
        that is a finding rather than noise (``False`` for one slice, where the standard error is unknown)."""
        return not math.isnan(self.se) and abs(self.mean) > k * self.se


def paired_increase(nll: Tensor, base: Tensor) -> Increase:
    """``PPL / PPL_base - 1 = exp(nll - nll_base) - 1`` per slice (``nll, base: (S,)``, same slices), with
    the mean and the standard error ``std / sqrt(S)`` over the ``S`` slices (``se = nan`` for one slice).
    Pairing by slice removes the slices' own difficulty from the comparison."""
    check_tensor("nll", nll, ndim=1, floating=True)
    check_tensor("base", base, ndim=1, floating=True)
    if nll.shape != base.shape:
        raise ValueError(f"nll and base must score the same slices, got {tuple(nll.shape)} and {tuple(base.shape)}")
    check_positive_int("number of slices", nll.shape[0])
    inc = torch.expm1((nll - base).double())
    se = float(inc.std() / math.sqrt(inc.shape[0])) if inc.shape[0] > 1 else float("nan")
    return Increase(float(inc.mean()), se, tuple(inc.tolist()))


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


def token_ids(model: Llama, ids: Tensor | Sequence[int], min_tokens: int = 2) -> Tensor:
    """``ids`` as a 1-D LongTensor checked against ``model``: at least ``min_tokens`` ids (2 = one to predict),
    each in ``[0, vocab_size)``, at most ``max_seq_len + 1``. Raises ``ValueError`` (``TypeError`` for a tensor
    that is not 1-D integer) naming ``ids``."""
    if not isinstance(ids, Tensor):
        ids = torch.tensor([int(i) for i in ids], dtype=torch.long)
    check_tensor("ids", ids, ndim=1, dtypes=[torch.int64, torch.int32])
    n = ids.shape[0]
    if n < min_tokens:
        raise ValueError(f"ids must hold at least {min_tokens} tokens, got {n}")
    if n - 1 > model.config.max_seq_len:
        raise ValueError(f"ids ({n} tokens) exceed the model's max_seq_len={model.config.max_seq_len} + 1")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= model.config.vocab_size:
        raise ValueError(f"token ids must be in [0, {model.config.vocab_size}), got {lo if lo < 0 else hi}")
    return ids.long()


class RowCaches(KVCache):
    """One layer's cache for a batch whose row ``i`` is stored by ``caches[i]`` (each a batch-1 cache).

    ``update`` and ``attend`` split the batch along dim 0 and delegate; each member observes its own attention
    (if it needs to) inside its own ``attend``. ``nbytes`` is the members' sum, ``len`` the largest member.
    Raises ``ValueError`` for no caches or a batch that is not one row per cache, ``TypeError`` for a member
    that is not a :class:`KVCache`.
    """

    def __init__(self, caches: Sequence[KVCache]) -> None:
        self.caches = list(caches)
        if not self.caches:
            raise ValueError("caches must be a non-empty sequence of KVCache objects, got an empty one")
        if not all(isinstance(c, KVCache) for c in self.caches):
            raise TypeError(f"caches must be KVCache objects, got {[type(c).__name__ for c in self.caches]}")

    def _rows(self, x: Tensor, name: str) -> tuple[Tensor, ...]:
        if x.shape[0] != len(self.caches):
            raise ValueError(f"{name} must have batch size {len(self.caches)} (one row per cache), got {x.shape[0]}")
        return x.split(1, dim=0)

    def update(self, k: Tensor, v: Tensor, positions: Tensor) -> None:
        for c, kr, vr in zip(self.caches, self._rows(k, "k"), self._rows(v, "v")):
            c.update(kr, vr, positions)

    def attend(self, q: Tensor, q_positions: Tensor, scale: float) -> Tensor:
        return torch.cat([c.attend(qr, q_positions, scale) for c, qr in zip(self.caches, self._rows(q, "q"))])

    def keys_values(self) -> tuple[Tensor, Tensor]:
        """The rows' keys and values concatenated, ``(B, H_kv, T, D)``; ``ValueError`` if the rows hold
        different numbers of tokens (read ``caches[i]`` then)."""
        lengths = [len(c) for c in self.caches]
        if len(set(lengths)) > 1:
            raise ValueError(f"the rows hold different numbers of tokens {lengths}: read caches[i].keys_values()")
        kv = [c.keys_values() for c in self.caches]
        return torch.cat([k for k, _ in kv]), torch.cat([v for _, v in kv])

    def key_positions(self) -> Tensor:
        """The positions ``(T,)`` all rows hold; ``ValueError`` if they differ (read ``caches[i]`` then)."""
        pos = [c.key_positions() for c in self.caches]
        if not all(p.dim() == 1 and torch.equal(p, pos[0]) for p in pos):
            raise ValueError("the rows hold different token positions: read caches[i].key_positions()")
        return pos[0]

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.caches)

    def __len__(self) -> int:
        return max(len(c) for c in self.caches)


class _SharedPrefill(KVCache):
    """One prefill pass for caches with the same :meth:`~refimpl.llm.cache.KVCache.prefill_key`: every member
    stores the step; the attention output they promise to share is computed once, by the first member, and again
    only by a member that observes its attention weights (an evicting cache), whose output is checked against it."""

    def __init__(self, members: Sequence[KVCache]) -> None:
        self.members = list(members)

    def update(self, k: Tensor, v: Tensor, positions: Tensor) -> None:
        for m in self.members:
            m.update(k, v, positions)

    def attend(self, q: Tensor, q_positions: Tensor, scale: float) -> Tensor:
        out = self.members[0].attend(q, q_positions, scale)
        for m in self.members[1:]:
            if not m.needs_attention:  # attend() has no side effect but observe(): nothing to compute again
                continue
            # float32: the fused attention of FullCache and the explicit softmax of a cache that reads the weights
            # differ by a few 1e-6 over hundreds of tokens (3.3e-6 at 256 on SmolLM2); a real difference is larger
            if not torch.allclose(m.attend(q, q_positions, scale), out, rtol=1e-4, atol=1e-5):
                raise RuntimeError("caches with one prefill_key computed different prefill attention outputs")
        return out


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run torch with ``n`` intra-op threads inside the block (``None``: leave the setting), restored after."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _prefill_groups(rows: list[list[KVCache]], texts: list[int]) -> list[tuple[bool, list[int]]]:
    """``(shared, rows)`` pairs: rows of one text whose caches share a prefill key (two or more rows) form one
    shared group each; all other rows form one group prefilled side by side."""
    by_key: dict[Hashable, list[int]] = {}
    for i, caches in enumerate(rows):
        key = caches[0].prefill_key()
        if key is not None:
            by_key.setdefault((texts[i], key), []).append(i)
    groups = [(True, group) for group in by_key.values() if len(group) > 1]
    in_shared = {i for _, group in groups for i in group}
    rest = [i for i in range(len(rows)) if i not in in_shared]
    return groups + ([(False, rest)] if rest else [])


def evaluate_many(
    model: Llama,
    ids: Tensor | Sequence[int],
    caches: Mapping[str, CacheFactory],
    prefill: int = 1,
    step: int = 1,
    threads: int | None = None,
) -> dict[str, PerplexityResult]:
    """Perplexity of ``ids`` under each cache configuration of ``caches``, all decoded as rows of one batch.

    ``ids``: one text ``(N,)``, or ``S`` texts of equal length ``(S, N)`` (e.g. disjoint slices of a corpus, to
    put a standard error on a difference); every configuration runs on every text, one row each.
    ``caches`` maps a label to a factory of one layer's cache (``FullCache``, ``lambda: KIVICache(bits=4)``).
    The first ``prefill`` tokens go through the model in one call (their keys/values enter the caches); then
    tokens ``prefill .. N-2`` are fed ``step`` at a time (``step=1``: token-by-token decoding), each call
    attending over each row's caches. Every token ``1 .. N-1`` is predicted once.
    Rows of one text whose caches return the same :meth:`~refimpl.llm.cache.KVCache.prefill_key` share one
    prefill pass; the other rows are prefilled together as one batch. Each row computes what a run of its
    configuration on its text alone computes, up to the rounding of batched matmuls (a test checks it).
    The decode calls show a progress bar in JupyterLab (:func:`refimpl.display.progress`; nothing in the book
    build or without a terminal).
    ``threads``: torch intra-op threads for the run (restored after; ``None`` keeps the current setting; a
    decode step is thousands of small operations, for which one thread is often fastest on a CPU).

    Returns ``{label: PerplexityResult}`` in the order of ``caches``; for ``S`` texts its ``nll_per_token`` is
    ``(S, N-1)``, its byte counts sum the texts' caches and each of its ``caches`` is a :class:`RowCaches`
    whose row ``s`` holds text ``s``. Raises ``ValueError`` for no configurations, fewer than 2 ids, ids
    outside the vocabulary, more than ``max_seq_len + 1`` ids, ``prefill`` outside ``[1, N]`` or ``step < 1``;
    ``TypeError`` for a factory that does not make a KVCache.
    """
    if not caches:
        raise ValueError("caches must map at least one label to a cache factory, got an empty mapping")
    if isinstance(ids, Tensor) and ids.dim() not in (1, 2):
        raise ValueError(f"ids must be one text (N,) or S texts (S, N), got shape {tuple(ids.shape)}")
    if isinstance(ids, Tensor) and ids.dim() == 2:
        texts = torch.stack([token_ids(model, row) for row in ids])  # (S, N)
    else:
        texts = token_ids(model, ids)[None]  # (1, N)
    n_texts, n = texts.shape
    prefill = check_int("prefill", prefill, min_value=1, max_value=n)
    step = check_positive_int("step", step)
    if threads is not None:
        threads = check_positive_int("threads", threads)
    n_layers = model.config.n_layers
    labels = list(caches)
    rows = [make_caches(caches[label], n_layers) for label in labels for _ in range(n_texts)]  # [row][layer]
    text_of = [r % n_texts for r in range(len(rows))]  # row = label index * S + text index
    x = texts[text_of]  # (M, N): each row's text
    m = len(rows)
    nll = torch.empty(m, n - 1, dtype=torch.float64)
    held_tokens: list[list[float]] = [[] for _ in rows]
    held_bytes: list[list[int]] = [[] for _ in rows]

    def record() -> None:
        for i, row in enumerate(rows):
            held_tokens[i].append(sum(len(c) for c in row) / n_layers)
            held_bytes[i].append(sum(c.nbytes() for c in row))

    p = min(prefill, n - 1)  # tokens fed in the prefill call (the last token is never fed: nothing to predict)
    t0 = time.perf_counter()
    with _threads(threads):
        for shared_prefill, group in _prefill_groups(rows, text_of):
            if shared_prefill:  # one pass, fanned out to the group's caches
                shared = [_SharedPrefill([rows[i][layer] for i in group]) for layer in range(n_layers)]
                h = model.hidden(x[group[0], None, :p], shared, 0)[0]  # (p, d)
                nll[group, :p] = token_nll(model, h, x[group[0], 1 : p + 1])
            else:  # the group's rows side by side in one batch
                batched = [RowCaches([rows[i][layer] for i in group]) for layer in range(n_layers)]
                h = model.hidden(x[group, :p], batched, 0)  # (rows, p, d)
                for j, i in enumerate(group):
                    nll[i, :p] = token_nll(model, h[j], x[i, 1 : p + 1])
        record()
        layers = [RowCaches([row[layer] for row in rows]) for layer in range(n_layers)]
        starts = range(p, n - 1, step)  # each decode call feeds tokens pos .. min(pos + step, n - 1) - 1
        for pos in progress(starts, desc=f"decoding {m} rows", total=len(starts)):
            end = min(pos + step, n - 1)
            h = model.hidden(x[:, pos:end], layers, pos)  # (M, end - pos, d)
            targets = x[:, pos + 1 : end + 1].reshape(-1)
            nll[:, pos:end] = token_nll(model, h.reshape(-1, h.shape[-1]), targets).view(m, -1)
            record()
    seconds = time.perf_counter() - t0
    out = {}
    for j, label in enumerate(labels):
        mine = range(j * n_texts, (j + 1) * n_texts)
        tokens = [sum(held_tokens[i][t] for i in mine) / n_texts for t in range(len(held_tokens[0]))]
        nbytes = [sum(held_bytes[i][t] for i in mine) for t in range(len(held_bytes[0]))]
        per_token = nll[j * n_texts : (j + 1) * n_texts].clone()  # (S, N-1)
        mean = float(per_token.mean())
        out[label] = PerplexityResult(
            nll=mean,
            perplexity=math.exp(mean),
            n_tokens=per_token.numel(),
            cache_bytes=nbytes[-1],
            tokens_per_s=m * (n - 1) / max(seconds, 1e-9),
            seconds=seconds,
            nll_per_token=per_token if n_texts > 1 else per_token[0],
            cache=label,
            prefill=prefill,
            peak_cache_bytes=max(nbytes),
            mean_cache_bytes=sum(nbytes) / len(nbytes),
            mean_cache_tokens=sum(tokens) / len(tokens),
            cache_tokens=tokens,
            caches=rows[j] if n_texts == 1 else [RowCaches([rows[i][k] for i in mine]) for k in range(n_layers)],
        )
    return out


def evaluate(
    model: Llama,
    ids: Tensor | Sequence[int],
    cache: CacheFactory = FullCache,
    prefill: int = 1,
    step: int = 1,
    threads: int | None = None,
) -> PerplexityResult:
    """Perplexity of ``ids: (N,)`` consumed through one cache configuration: :func:`evaluate_many` with one row.

    ``cache``: a factory of one layer's cache (default the full-precision :class:`~refimpl.llm.cache.FullCache`);
    the result's ``cache`` label is its name. Errors as :func:`evaluate_many`.
    """
    label = getattr(cache, "__name__", type(cache).__name__)
    return evaluate_many(model, ids, {label: cache}, prefill=prefill, step=step, threads=threads)[label]


def evaluate_one_shot(model: Llama, ids: Tensor | Sequence[int], attn_fn: AttnFn | None = None) -> PerplexityResult:
    """Perplexity of ``ids: (N,)`` from one causal forward pass over tokens ``0 .. N-2`` (no cache).

    ``attn_fn`` replaces the attention of the cache-less path (see :meth:`Llama.forward`). The result has
    ``cache="none"`` and ``cache_bytes=0``. Errors as :func:`evaluate`.
    """
    ids = token_ids(model, ids)
    n = ids.shape[0]
    t0 = time.perf_counter()
    h = model.hidden(ids[None, : n - 1], None, 0, attn_fn)[0]  # (N-1, d)
    nll = token_nll(model, h, ids[1:])
    seconds = time.perf_counter() - t0
    mean = float(nll.mean())
    return PerplexityResult(
        nll=mean,
        perplexity=math.exp(mean),
        n_tokens=n - 1,
        cache_bytes=0,
        tokens_per_s=(n - 1) / max(seconds, 1e-9),
        seconds=seconds,
        nll_per_token=nll,
        cache="none",
        prefill=n - 1,
        peak_cache_bytes=0,
    )
