"""The verification rule of speculative sampling (Leviathan et al. 2023, Algorithm 1; Chen et al. 2023, Algorithm 2).

A draft proposes ``gamma`` tokens ``x_1 .. x_gamma``, drawn from its distributions ``q_1 .. q_gamma``; one
target forward gives ``p_1 .. p_{gamma+1}`` (``p_i`` is the target's distribution of token ``i`` given the
context and ``x_1 .. x_{i-1}``). Then, for ``i = 1 .. gamma``:

* accept ``x_i`` with probability ``min(1, p_i(x_i) / q_i(x_i))``;
* on the first rejection emit one token from the residual ``norm(max(0, p_i - q_i))`` and stop;
* if every draft was accepted, emit the bonus token from ``p_{gamma+1}``.

The emitted tokens are distributed exactly as ``gamma + 1`` (or fewer) tokens sampled from the target alone
(Leviathan et al. 2023, Theorem 3.5 / Appendix A.1): ``P(x) = q(x) min(1, p(x)/q(x)) + (1 - beta) r(x) = p(x)``
with ``beta = sum_x min(p(x), q(x))`` the acceptance probability and ``r`` the residual.
:func:`emitted_distribution` computes the algorithm's output distribution by enumerating its branches, so the
tests can check that identity exactly.

Greedy verification is the temperature-0 case: ``p_i`` and ``q_i`` are one-hot at their argmax, so a draft is
accepted iff it is the target's argmax and the residual is the target's argmax (:func:`verify_greedy` is the
same rule without building the one-hot vectors).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from refimpl._checks import check_float, check_int, check_tensor

__all__ = [
    "Verdict",
    "acceptance_probability",
    "check_distribution",
    "emitted_distribution",
    "expected_tokens_per_step",
    "probs_from_logits",
    "residual_distribution",
    "verify_greedy",
    "verify_sampled",
]

#: Tolerance of :func:`check_distribution` on ``sum(p) == 1`` (float32 softmax rows are within ~1e-6).
SUM_TOLERANCE = 1e-4


class Verdict(tuple):
    """Result of one verification: ``(n_accepted, next_token)``; the emitted tokens are the first
    ``n_accepted`` drafts followed by ``next_token`` (the residual sample or the bonus token)."""

    def __new__(cls, n_accepted: int, next_token: int) -> Verdict:
        return super().__new__(cls, (int(n_accepted), int(next_token)))

    @property
    def n_accepted(self) -> int:
        return self[0]

    @property
    def next_token(self) -> int:
        return self[1]


def check_distribution(name: str, p: Tensor, vocab_size: int | None = None) -> Tensor:
    """Check that ``p: (..., V)`` holds probability vectors (finite, ``>= 0``, rows summing to 1); return it.

    Raises ``ValueError`` naming ``name`` for NaN/inf, negative entries, rows that do not sum to 1, or a
    vocabulary size other than ``vocab_size``.
    """
    check_tensor(name, p, floating=True)
    if p.dim() == 0 or p.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last (vocabulary) dimension, got shape {tuple(p.shape)}")
    if vocab_size is not None and p.shape[-1] != vocab_size:
        raise ValueError(
            f"{name} must have vocabulary size {vocab_size} (the target's), got {p.shape[-1]}: the draft and "
            "target must share one vocabulary"
        )
    if not bool(torch.isfinite(p).all()):
        raise ValueError(f"{name} must be finite, got NaN or inf")
    if bool((p < 0).any()):
        raise ValueError(f"{name} must be >= 0, got min {float(p.min())}")
    sums = p.double().sum(-1)
    worst = float((sums - 1).abs().max())
    if worst > SUM_TOLERANCE:
        raise ValueError(f"{name} rows must sum to 1 (within {SUM_TOLERANCE}), got a row off by {worst:.3g}")
    return p


def probs_from_logits(logits: Tensor, temperature: float) -> Tensor:
    """Sampling distribution ``softmax(logits / T)`` in float64; ``T = 0`` gives the one-hot argmax (greedy).

    ``logits: (..., V)`` -> ``(..., V)``. Raises ``ValueError`` for a negative or non-finite temperature.
    """
    check_tensor("logits", logits, floating=True)
    temperature = check_float("temperature", temperature, min_value=0.0)
    if temperature == 0.0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).double()
    return torch.softmax(logits.double() / temperature, dim=-1)


def acceptance_probability(p: Tensor, q: Tensor, token: int) -> float:
    """``min(1, p(x) / q(x))`` for the drafted ``x = token`` (Leviathan et al. 2023, Algorithm 1).

    ``q(x) > 0`` always holds for a token the draft sampled; ``q(x) = 0`` (a draft that proposes a token it
    gives no probability) raises ``ValueError``.
    """
    qx, px = float(q[token]), float(p[token])
    if qx <= 0.0:
        raise ValueError(f"q[token] must be > 0 for a drafted token, got q[{token}] = {qx}")
    return min(1.0, px / qx)


def residual_distribution(p: Tensor, q: Tensor) -> Tensor:
    """``norm(max(0, p - q))``: where to resample after a rejection (Leviathan et al. 2023, eq. in sec. 2.3).

    If ``p == q`` the residual is all zero, but then no draft is ever rejected; ``p`` is returned in that case
    so the function is total.
    """
    r = (p.double() - q.double()).clamp_min(0.0)
    total = r.sum(-1, keepdim=True)
    if float(total.min()) <= 0.0:
        return p.double()
    return r / total


def _check_inputs(p: Tensor, q: Tensor | None, draft: Sequence[int]) -> int:
    gamma = len(draft)
    if gamma == 0:
        raise ValueError("draft must hold at least one token (draft length gamma >= 1), got 0")
    check_distribution("p", p)
    if p.dim() != 2 or p.shape[0] != gamma + 1:
        raise ValueError(f"p must have shape (gamma + 1, V) = ({gamma + 1}, V), got {tuple(p.shape)}")
    v = p.shape[1]
    if q is not None:
        check_distribution("q", q, vocab_size=v)
        if q.dim() != 2 or q.shape[0] != gamma:
            raise ValueError(f"q must have shape (gamma, V) = ({gamma}, {v}), got {tuple(q.shape)}")
    for i, x in enumerate(draft):
        check_int(f"draft[{i}]", x, min_value=0, max_value=v - 1)
    return gamma


def verify_sampled(p: Tensor, q: Tensor | None, draft: Sequence[int], generator: torch.Generator) -> Verdict:
    """Speculative sampling: verify ``draft = x_1 .. x_gamma`` against the target.

    ``p: (gamma + 1, V)`` target distributions, ``q: (gamma, V)`` draft distributions, or ``None`` for a
    deterministic draft (prompt lookup: ``q_i`` one-hot at ``x_i``, so ``x_i`` is accepted with probability
    ``p_i(x_i)``). Returns :class:`Verdict` ``(n_accepted, next_token)``.

    Raises ``ValueError`` for an empty draft, shapes that do not match ``gamma``, vocabularies that differ,
    distributions that are not normalized, or draft ids outside the vocabulary.
    """
    gamma = _check_inputs(p, q, draft)
    if q is None:
        q = torch.nn.functional.one_hot(torch.tensor(list(draft)), p.shape[1]).double()
    for i, x in enumerate(draft):
        r = float(torch.rand((), generator=generator, dtype=torch.float64))
        if r < acceptance_probability(p[i], q[i], x):
            continue
        res = residual_distribution(p[i], q[i])
        return Verdict(i, int(torch.multinomial(res, 1, generator=generator)))
    return Verdict(gamma, int(torch.multinomial(p[gamma].double(), 1, generator=generator)))


def verify_greedy(target_logits: Tensor, draft: Sequence[int]) -> Verdict:
    """Greedy verification, the temperature-0 case of :func:`verify_sampled`.

    ``target_logits: (gamma + 1, V)``: accept drafts while ``x_i == argmax p_i``; the next token is the
    target's argmax after the accepted prefix. Returns :class:`Verdict` ``(n_accepted, next_token)``.
    """
    gamma = len(draft)
    if gamma == 0:
        raise ValueError("draft must hold at least one token (draft length gamma >= 1), got 0")
    check_tensor("target_logits", target_logits, ndim=2, floating=True)
    if target_logits.shape[0] != gamma + 1:
        raise ValueError(f"target_logits must have gamma + 1 = {gamma + 1} rows, got {target_logits.shape[0]}")
    best = target_logits.argmax(-1).tolist()  # (gamma + 1,)
    n = 0
    while n < gamma and int(draft[n]) == best[n]:
        n += 1
    return Verdict(n, best[n])


Dist = Callable[[tuple[int, ...]], Tensor]


def emitted_distribution(p_of: Dist, q_of: Dist, gamma: int, vocab_size: int) -> dict[tuple[int, ...], float]:
    """Exact distribution of one speculative step's emitted tokens, by enumerating the algorithm's branches.

    ``p_of(prefix)`` and ``q_of(prefix)`` give the target's and the draft's next-token distributions ``(V,)``
    after the tokens ``prefix`` (a tuple; the context is implicit). The draft samples ``x_1 .. x_gamma`` from
    ``q``; each branch (draft sequence, how many are accepted, which residual or bonus token) gets its
    probability from :func:`acceptance_probability` and :func:`residual_distribution`, the two pieces
    :func:`verify_sampled` draws from. Returns ``{emitted tokens: probability}`` (sequences of length
    ``1 .. gamma + 1``). Enumerates ``V^gamma`` drafts: for small vocabularies only.
    """
    gamma = check_int("gamma", gamma, min_value=1)
    vocab_size = check_int("vocab_size", vocab_size, min_value=1)
    out: dict[tuple[int, ...], float] = {}
    for draft in itertools.product(range(vocab_size), repeat=gamma):
        p_draft = 1.0  # probability that the draft samples this sequence
        for i, x in enumerate(draft):
            p_draft *= float(q_of(draft[:i])[x])
        if p_draft == 0.0:
            continue
        p_reach = p_draft  # probability of this draft and of accepting its first i tokens
        for i, x in enumerate(draft):
            p, q = p_of(draft[:i]).double(), q_of(draft[:i]).double()
            a = acceptance_probability(p, q, x)
            reject = p_reach * (1.0 - a)
            if reject > 0.0:
                for y, r_y in enumerate(residual_distribution(p, q).tolist()):
                    if r_y > 0.0:
                        key = (*draft[:i], y)
                        out[key] = out.get(key, 0.0) + reject * r_y
            p_reach *= a
        for y, p_y in enumerate(p_of(draft).double().tolist()):  # every draft accepted: the bonus token
            if p_y > 0.0:
                key = (*draft, y)
                out[key] = out.get(key, 0.0) + p_reach * p_y
    return out


def expected_tokens_per_step(alpha: float, gamma: int) -> float:
    """Expected tokens emitted per target forward, ``(1 - alpha^(gamma + 1)) / (1 - alpha)``
    (Leviathan et al. 2023, eq. 1), for acceptance rate ``alpha`` (i.i.d. per position) and ``gamma`` drafts."""
    alpha = check_float("alpha", alpha, min_value=0.0, max_value=1.0)
    gamma = check_int("gamma", gamma, min_value=0)
    if alpha == 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)
