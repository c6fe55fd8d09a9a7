"""KV-cache eviction policies as caches for the book's LLM: Scissorhands, H2O, StreamingLLM, sliding window.

Every policy keeps at most ``budget`` tokens per layer and decides which tokens to drop. They share one
mechanism, :class:`EvictionCache`, and differ only in the *priority* they give each cached token:

============================  ==================================================  =====================
policy                        priority of a token (higher = kept)                 protected tokens
============================  ==================================================  =====================
:class:`ScissorhandsCache`    minus the number of the last ``w`` steps at which   the ``r`` most recent
                              its attention weight was below ``1/t``
:class:`H2OCache`             its attention weight accumulated over all steps     ``recent`` most recent
:class:`StreamingLLMCache`    its position (the oldest go first)                  ``sink_tokens`` first
:class:`SlidingWindowCache`   its position                                        none
============================  ==================================================  =====================

Granularity (the same for every policy): **per sequence and per KV head**. Each KV head of each sequence keeps
its own set of tokens, so :meth:`EvictionCache.key_positions` is ``(B, H_kv, T)``. With grouped-query
attention the ``G = H_q / H_kv`` query heads that read one KV head share its tokens, so a KV head sees the
*mean* of its group's attention weights (a probability distribution again, so the uniform level ``1/t`` keeps
its meaning). All heads hold the same number of tokens (they add and drop the same counts), which keeps the
storage a rectangular tensor.

Protocol (see :mod:`refimpl.llm.cache`): the model calls ``update(k, v, positions)``, then ``attend(q, ...)``,
which passes the step's attention weights to :meth:`EvictionCache.observe`. ``observe`` updates the policy's
statistics and, when the cache holds more than ``budget`` tokens, drops the lowest-priority unprotected
tokens. So between steps a cache holds at most ``budget`` tokens; within a step the ``T_new`` new tokens are
attended on top of them (the new token's own key is always needed to compute its attention).
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
from torch import Tensor

from refimpl._checks import check_choice, check_float, check_int, check_positive_int, check_tensor
from refimpl.llm.cache import FULL_PRECISION_PREFILL, KVCache, check_step, grouped_attention

__all__ = [
    "POSITIONS",
    "EvictionCache",
    "H2OCache",
    "ScissorhandsCache",
    "SlidingWindowCache",
    "StreamingLLMCache",
    "kv_head_attention",
]

#: Positions StreamingLLM's attention sees: in the cache (the paper's) or the original ones.
POSITIONS = ("in_cache", "original")


def kv_head_attention(weights: Tensor, h_kv: int) -> Tensor:
    """Attention seen by each KV head: the mean over its group of query heads.

    ``weights: (B, H_q, T_new, T)`` -> ``(B, H_kv, T_new, T)``. Query head ``h`` reads KV head ``h // G`` with
    ``G = H_q / H_kv`` (grouped-query attention, Ainslie et al. 2023), so the group of KV head ``j`` is query
    heads ``j*G .. j*G + G - 1``. Each row of the result still sums to 1 over the visible tokens.
    """
    check_tensor("weights", weights, ndim=4, floating=True)
    h_kv = check_positive_int("h_kv", h_kv)
    b, h_q, t_new, t = weights.shape
    if h_q % h_kv:
        raise ValueError(f"weights has H_q={h_q} heads, which is not a multiple of h_kv={h_kv}")
    return weights.view(b, h_kv, h_q // h_kv, t_new, t).mean(dim=2)


class EvictionCache(KVCache):
    """A KV cache of at most ``budget`` tokens per KV head; subclasses define which tokens to keep.

    Shared mechanism of every policy in this module (subclasses implement :meth:`_accumulate` and
    :meth:`_priority`, and may register per-token statistics with :meth:`_add_state`):

    1. :meth:`update` appends the step's keys, values and positions (and a zero column to each statistic);
    2. :meth:`observe` receives the step's attention weights, lets the policy update its statistics, and if
       the cache holds ``T > budget`` tokens, drops ``max(T - budget, drop)`` tokens: those of lowest priority
       among the unprotected ones (ties: the older token goes first). Protected: the ``recent`` most recent
       tokens and the tokens at positions ``< sink_tokens``.

    Storage is exactly the kept tokens: ``k, v: (B, H_kv, T, D)`` and positions ``(B, H_kv, T)`` in insertion
    (= position) order. With ``bits`` (2, 4 or 8) each token's keys and values are stored quantized instead, in
    groups of ``group_size`` channels of one token (KIVI's asymmetric quantizer, :func:`refimpl.kivi.quantize`
    with ``axis="token"``: codes plus an fp16 scale and zero point per group), so evicting a token removes
    exactly its bytes. :meth:`nbytes` counts the key and value storage held; :meth:`state_nbytes` counts the
    policy's statistics separately.

    Raises ``ValueError`` when ``budget`` is missing or too small: ``budget >= recent + sink_tokens +
    drop - 1`` is needed so that ``drop`` unprotected tokens exist when ``budget + 1`` are held.
    """

    needs_attention = True

    def __init__(
        self,
        budget: int | None,
        *,
        recent: int = 0,
        sink_tokens: int = 0,
        drop: int = 1,
        bits: int | None = None,
        group_size: int = 32,
    ) -> None:
        name = type(self).__name__
        if budget is None:
            raise ValueError(
                f"{name} needs budget=<tokens to keep per layer and KV head>, e.g. {name}(budget=128); got budget=None"
            )
        self.budget = check_positive_int("budget", budget)
        self.recent = check_int("recent", recent, min_value=0)
        self.sink_tokens = check_int("sink_tokens", sink_tokens, min_value=0)
        self.drop = check_positive_int("drop", drop)
        # When B + 1 tokens are held, `drop` of them must be unprotected: B + 1 - recent - sinks >= drop.
        need = self.recent + self.sink_tokens + self.drop - 1
        if self.budget < need:
            raise ValueError(
                f"budget must cover the protected tokens and leave room to drop {self.drop}: budget >= "
                f"recent ({self.recent}) + sink_tokens ({self.sink_tokens}) + drop ({self.drop}) - 1 = "
                f"{need}, got budget={self.budget}"
            )
        if bits is not None:
            from refimpl.kivi.quant import check_packing  # only a quantized cache needs the KIVI module

            group_size = check_packing(bits, group_size)
        self.bits, self.group_size = bits, group_size
        self._store: dict[str, Tensor] = {}  # what is held per token, token axis 2: k, v or their codes
        self._dtype: torch.dtype | None = None  # dtype the keys and values arrived in
        self._pos: Tensor | None = None  # (B, H_kv, T) original positions
        self._shape: tuple[int, int, int] | None = None  # (B, H_kv, D), fixed by the first update
        self._state: dict[str, Tensor] = {}  # per-token statistics, token axis last: (B, H_kv, ..., T)
        self._state_shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self.last_position = -1  # position of the newest token added
        self.tokens_seen = 0  # tokens ever added
        self.tokens_evicted = 0  # tokens ever dropped

    def prefill_key(self) -> Hashable | None:
        """Full-precision storage: the prefill attends over every token exactly as the full cache does (eviction
        comes after the step's attention). Quantized storage: the same for the same ``bits`` and
        ``group_size``."""
        return FULL_PRECISION_PREFILL if self.bits is None else ("quantized", self.bits, self.group_size)

    # ---- hooks for the policies ----

    def _add_state(self, name: str, inner: tuple[int, ...] = (), dtype: torch.dtype = torch.float32) -> None:
        """Register a per-token statistic of shape ``(B, H_kv, *inner, T)`` (created at the first update)."""
        self._state_shapes[name] = (inner, dtype)

    def _accumulate(self, a: Tensor, q_positions: Tensor) -> None:
        """Update statistics from this step's KV-head attention ``a: (B, H_kv, T_new, T)``."""

    def _priority(self) -> Tensor:
        """Priority of each cached token, ``(B, H_kv, T)``; the lowest are dropped first."""
        raise NotImplementedError

    # ---- storage: full precision, or KIVI's per-token group quantization ----

    def _encode(self, k: Tensor, v: Tensor) -> dict[str, Tensor]:
        """What is held for new tokens ``k, v: (B, H_kv, T_new, D)``; each entry's token axis is dim 2."""
        if self.bits is None:
            return {"k": k, "v": v}  # update() copies them (cat, or clone on the first step)
        from refimpl.kivi.quant import quantize

        out = {}
        for name, x in (("k", k), ("v", v)):
            # Per-token groups (KIVI sec. 3.1, axis="token"): each token is quantized on its own, so evicting
            # a token removes exactly its codes, scales and zero points.
            q = quantize(x, self.bits, self.group_size, "token")  # codes (B, H, T, D/G, G*bits/8)
            out[f"{name}_codes"], out[f"{name}_scale"], out[f"{name}_zero"] = q.codes, q.scale, q.zero
        return out

    def _decode(self, name: str) -> Tensor:
        if self.bits is None:
            return self._store[name]
        from refimpl.kivi.quant import QuantizedTensor, dequantize

        st = self._store
        q = QuantizedTensor(
            st[f"{name}_codes"], st[f"{name}_scale"], st[f"{name}_zero"], self.bits, self.group_size, "token",
            self._dtype,
        )  # fmt: skip
        return dequantize(q)  # (B, H_kv, T, D)

    # ---- the KVCache protocol ----

    def update(self, k: Tensor, v: Tensor, positions: Tensor) -> None:
        check_step(k, v, positions)
        b, h, t_new, d = k.shape
        positions = positions.to(device=k.device, dtype=torch.long)
        if t_new > 1 and not bool((positions[1:] > positions[:-1]).all()):
            raise ValueError(f"positions must be strictly increasing, got {positions.tolist()}")
        first, last = positions[[0, -1]].tolist()
        if self.bits is not None and d % self.group_size:
            raise ValueError(f"head dimension D={d} must be a multiple of group_size={self.group_size}")
        pos = positions.view(1, 1, t_new).expand(b, h, t_new)  # (B, H_kv, T_new)
        new = self._encode(k, v)
        if self._pos is None:
            self._store = {name: x.clone() for name, x in new.items()}  # own storage, exactly what is held
            self._pos, self._shape = pos.clone(), (b, h, d)
            for name, (inner, dtype) in self._state_shapes.items():
                self._state[name] = torch.zeros(b, h, *inner, t_new, dtype=dtype, device=k.device)
        else:
            if (b, h, d) != self._shape:
                raise ValueError(f"k must keep (B, H_kv, D) = {self._shape} of the cache, got {tuple(k.shape)}")
            if first <= self.last_position:
                raise ValueError(
                    f"positions must follow the cached ones (last {self.last_position}), got {positions.tolist()}"
                )
            self._store = {name: torch.cat([x, new[name]], dim=2) for name, x in self._store.items()}
            self._pos = torch.cat([self._pos, pos], dim=2)
            for name, s in self._state.items():  # new tokens start with empty statistics
                self._state[name] = torch.cat([s, s.new_zeros(*s.shape[:-1], t_new)], dim=-1)
        self._dtype = k.dtype
        self.last_position = last
        self.tokens_seen += t_new

    def observe(self, weights: Tensor, q_positions: Tensor) -> None:
        """Update the policy's statistics with this step's attention, then evict down to the budget.

        ``weights: (B, H_q, T_new, T)``, columns in cache order; ``q_positions: (T_new,)``.
        """
        if self._pos is None:
            raise RuntimeError("observe() called on an empty cache: call update() first")
        b, h_kv, t = self._pos.shape
        check_tensor("weights", weights, ndim=4, floating=True)
        if weights.shape[0] != b or weights.shape[3] != t or weights.shape[1] % h_kv:
            raise ValueError(
                f"weights must be (B={b}, H_q (multiple of {h_kv}), T_new, T={t}), got {tuple(weights.shape)}"
            )
        self._accumulate(kv_head_attention(weights, h_kv), q_positions.to(self._pos.device))
        if t > self.budget:
            self._evict(max(t - self.budget, self.drop))

    def _evict(self, n_drop: int) -> None:
        """Drop ``n_drop`` unprotected tokens of lowest priority from every (sequence, KV head)."""
        # The constructor's budget check guarantees n_drop unprotected tokens: T >= B + 1 >= recent + sinks + drop.
        t = self._pos.shape[-1]
        priority = self._priority().to(torch.float32, copy=True)  # (B, H_kv, T); exact for counts and positions
        if self.sink_tokens:
            priority.masked_fill_(self._pos < self.sink_tokens, float("inf"))  # attention sinks (Xiao et al.)
        if self.recent:
            priority[..., t - self.recent :] = float("inf")  # the most recent tokens
        # Ascending stable sort: lowest priority first; among equal priorities the older (earlier column) first.
        order = torch.sort(priority, dim=-1, stable=True).indices  # (B, H_kv, T)
        keep = order[..., n_drop:].sort(dim=-1).values  # (B, H_kv, T - n_drop), back in position order
        self._store = {name: _gather_tokens(x, keep, token_dim=2) for name, x in self._store.items()}
        self._pos = self._pos.gather(-1, keep)
        for name, s in self._state.items():
            self._state[name] = _gather_tokens(s, keep, token_dim=s.dim() - 1)
        self.tokens_evicted += n_drop

    def keys_values(self) -> tuple[Tensor, Tensor]:
        """Keys and values of the kept tokens, ``(B, H_kv, T, D)`` (dequantized if ``bits`` is set)."""
        if self._pos is None:
            raise RuntimeError("the cache is empty: call update() before keys_values()")
        return self._decode("k"), self._decode("v")

    def key_positions(self) -> Tensor:
        """Original positions of the kept tokens, ``(B, H_kv, T)``, increasing along ``T``."""
        if self._pos is None:
            raise RuntimeError("the cache is empty: call update() before key_positions()")
        return self._pos

    def nbytes(self) -> int:
        """Bytes of the key and value storage held: ``2 B H_kv T D`` elements, or codes, scales and zeros."""
        return sum(x.numel() * x.element_size() for x in self._store.values())

    def state_nbytes(self) -> int:
        """Bytes of the policy's per-token statistics (not counted in :meth:`nbytes`)."""
        return sum(s.numel() * s.element_size() for s in self._state.values())

    def __len__(self) -> int:
        return 0 if self._pos is None else self._pos.shape[-1]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(budget={self.budget}, recent={self.recent}, tokens={len(self)})"


def _gather_tokens(x: Tensor, keep: Tensor, token_dim: int) -> Tensor:
    """Select tokens ``keep: (B, H_kv, T')`` along ``token_dim`` of ``x: (B, H_kv, ..., T, ...)``."""
    shape = [1] * x.dim()
    shape[0], shape[1], shape[token_dim] = keep.shape
    index = keep.view(shape).expand(*[n if d != token_dim else keep.shape[-1] for d, n in enumerate(x.shape)])
    return x.gather(token_dim, index)


class ScissorhandsCache(EvictionCache):
    """Scissorhands (Liu et al. 2023, Algorithms 1-2): keep the tokens that were important most persistently.

    At each step (each query row) with ``t`` visible tokens, a token is *unimportant* if its attention weight
    is below the uniform level ``1/t``. The cache records this for the last ``w = history_window`` steps. When
    it holds more than ``B = budget`` tokens it drops ``m`` tokens at once: those unimportant at the most of
    the recorded steps (a token never drops while it is among the ``r = recent`` most recent). Counting
    *unimportant* steps (rather than important ones) favours a young token, which has had fewer steps to prove
    unimportant.

    Defaults, the book's choices (the paper gives the roles of ``w``, ``r`` and ``m`` in Algorithm 2 but, as far
    as this book could check, no value of ``m``): ``w = 400`` and ``r = 10`` are the values that the Cold-Compress
    reimplementation (Answer.AI) names as the paper's; ``m = 1`` (``drop_fraction=0``: evict one token per
    step, as H2O does) is the drop amount that the Scissorhands chapter picks by a sweep of ``drop_fraction``
    on the book corpus's ``eval`` slice and confirms on ``heldout``. ``drop_fraction > 0`` drops
    ``m = max(1, int(drop_fraction * B))`` tokens at once, which amortizes the sort: the cache's size then
    saw-tooths between ``B - m + 1`` and ``B`` tokens, so its average is below ``B``. ``bits``/``group_size``:
    store the kept tokens quantized (see :class:`EvictionCache`), the combination with 4-bit quantization that
    the paper also evaluates.

    Statistics held: a ``w``-step boolean history per token and KV head, ``(B, H_kv, w, T)``.
    Raises ``ValueError`` for ``history_window < 1``, ``drop_fraction`` outside ``[0, 1]`` or a budget below
    ``r + m - 1``.
    """

    def __init__(
        self,
        budget: int | None = None,
        history_window: int = 400,
        recent: int = 10,
        drop_fraction: float = 0.0,
        *,
        bits: int | None = None,
        group_size: int = 32,
    ) -> None:
        self.history_window = check_positive_int("history_window", history_window)
        self.drop_fraction = check_float("drop_fraction", drop_fraction, min_value=0.0, max_value=1.0)
        if budget is not None:
            budget = check_positive_int("budget", budget)
        drop = max(1, int(self.drop_fraction * budget)) if budget is not None else 1
        super().__init__(budget, recent=recent, drop=drop, bits=bits, group_size=group_size)
        self._add_state("unimportant", (self.history_window,), torch.bool)  # ring buffer over steps
        self._steps = 0  # query rows recorded so far (the ring's write pointer is _steps % w)

    def _accumulate(self, a: Tensor, q_positions: Tensor) -> None:
        # a: (B, H_kv, T_new, T). Query row i sees the tokens at positions <= q_positions[i]; t_i of them.
        w, t_new = self.history_window, a.shape[2]
        if t_new == 1 and int(q_positions[0]) >= self.last_position:  # a decode step: every token visible
            below = a[:, :, 0, :] < 1.0 / a.shape[-1]  # (B, H_kv, T): attention < 1/t (Alg. 2)
            self._state["unimportant"][:, :, self._steps % w, :] = below
            self._steps += 1
            return
        visible = self._pos.unsqueeze(2) <= q_positions.view(1, 1, -1, 1)  # (B, H_kv, T_new, T)
        t_vis = visible.sum(-1, keepdim=True).clamp_min(1).to(a.dtype)  # (B, H_kv, T_new, 1)
        below = visible & (a < 1.0 / t_vis)  # unimportant at this step: attention < 1/t (Alg. 2)
        n = min(t_new, w)  # rows older than the last w never matter
        slots = (self._steps + t_new - n + torch.arange(n, device=a.device)) % w  # ring positions to write
        self._state["unimportant"][:, :, slots, :] = below[:, :, t_new - n :, :]
        self._steps += t_new

    def unimportance(self) -> Tensor:
        """Number of the last ``w`` steps at which each cached token was unimportant, ``(B, H_kv, T)``."""
        if self._pos is None:
            raise RuntimeError("the cache is empty: call update() first")
        return self._state["unimportant"].sum(dim=2)

    def _priority(self) -> Tensor:
        return -self.unimportance()


class H2OCache(EvictionCache):
    """H2O, the heavy-hitter oracle (Zhang et al. 2023): keep heavy hitters plus a recent window.

    A token's score is its attention weight summed over every step so far (the KV head's group mean). The
    cache keeps the ``recent`` most recent tokens and fills the rest of the budget with the highest-scoring
    ones, evicting one token per decoding step. Default ``recent = budget // 2``: the paper's equal split
    between heavy hitters and recent tokens.

    Statistics held: one accumulated score per token and KV head, ``(B, H_kv, T)`` float32.
    """

    def __init__(
        self,
        budget: int | None = None,
        recent: int | None = None,
        *,
        bits: int | None = None,
        group_size: int = 32,
    ) -> None:
        if budget is not None and recent is None:
            recent = check_positive_int("budget", budget) // 2
        super().__init__(budget, recent=0 if recent is None else recent, bits=bits, group_size=group_size)
        self._add_state("score", (), torch.float32)

    def _accumulate(self, a: Tensor, q_positions: Tensor) -> None:
        self._state["score"] += a.sum(dim=2).float()  # (B, H_kv, T): sum over this step's query rows

    def _priority(self) -> Tensor:
        return self._state["score"]


class StreamingLLMCache(EvictionCache):
    """StreamingLLM (Xiao et al. 2024): the first ``sink_tokens`` tokens (attention sinks) and a recent window.

    Keeps the tokens at positions ``< sink_tokens`` and the ``budget - sink_tokens`` most recent ones; needs
    no statistics. Default ``sink_tokens = 4``, the paper's choice.

    ``positions`` says which positions attention sees (sec. 3.2, "positional information within the cache"):

    * ``"in_cache"`` (default, the paper's and its released code's choice,
      ``streaming_llm/pos_shift/modify_llama.py`` of mit-han-lab/streaming-llm at 2e5042606d): a key is at its
      index in the cache and the query at the index its own token takes, so once tokens were evicted the sinks
      and the window sit next to each other and relative distances never exceed the cache's size. The book's
      model applies RoPE before caching, so :meth:`attend` re-rotates each key from its original position
      ``p`` to its cache index ``i`` (a rotation by ``i - p``; RoPE rotations compose exactly) and the query
      likewise. That needs the model's RoPE base, ``rope_base`` (e.g. ``model.config.rope_base``);
    * ``"original"``: every token keeps the position it was generated at (what the other policies do), so
      distances to the sinks grow without bound.

    :meth:`key_positions` always returns the original positions (the causal mask and the analysis use them;
    the cache's order is the position order, so masking by either is the same).
    Raises ``ValueError`` unless ``budget > sink_tokens``, for an unknown ``positions``, or for
    ``positions="in_cache"`` without ``rope_base``.
    """

    def __init__(
        self,
        budget: int | None = None,
        sink_tokens: int = 4,
        *,
        positions: str = "in_cache",
        rope_base: float | None = None,
        bits: int | None = None,
        group_size: int = 32,
    ) -> None:
        sink_tokens = check_int("sink_tokens", sink_tokens, min_value=0)
        if budget is not None:
            budget = check_positive_int("budget", budget)
            if budget <= sink_tokens:
                raise ValueError(
                    f"budget must exceed sink_tokens={sink_tokens} (room for a recent window), got {budget}"
                )
        recent = 0 if budget is None else budget - sink_tokens
        super().__init__(budget, recent=recent, sink_tokens=sink_tokens, bits=bits, group_size=group_size)
        check_choice("positions", positions, POSITIONS)
        if positions == "in_cache":
            if rope_base is None:
                raise ValueError(
                    "StreamingLLMCache(positions='in_cache') re-rotates keys to their positions in the cache and "
                    "needs the model's RoPE base: pass rope_base=model.config.rope_base (or "
                    "positions='original'); got rope_base=None"
                )
            rope_base = check_float("rope_base", rope_base, min_value=1.0, min_inclusive=False)
        self.positions, self.rope_base = positions, rope_base

    def _priority(self) -> Tensor:
        return self._pos  # oldest first

    def attend(self, q: Tensor, q_positions: Tensor, scale: float) -> Tensor:
        """Attention of ``q: (B, H_q, T_new, D)`` (rotated at ``q_positions``) over the kept tokens, at their
        positions in the cache when ``positions="in_cache"``."""
        if self.positions == "original":
            return super().attend(q, q_positions, scale)
        from refimpl.llm.model import apply_rope, rope_cos_sin

        k, v = self.keys_values()  # (B, H_kv, T, D), keys rotated at their original positions p
        p = self.key_positions()  # (B, H_kv, T)
        t, t_new, d = p.shape[-1], q.shape[2], q.shape[-1]
        index = torch.arange(t, device=p.device)  # i: position in the cache, the same for every head
        k_shift = (index - p).flatten()  # i - p per kept token
        cos, sin = rope_cos_sin(k_shift, d, self.rope_base)  # (B * H_kv * T, D)
        k = apply_rope(k, cos.view(*p.shape, d).to(k.dtype), sin.view(*p.shape, d).to(k.dtype))
        # The step's tokens are the last T_new in the cache: query j moves from q_positions[j] to t - T_new + j.
        q_shift = index[t - t_new :] - q_positions.to(p.device)  # (T_new,)
        cos, sin = rope_cos_sin(q_shift, d, self.rope_base)  # (T_new, D)
        q = apply_rope(q, cos.to(q.dtype), sin.to(q.dtype))
        out, weights = grouped_attention(q, k, v, q_positions, p, scale)
        self.observe(weights, q_positions)
        return out


class SlidingWindowCache(EvictionCache):
    """A sliding window: keep the ``budget`` most recent tokens. Needs no statistics."""

    def __init__(self, budget: int | None = None, *, bits: int | None = None, group_size: int = 32) -> None:
        recent = 0 if budget is None else check_positive_int("budget", budget)
        super().__init__(budget, recent=recent, bits=bits, group_size=group_size)

    def _priority(self) -> Tensor:
        return self._pos  # oldest first
