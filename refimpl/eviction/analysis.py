"""Measuring the two observations behind Scissorhands on recorded attention (Liu et al. 2023, section 3).

1. *Attention is sparse*: a few tokens hold most of each query's attention mass (:func:`top_mass`).
2. *Persistence of importance*: the tokens that are important at one step are, mostly, the ones that are
   important at later steps (:func:`persistence_ratio`, :func:`lagged_overlap`), far more than a random set
   of the same size would be (:func:`random_sets`, :func:`set_size_ratio`).

All functions take the attention of a causal prefill, ``a: (..., T, T)``: row ``t`` is the query at position
``t``, a probability distribution over the keys ``0..t`` (entries right of the diagonal are zero). This is
what :class:`AttentionRecorder` records from one forward pass of the model. A token ``j <= t`` is
*important at step t* when ``a[t, j] >= 1/(t+1)``, the uniform level over the ``t + 1`` visible tokens:
Scissorhands' own criterion (:class:`refimpl.eviction.ScissorhandsCache`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from refimpl._checks import check_float, check_positive_int, check_tensor
from refimpl.eviction.policies import kv_head_attention
from refimpl.llm.cache import FullCache

__all__ = [
    "AttentionRecorder",
    "important_sets",
    "lagged_overlap",
    "persistence_ratio",
    "random_sets",
    "set_size_ratio",
    "top_mass",
]


class AttentionRecorder(FullCache):
    """A full cache that also records the attention it computes, per KV head (mean over the query group).

    After a forward pass over ``T`` tokens (one prefill or several steps), :meth:`attention` returns
    ``(B, H_kv, T_q, T)``: all recorded query rows against all ``T`` tokens (zeros where a row did not see a
    token). Set ``per_query_head=True`` to record the ``H_q`` query heads instead.
    """

    needs_attention = True

    def __init__(self, per_query_head: bool = False, capacity: int = 256) -> None:
        super().__init__(capacity)
        self.per_query_head = bool(per_query_head)
        self._rows: list[Tensor] = []

    def observe(self, weights: Tensor, q_positions: Tensor) -> None:
        h_kv = self.keys_values()[0].shape[1]
        self._rows.append(weights.detach().clone() if self.per_query_head else kv_head_attention(weights, h_kv))

    def attention(self) -> Tensor:
        """All recorded rows, ``(B, H, T_q, T)``, zero-padded on the right to the current length ``T``."""
        if not self._rows:
            raise RuntimeError("nothing recorded: run the model with this cache first")
        t = len(self)
        rows = [torch.nn.functional.pad(r, (0, t - r.shape[-1])) for r in self._rows]
        return torch.cat(rows, dim=2)


def _check_causal(a: Tensor) -> int:
    check_tensor("a", a, ndim=tuple(range(2, 8)), floating=True)
    if a.shape[-1] != a.shape[-2]:
        raise ValueError(f"a must be square in its last two dimensions (T, T), got shape {tuple(a.shape)}")
    return a.shape[-1]


def top_mass(a: Tensor, fraction: float) -> Tensor:
    """Attention mass held by the top ``fraction`` of visible tokens, per query row.

    ``a: (..., T, T)`` causal attention -> ``(..., T)``: for row ``t``, the sum of its ``ceil(fraction (t+1))``
    largest weights (at least one). A uniform row gives about ``fraction``; a row on one token gives 1.
    """
    t = _check_causal(a)
    fraction = check_float("fraction", fraction, min_value=0.0, max_value=1.0, min_inclusive=False)
    n_vis = torch.arange(1, t + 1, device=a.device)  # (T,) visible tokens per row
    k = torch.ceil(fraction * n_vis.double()).long().clamp(1, t)  # (T,) tokens counted per row
    csum = a.sort(dim=-1, descending=True).values.cumsum(dim=-1)  # (..., T, T)
    index = (k - 1).expand(*a.shape[:-1]).unsqueeze(-1)  # (..., T, 1)
    return csum.gather(-1, index).squeeze(-1)


def important_sets(a: Tensor) -> Tensor:
    """Boolean ``(..., T, T)``: token ``j`` is important at step ``t`` iff ``j <= t`` and ``a[t, j] >= 1/(t+1)``."""
    t = _check_causal(a)
    rows = torch.arange(t, device=a.device)
    visible = rows.view(1, -1) <= rows.view(-1, 1)  # (T, T) causal
    uniform = 1.0 / (rows + 1).to(a.dtype)  # (T,) the uniform level of each row
    return visible & (a >= uniform.view(-1, 1))


def set_size_ratio(important: Tensor) -> Tensor:
    """``|I_t| / (t+1)`` per row, ``(..., T)``: the overlap a random set of that size would have, in expectation.

    If ``I_t`` is drawn uniformly among the ``t + 1`` visible tokens, each later-important token is in it with
    probability ``|I_t| / (t+1)``, so this is the random baseline of :func:`persistence_ratio` and
    :func:`lagged_overlap`.
    """
    t = important.shape[-1]
    return important.sum(-1).double() / torch.arange(1, t + 1, device=important.device, dtype=torch.float64)


def persistence_ratio(important: Tensor) -> Tensor:
    """Fraction of the tokens important *later* that were already important at step ``t`` (Liu et al. 2023).

    ``important: (..., T, T)`` from :func:`important_sets` -> ``(..., T - 1)``. For step ``t``, let
    ``F_t = {j <= t : j important at some step s > t}``; the ratio is ``|I_t & F_t| / |F_t|`` (NaN if ``F_t``
    is empty). A ratio near 1 means a cache that keeps ``I_t`` at step ``t`` loses nothing that matters later.
    """
    check_tensor("important", important, ndim=tuple(range(2, 8)), dtypes=[torch.bool])
    t = important.shape[-1]
    # later[s] = OR over rows s' >= s: a reverse cumulative maximum along the rows (vectorized over t).
    later = important.flip(-2).to(torch.uint8).cummax(dim=-2).values.flip(-2).bool()  # (..., T, T)
    future = later[..., 1:, :]  # (..., T-1, T): row t -> important at some step > t
    cols = torch.arange(t, device=important.device)
    upto = cols.view(1, -1) <= cols[:-1].view(-1, 1)  # (T-1, T): columns j <= t
    f = future & upto
    hit = (f & important[..., :-1, :]).sum(-1).double()
    n = f.sum(-1).double()
    return torch.where(n > 0, hit / n.clamp_min(1), torch.full_like(n, math.nan))


def lagged_overlap(important: Tensor, lag: int) -> Tensor:
    """Fraction of the tokens important at step ``t + lag`` (among ``j <= t``) also important at step ``t``.

    ``important: (..., T, T)`` -> ``(..., T - lag)``: ``|I_t & I_{t+lag} & [0, t]| / |I_{t+lag} & [0, t]|``,
    NaN where the denominator is empty. ``lag = 1`` compares consecutive steps.
    """
    check_tensor("important", important, ndim=tuple(range(2, 8)), dtypes=[torch.bool])
    t = important.shape[-1]
    lag = check_positive_int("lag", lag)
    if lag >= t:
        raise ValueError(f"lag must be < T={t}, got {lag}")
    cols = torch.arange(t, device=important.device)
    upto = cols.view(1, -1) <= cols[: t - lag].view(-1, 1)  # (T-lag, T): columns j <= t
    later = important[..., lag:, :] & upto  # I_{t+lag} restricted to tokens that existed at step t
    hit = (later & important[..., : t - lag, :]).sum(-1).double()
    n = later.sum(-1).double()
    return torch.where(n > 0, hit / n.clamp_min(1), torch.full_like(n, math.nan))


def random_sets(important: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Random sets of the same sizes: row ``t`` gets ``|I_t|`` tokens drawn uniformly from ``0..t``.

    ``important: (..., T, T)`` bool -> bool of the same shape. Passing the result to :func:`persistence_ratio`
    or :func:`lagged_overlap` gives the random-set baseline of the persistence figure.
    """
    check_tensor("important", important, ndim=tuple(range(2, 8)), dtypes=[torch.bool])
    t = important.shape[-1]
    cols = torch.arange(t, device=important.device)
    visible = cols.view(1, -1) <= cols.view(-1, 1)  # (T, T)
    scores = torch.rand(important.shape, generator=generator, device=important.device)
    scores = scores.masked_fill(~visible, 2.0)  # invisible tokens rank last
    rank = scores.argsort(dim=-1).argsort(dim=-1)  # (..., T, T): rank of each column within its row
    return rank < important.sum(-1, keepdim=True)
