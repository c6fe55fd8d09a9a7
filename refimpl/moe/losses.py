"""Router auxiliary losses: the load-balancing loss (Switch) and the router z-loss (ST-MoE)."""

from __future__ import annotations

import torch
from torch import Tensor

from refimpl._checks import check_float, check_tensor

__all__ = ["expert_fractions", "load_balancing_loss", "router_z_loss"]


def expert_fractions(index: Tensor, n_experts: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``f_i``: the fraction of the ``N k`` assignments that go to expert ``i`` (Switch eq. 5, all k choices).

    ``index``: ``(N, k)`` int64 chosen experts. ``n_experts``: ``E``.

    Returns ``(E,)`` fractions of ``dtype`` summing to 1 (all zeros when ``N = 0``).
    """
    check_tensor("index", index, ndim=2, dtypes=[torch.int64])
    counts = torch.bincount(index.reshape(-1), minlength=n_experts).to(dtype)  # (E,)
    return counts / max(index.numel(), 1)


def load_balancing_loss(probs: Tensor, index: Tensor, alpha: float = 1e-2) -> Tensor:
    """Switch Transformer load-balancing loss ``alpha * E * sum_i f_i * P_i`` (Fedus et al. 2022, eq. 4-6).

    ``f_i`` is the fraction of assignments dispatched to expert ``i`` (counted over all ``k`` choices, before
    any capacity drop, normalized by ``N k`` so that ``sum_i f_i = 1``); ``P_i = mean_x p_i(x)`` is the mean
    router probability. ``f`` is a count and carries no gradient; the gradient reaches the router through
    ``P``, pushing probability away from over-used experts. Under uniform routing (``f_i = P_i = 1/E``) the
    loss equals ``alpha``, and when the router's choices follow its probabilities (``f = P``)
    Cauchy-Schwarz gives ``E * sum_i P_i^2 >= 1``, with equality only at the uniform distribution.

    ``probs``: ``(N, E)`` router probabilities ``p(x)`` (rows sum to 1). ``index``: ``(N, k)`` int64 experts chosen
    per token (the top-k of ``probs`` or of a wider set). ``alpha``: the loss coefficient (Switch uses ``1e-2``);
    ``alpha >= 0``.

    Returns a scalar tensor.
    """
    check_tensor("probs", probs, ndim=2, floating=True)
    check_tensor("index", index, ndim=2, dtypes=[torch.int64])
    if index.shape[0] != probs.shape[0]:
        raise ValueError(f"index must have {probs.shape[0]} rows like probs, got shape {tuple(index.shape)}")
    alpha = check_float("alpha", alpha, min_value=0.0)
    n_experts = probs.shape[1]
    f = expert_fractions(index, n_experts, probs.dtype)  # (E,)  f_i, eq. (5)
    p = probs.mean(dim=0)  # (E,)  P_i, eq. (6)
    return alpha * n_experts * torch.sum(f * p)  # eq. (4)


def router_z_loss(logits: Tensor, coef: float = 1e-3) -> Tensor:
    """Router z-loss ``coef * mean_x (log sum_j exp h_j(x))^2`` (Zoph et al. 2022, ST-MoE, eq. 5).

    It penalizes large router logits, which make the softmax round-off-sensitive in low precision and make
    training unstable; it leaves the routing decisions (the argmax) free. ST-MoE uses ``coef = 1e-3``.

    ``logits``: ``(N, E)`` router logits. ``coef``: ``c_z >= 0``.

    Returns a scalar tensor (0 for ``N = 0``).
    """
    check_tensor("logits", logits, ndim=2, floating=True)
    coef = check_float("coef", coef, min_value=0.0)
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    z = torch.logsumexp(logits, dim=-1)  # (N,)
    return coef * torch.mean(z**2)
