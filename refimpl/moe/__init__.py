"""Mixture-of-Experts routing and dispatch (chapter ``chapters/moe``).

* :mod:`refimpl.moe.routers` - top-k gating (Switch, GShard), capacity and dropping, expert choice, AdaMoE null
  experts, MoGE grouped top-k, the imbalance score;
* :mod:`refimpl.moe.losses` - load-balancing loss and router z-loss;
* :mod:`refimpl.moe.dispatch` - three equal dispatch/combine implementations (masked loop, dense one-hot,
  sort-based grouped matmul);
* :mod:`refimpl.moe.parallel` - expert parallelism over ``torch.distributed`` processes with all-to-all;
* :mod:`refimpl.moe.layer` - a residual MoE layer with any of the routers, and a small stack of them;
* :mod:`refimpl.moe.train` - a synthetic task on which routing matters and a training loop that records it.

``parallel``, ``layer`` and ``train`` are imported on demand (``from refimpl.moe.layer import MoELayer``).
"""

from refimpl.moe.dispatch import (
    dense_dispatch_bytes,
    dense_dispatch_tensors,
    expert_ffn,
    grouped_matmul,
    grouped_mm_supported,
    moe_dense,
    moe_gather_loop,
    moe_masked_loop,
    moe_sorted,
    sort_by_expert,
)
from refimpl.moe.losses import expert_fractions, load_balancing_loss, router_z_loss
from refimpl.moe.routers import (
    Routing,
    TopKGate,
    apply_capacity,
    expert_capacity,
    expert_choice,
    grouped_top_k_gating,
    imbalance_score,
    null_expert_gating,
    queue_positions,
    top_k_gating,
)

__all__ = [
    "Routing",
    "TopKGate",
    "apply_capacity",
    "dense_dispatch_bytes",
    "dense_dispatch_tensors",
    "expert_capacity",
    "expert_choice",
    "expert_ffn",
    "expert_fractions",
    "grouped_matmul",
    "grouped_mm_supported",
    "grouped_top_k_gating",
    "imbalance_score",
    "load_balancing_loss",
    "moe_dense",
    "moe_gather_loop",
    "moe_masked_loop",
    "moe_sorted",
    "null_expert_gating",
    "queue_positions",
    "router_z_loss",
    "sort_by_expert",
    "top_k_gating",
]
