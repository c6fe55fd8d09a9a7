"""An MoE feed-forward layer that puts the routers, losses and dispatch together, and a small stack of them.

``MoELayer`` computes ``x + sum_i G(u)_i E_i(u)`` with ``u = LayerNorm(x)`` (pre-norm residual block, as in
Switch Transformer's FFN replacement). Dropped assignments contribute nothing, so a token whose every choice
was dropped leaves the layer unchanged (the residual). The router is one linear map ``h(u) = W_r u``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from refimpl._checks import check_choice, check_float, check_int, check_positive_int, check_tensor
from refimpl.moe.dispatch import moe_dense, moe_gather_loop, moe_masked_loop, moe_sorted
from refimpl.moe.losses import load_balancing_loss, router_z_loss
from refimpl.moe.routers import (
    Routing,
    apply_capacity,
    expert_capacity,
    expert_choice,
    grouped_top_k_gating,
    null_expert_gating,
    top_k_gating,
)

__all__ = ["ROUTERS", "MoEAux", "MoELayer", "MoEStack"]

ROUTERS = ("top_k", "expert_choice", "null", "grouped")
DISPATCH = ("sorted", "gather_loop", "masked_loop", "dense")


@dataclass
class MoEAux:
    """Side outputs of one :class:`MoELayer` call.

    Attributes:
        aux_loss: scalar, ``balance_loss + z_loss`` (add it to the task loss).
        balance_loss: scalar load-balancing loss (0 when ``alpha = 0`` or for expert choice).
        z_loss: scalar router z-loss (0 when ``z_coef = 0``).
        routing: the assignments that were computed (after any capacity drop).
        tokens_per_expert: ``(E,)`` assignments each expert computed.
        requested_per_expert: ``(E,)`` assignments the router sent to each expert before any capacity drop.
        dropped: number of assignments dropped for capacity.
        requested: number of assignments the router asked for before dropping.
        real_per_token: mean number of real experts that computed each token.
        router_logits: ``(N, E [+ m])`` the router's logits ``h(u)``.
    """

    aux_loss: Tensor
    balance_loss: Tensor
    z_loss: Tensor
    routing: Routing
    tokens_per_expert: Tensor
    requested_per_expert: Tensor
    dropped: int
    requested: int
    real_per_token: float
    router_logits: Tensor


class MoELayer(nn.Module):
    """Pre-norm residual MoE feed-forward layer with a choice of router.

    ``d_model``: ``d``, token width. ``d_hidden``: ``h``, hidden width of each expert FFN. ``n_experts``: ``E`` real
    experts. ``router``: ``"top_k"`` (Switch/GShard), ``"expert_choice"`` (Zhou et al. 2022), ``"null"`` (AdaMoE
    null experts, Zeng et al. 2024) or ``"grouped"`` (MoGE, Tang et al. 2025). ``k``: choices per token (for
    ``"null"``: over real and null experts). ``capacity_factor``: ``c``; for top-k style routers ``None`` means
    dropless, otherwise each expert keeps at most ``ceil(c N k / E)`` assignments. For ``"expert_choice"`` it is
    required (experts per token). ``normalize``: renormalize the kept gates (default: ``k > 1``; see
    :func:`~refimpl.moe.routers.top_k_gating`). ``n_null``: ``m`` null experts (router ``"null"`` only).
    ``n_groups``: ``M`` expert groups (router ``"grouped"`` only). ``alpha``: load-balancing loss coefficient
    (Switch uses ``1e-2``). ``z_coef``: router z-loss coefficient (ST-MoE uses ``1e-3``). ``dispatch``: ``"sorted"``
    (default), ``"gather_loop"``, ``"masked_loop"`` or ``"dense"``.
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        n_experts: int,
        *,
        router: str = "top_k",
        k: int = 1,
        capacity_factor: float | None = None,
        normalize: bool | None = None,
        n_null: int = 0,
        n_groups: int = 1,
        alpha: float = 0.0,
        z_coef: float = 0.0,
        dispatch: str = "sorted",
    ) -> None:
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.d_hidden = check_positive_int("d_hidden", d_hidden)
        self.n_experts = check_positive_int("n_experts", n_experts)
        self.router_kind = check_choice("router", router, ROUTERS)
        self.dispatch = check_choice("dispatch", dispatch, DISPATCH)
        self.n_null = check_int("n_null", n_null, min_value=1 if router == "null" else 0)
        if router != "null" and self.n_null:
            raise ValueError(f"n_null must be 0 unless router='null', got {n_null} with router={router!r}")
        self.k = check_int("k", k, min_value=1, max_value=n_experts + self.n_null)
        self.n_groups = check_positive_int("n_groups", n_groups)
        if router == "grouped" and (n_experts % n_groups or k % n_groups):
            raise ValueError(f"n_groups must divide n_experts={n_experts} and k={k}, got n_groups={n_groups}")
        if capacity_factor is not None:
            capacity_factor = check_float("capacity_factor", capacity_factor, min_value=0.0, min_inclusive=False)
        elif router == "expert_choice":
            raise ValueError("capacity_factor must be given for router='expert_choice' (experts per token)")
        self.capacity_factor = capacity_factor
        self.normalize = (k > 1) if normalize is None else bool(normalize)
        self.alpha = check_float("alpha", alpha, min_value=0.0)
        self.z_coef = check_float("z_coef", z_coef, min_value=0.0)

        self.norm = nn.LayerNorm(d_model)
        self.router = nn.Linear(d_model, n_experts + self.n_null, bias=False)  # W_r
        # Experts stacked as (E, d, h) and (E, h, d); init like nn.Linear (uniform, fan-in scaled).
        self.w1 = nn.Parameter(torch.empty(n_experts, d_model, d_hidden).uniform_(-1, 1) / math.sqrt(d_model))
        self.w2 = nn.Parameter(torch.empty(n_experts, d_hidden, d_model).uniform_(-1, 1) / math.sqrt(d_hidden))

    def route(self, logits: Tensor) -> tuple[Routing, Tensor, Tensor, Tensor, int]:
        """Route by the ``(N, E [+ m])`` logits: ``(routing, balance_loss, z_loss, requested_per_expert, dropped)``."""
        n = logits.shape[0]
        z = router_z_loss(logits, self.z_coef) if self.z_coef else logits.new_zeros(())
        balance = logits.new_zeros(())
        if self.router_kind == "expert_choice":
            routing = expert_choice(logits, self.capacity_factor)
            return routing, balance, z, routing.tokens_per_expert(), 0
        if self.router_kind == "top_k":
            gate = top_k_gating(logits, self.k, normalize=self.normalize)
            routing = gate.routing()
        elif self.router_kind == "grouped":
            gate = grouped_top_k_gating(logits, self.k, self.n_groups, normalize=self.normalize)
            routing = gate.routing()
        else:  # "null": AdaMoE
            gate, routing = null_expert_gating(logits, self.k, self.n_null)
        if self.alpha:
            balance = load_balancing_loss(gate.probs, gate.index, self.alpha)
        requested = routing.tokens_per_expert()
        dropped = 0
        if self.capacity_factor is not None:
            capacity = expert_capacity(n, self.n_experts, self.k, self.capacity_factor)
            routing, dropped_per_expert = apply_capacity(routing, capacity)
            dropped = int(dropped_per_expert.sum())
        return routing, balance, z, requested, dropped

    def forward(self, x: Tensor) -> tuple[Tensor, MoEAux]:
        """``x (N, d)`` -> ``(x + MoE(LayerNorm(x)) (N, d), MoEAux)``."""
        check_tensor("x", x, ndim=2, floating=True)
        if x.shape[1] != self.d_model:
            raise ValueError(f"x must have {self.d_model} features, got shape {tuple(x.shape)}")
        u = self.norm(x)
        logits = self.router(u)  # (N, E [+ m])  h(u) = W_r u
        routing, balance, z, requested, dropped = self.route(logits)
        if self.dispatch == "sorted":
            y = moe_sorted(u, routing, self.w1, self.w2)
        elif self.dispatch == "gather_loop":
            y = moe_gather_loop(u, routing, self.w1, self.w2)
        elif self.dispatch == "masked_loop":
            y = moe_masked_loop(u, routing, self.w1, self.w2)
        else:
            capacity = int(routing.tokens_per_expert().max()) if routing.n_assignments else 0
            if self.capacity_factor is not None and self.router_kind != "expert_choice":
                capacity = expert_capacity(x.shape[0], self.n_experts, self.k, self.capacity_factor)
            y = moe_dense(u, routing, self.w1, self.w2, capacity)
        aux = MoEAux(
            aux_loss=balance + z,
            balance_loss=balance,
            z_loss=z,
            routing=routing,
            tokens_per_expert=routing.tokens_per_expert(),
            requested_per_expert=requested,
            dropped=dropped,
            requested=int(requested.sum()),
            real_per_token=routing.n_assignments / max(x.shape[0], 1),
            router_logits=logits,
        )
        return x + y, aux


class MoEStack(nn.Module):
    """``n_layers`` :class:`MoELayer` blocks between a linear read-in and a linear read-out.

    ``d_in, d_out``: input and output widths; ``n_layers``: number of MoE blocks; ``layer_kwargs`` are passed to
    every :class:`MoELayer` (``d_model``, ``d_hidden``, ``n_experts``, router options).
    """

    def __init__(self, d_in: int, d_out: int, n_layers: int, **layer_kwargs: object) -> None:
        super().__init__()
        n_layers = check_positive_int("n_layers", n_layers)
        d_model = check_positive_int("d_model", layer_kwargs.get("d_model"))
        self.read_in = nn.Linear(check_positive_int("d_in", d_in), d_model)
        self.layers = nn.ModuleList([MoELayer(**layer_kwargs) for _ in range(n_layers)])  # type: ignore[arg-type]
        self.read_out = nn.Linear(d_model, check_positive_int("d_out", d_out))

    def forward(self, x: Tensor) -> tuple[Tensor, list[MoEAux]]:
        """``x (N, d_in)`` -> ``(prediction (N, d_out), one MoEAux per layer)``."""
        h = self.read_in(x)
        auxes = []
        for layer in self.layers:
            h, aux = layer(h)
            auxes.append(aux)
        return self.read_out(h), auxes
