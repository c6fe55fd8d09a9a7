"""Routers: which experts each token reaches, with what weight, and which assignments a full expert drops.

Every router returns a :class:`Routing`: a flat list of ``A`` (token, expert, weight) assignments in *priority
order*. The dispatch implementations in :mod:`refimpl.moe.dispatch` execute any ``Routing`` the same way, so
one set of dispatch code serves top-k gating (Switch, GShard), expert choice, AdaMoE's null experts and MoGE's
grouped top-k.

Notation (Switch Transformer, Fedus et al. 2022): ``N`` tokens, ``E`` experts, router logits
``h(x) = W_r x`` of shape ``(N, E)``, router probabilities ``p_i(x) = softmax(h(x))_i`` (eq. 1), ``k`` experts
per token, capacity factor ``c``.

Capacity and dropping (the rule this module implements everywhere):

* per-expert capacity ``C = ceil(c * N * k / E)`` (Switch eq. 3, generalised to ``k`` choices as in GShard);
* position priority: assignments are queued rank-major - every token's 1st choice before any token's 2nd
  choice (GShard, Algorithm 1) - and in token order within a rank (Switch); an expert accepts the first ``C``
  assignments of its queue and drops the rest, so expert ``i`` drops exactly ``max(0, count_i - C)``;
* a dropped assignment contributes nothing; the layer adds the residual, so a token whose every assignment
  was dropped passes through unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from refimpl._checks import check_float, check_int, check_positive_int, check_tensor

__all__ = [
    "Routing",
    "TopKGate",
    "apply_capacity",
    "expert_capacity",
    "expert_choice",
    "grouped_top_k_gating",
    "imbalance_score",
    "null_expert_gating",
    "queue_positions",
    "top_k_gating",
]


@dataclass(frozen=True)
class Routing:
    """``A`` token-to-expert assignments in priority order (see the module docstring).

    Attributes:
        token: ``(A,)`` int64, the token index in ``[0, n_tokens)`` of each assignment.
        expert: ``(A,)`` int64, the expert index in ``[0, n_experts)``.
        weight: ``(A,)`` float, the combine weight ``G(x)_i`` (differentiable with respect to the router).
        n_tokens: ``N``, the number of tokens routed.
        n_experts: ``E``, the number of (real) experts.
    """

    token: Tensor
    expert: Tensor
    weight: Tensor
    n_tokens: int
    n_experts: int

    @property
    def n_assignments(self) -> int:
        """``A``, the number of (token, expert) pairs that will be computed."""
        return int(self.token.numel())

    def tokens_per_expert(self) -> Tensor:
        """``(E,)`` int64: how many assignments each expert receives."""
        return torch.bincount(self.expert, minlength=self.n_experts)

    def select(self, mask: Tensor) -> Routing:
        """The assignments where the ``(A,)`` bool ``mask`` is true, priority order kept."""
        return Routing(self.token[mask], self.expert[mask], self.weight[mask], self.n_tokens, self.n_experts)


@dataclass(frozen=True)
class TopKGate:
    """Output of a top-k style gate.

    Attributes:
        probs: ``(N, E)`` router probabilities ``p(x)`` (softmax of the logits), used by the balancing loss.
        index: ``(N, k)`` int64 expert chosen as each token's j-th choice (j = 0 is the highest probability).
        gate: ``(N, k)`` combine weight of each choice.
    """

    probs: Tensor
    index: Tensor
    gate: Tensor

    def routing(self, n_experts: int | None = None) -> Routing:
        """Flatten to a :class:`Routing` in rank-major priority order (all 1st choices, then 2nd, ...).

        ``n_experts`` defaults to ``probs.shape[1]``; AdaMoE passes the number of *real* experts and
        filters out null-expert choices itself (:func:`null_expert_gating`).
        """
        n, k = self.index.shape
        experts = self.probs.shape[1] if n_experts is None else n_experts
        token = torch.arange(n, device=self.index.device).repeat(k)  # (k*N,) rank-major: 0..N-1, 0..N-1, ...
        return Routing(token, self.index.t().reshape(-1), self.gate.t().reshape(-1), n, experts)


def _check_logits(logits: Tensor) -> Tensor:
    return check_tensor("logits", logits, ndim=2, floating=True)


def top_k_gating(logits: Tensor, k: int, *, normalize: bool = True) -> TopKGate:
    """Top-k softmax gating: Switch (``k=1``, Fedus et al. 2022, eq. 1-2) and GShard (``k=2``).

    ``p(x) = softmax(logits)`` over the ``E`` experts; each token keeps its ``k`` largest probabilities. With
    ``normalize=True`` the kept gates are divided by their sum, so they sum to 1 over the chosen experts
    (GShard, Algorithm 1: ``g1 / (g1 + g2)``). With ``k=1`` normalization makes every gate exactly 1 and the
    router then receives no gradient from the task loss, which is why Switch keeps the raw ``p_i(x)``.

    ``logits``: ``(N, E)`` router logits ``h(x)``. ``k``: experts per token, ``1 <= k <= E``. ``normalize``:
    renormalize the kept gates to sum to 1.

    Returns :class:`TopKGate` with ``probs (N, E)``, ``index (N, k)``, ``gate (N, k)``. Raises ``ValueError`` if
    ``logits`` is not 2-D or ``k`` is outside ``[1, E]``.
    """
    logits = _check_logits(logits)
    k = check_int("k", k, min_value=1, max_value=logits.shape[1])
    probs = torch.softmax(logits, dim=-1)  # (N, E)  p_i(x), Switch eq. (1)
    gate, index = torch.topk(probs, k, dim=-1)  # (N, k), sorted: choice 0 is the argmax
    if normalize:
        gate = gate / gate.sum(dim=-1, keepdim=True)
    return TopKGate(probs, index, gate)


def expert_capacity(n_tokens: int, n_experts: int, k: int, capacity_factor: float) -> int:
    """Per-expert capacity ``C = ceil(capacity_factor * n_tokens * k / n_experts)`` (Switch eq. 3).

    ``capacity_factor = 1`` gives each expert exactly its share of a perfectly balanced load; larger values
    leave slack for imbalance at the cost of padding (dense dispatch) and memory.

    Raises ``ValueError`` if ``capacity_factor <= 0``, ``n_tokens < 0``, or ``n_experts``/``k`` are not positive.
    """
    n_tokens = check_int("n_tokens", n_tokens, min_value=0)
    n_experts = check_positive_int("n_experts", n_experts)
    k = check_positive_int("k", k)
    capacity_factor = check_float("capacity_factor", capacity_factor, min_value=0.0, min_inclusive=False)
    # Round the product first so that e.g. 1.1 * 50 * 2 / 10 = 11.000000000000002 gives 11, not 12.
    return math.ceil(round(capacity_factor * n_tokens * k / n_experts, 9))


def queue_positions(expert: Tensor, n_experts: int) -> Tensor:
    """Position of each assignment in its expert's queue, in the order the assignments are given.

    ``position[a] = #{b < a : expert[b] == expert[a]}``. Computed with one stable sort, O(A log A) and no
    ``(A, E)`` one-hot.

    ``expert``: ``(A,)`` int64 expert index per assignment, in priority order. ``n_experts``: ``E``.

    Returns ``(A,)`` int64 positions.
    """
    check_tensor("expert", expert, ndim=1, dtypes=[torch.int64])
    n_experts = check_positive_int("n_experts", n_experts)
    order = torch.argsort(expert, stable=True)  # (A,) groups each expert's assignments, priority kept
    counts = torch.bincount(expert, minlength=n_experts)  # (E,)
    starts = torch.cumsum(counts, 0) - counts  # (E,) first slot of each expert's segment
    sorted_expert = expert[order]
    position = torch.empty_like(expert)
    position[order] = torch.arange(expert.numel(), device=expert.device) - starts[sorted_expert]
    return position


def apply_capacity(routing: Routing, capacity: int) -> tuple[Routing, Tensor]:
    """Drop the assignments beyond each expert's ``capacity`` by position priority (module docstring).

    ``routing``: assignments in priority order. ``capacity``: ``C >= 0``, the most assignments an expert accepts.

    Returns ``(kept, dropped_per_expert)``: the kept assignments (order kept) and ``(E,)`` int64 counts of dropped
    assignments, equal to ``max(0, count_i - C)``.
    """
    capacity = check_int("capacity", capacity, min_value=0)
    position = queue_positions(routing.expert, routing.n_experts)
    keep = position < capacity
    dropped = torch.bincount(routing.expert[~keep], minlength=routing.n_experts)
    return routing.select(keep), dropped


def expert_choice(logits: Tensor, capacity_factor: float) -> Routing:
    """Expert-choice routing (Zhou et al. 2022, Sec. 3.1): each expert picks its top-``C`` tokens.

    ``S = softmax(logits)`` over experts (per token); ``G, I = TopK(S^T, C)`` along the token axis, with
    ``C = ceil(capacity_factor * N / E)`` (the paper's ``k = n c / e``; ``capacity_factor`` is the average
    number of experts per token). Every expert gets exactly ``min(C, N)`` tokens, so the load is balanced by
    construction; a token may get several experts or none. The top-k runs over the whole batch, so in an
    autoregressive decoder a token's routing depends on later tokens.

    ``logits``: ``(N, E)`` router logits. ``capacity_factor``: ``c > 0``.

    Returns :class:`Routing` in expert-major order, ``min(C, N)`` assignments per expert, weight ``S[token, e]``.
    """
    logits = _check_logits(logits)
    capacity_factor = check_float("capacity_factor", capacity_factor, min_value=0.0, min_inclusive=False)
    n, e = logits.shape
    scores = torch.softmax(logits, dim=-1)  # (N, E)  S
    quota = min(expert_capacity(n, e, 1, capacity_factor), n)
    gate, token = torch.topk(scores.t(), quota, dim=-1)  # (E, C)  G, I
    expert = torch.arange(e, device=logits.device).repeat_interleave(quota)  # (E*C,)
    return Routing(token.reshape(-1), expert, gate.reshape(-1), n, e)


def null_expert_gating(logits: Tensor, k: int, n_null: int) -> tuple[TopKGate, Routing]:
    """AdaMoE token-adaptive routing with null experts (Zeng et al. 2024).

    The last ``n_null`` of the ``E + m`` logit columns belong to *null experts*, which output zero and cost
    no FLOPs. Top-k runs over all ``E + m``; a token therefore uses between 0 and ``k`` real experts. As in
    the authors' release, the gates of the chosen real experts are renormalized to sum to 1 (when a token
    chose at least one), and null choices are removed from the routing.

    ``logits``: ``(N, E + m)`` router logits, real experts first. ``k``: choices per token over real and null
    experts, ``1 <= k <= E + m``. ``n_null``: ``m >= 1`` null experts; at least one real expert must remain.

    Returns ``(gate, routing)``: the top-k over all ``E + m`` columns (its ``probs``/``index`` feed the balancing
    loss, which AdaMoE applies over real and null experts alike) and the routing over the ``E`` real experts only.
    """
    logits = _check_logits(logits)
    total = logits.shape[1]
    n_null = check_int("n_null", n_null, min_value=1, max_value=total - 1)
    k = check_int("k", k, min_value=1, max_value=total)
    real = total - n_null
    full = top_k_gating(logits, k, normalize=False)  # over E + m
    is_real = full.index < real  # (N, k)
    real_gate = full.gate * is_real
    denom = real_gate.sum(dim=-1, keepdim=True)
    real_gate = real_gate / torch.where(denom > 0, denom, torch.ones_like(denom))
    routing = TopKGate(full.probs, full.index, real_gate).routing(n_experts=real)
    keep = routing.expert < real
    return full, routing.select(keep)


def grouped_top_k_gating(logits: Tensor, k: int, n_groups: int, *, normalize: bool = False) -> TopKGate:
    """MoGE grouped top-k (Tang et al. 2025, Pangu Pro MoE): an equal number of experts per group.

    The ``E`` experts are split into ``M = n_groups`` contiguous groups of ``E / M`` (one group per device).
    Scores come from one global softmax over all ``E`` experts; each token then takes its top ``K' = k / M``
    experts *within every group*. Every group, hence every device, receives exactly ``N K'`` assignments.

    ``logits``: ``(N, E)`` router logits. ``k``: experts per token; must be a multiple of ``n_groups``.
    ``n_groups``: ``M``; must divide ``E``. ``normalize``: renormalize the ``k`` kept gates to sum to 1.

    Returns :class:`TopKGate` with ``index (N, k)`` holding global expert ids, group-major (group 0's picks first).
    """
    logits = _check_logits(logits)
    n, e = logits.shape
    n_groups = check_int("n_groups", n_groups, min_value=1, max_value=e)
    if e % n_groups:
        raise ValueError(f"n_groups must divide the number of experts {e}, got {n_groups}")
    size = e // n_groups
    k = check_int("k", k, min_value=n_groups, max_value=e)
    if k % n_groups:
        raise ValueError(f"k must be a multiple of n_groups={n_groups}, got {k}")
    per_group = k // n_groups  # K'
    probs = torch.softmax(logits, dim=-1)  # (N, E)  global softmax
    gate, local = torch.topk(probs.view(n, n_groups, size), per_group, dim=-1)  # (N, M, K')
    offset = torch.arange(n_groups, device=logits.device).view(1, n_groups, 1) * size
    index = (local + offset).reshape(n, k)  # (N, k) global expert ids
    gate = gate.reshape(n, k)
    if normalize:
        gate = gate / gate.sum(dim=-1, keepdim=True)
    return TopKGate(probs, index, gate)


def imbalance_score(expert: Tensor, n_experts: int, n_devices: int, n_tokens: int) -> float:
    """Imbalance score of Pangu Pro MoE (Tang et al. 2025): ``(max_i T_i - min_i T_i) / |X|``.

    ``T_i`` is the number of assignments that land on device ``i`` when the ``E`` experts are placed
    contiguously, ``E / D`` per device; ``|X|`` is the number of tokens in the batch. Zero means every device
    does the same work.

    ``expert``: any-shape int64 tensor of chosen expert ids (e.g. ``TopKGate.index`` or ``Routing.expert``).
    ``n_experts``: ``E``. ``n_devices``: ``D``; must divide ``E``. ``n_tokens``: ``|X| >= 1``.
    """
    check_tensor("expert", expert, dtypes=[torch.int64])
    n_experts = check_positive_int("n_experts", n_experts)
    n_devices = check_int("n_devices", n_devices, min_value=1, max_value=n_experts)
    if n_experts % n_devices:
        raise ValueError(f"n_devices must divide n_experts={n_experts}, got {n_devices}")
    n_tokens = check_positive_int("n_tokens", n_tokens)
    per_device = n_experts // n_devices
    load = torch.bincount(expert.reshape(-1) // per_device, minlength=n_devices)  # (D,)  T_i
    return float(load.max() - load.min()) / n_tokens
