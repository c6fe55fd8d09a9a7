"""Dispatch and combine: three ways to run ``y = sum_i G(x)_i E_i(x)`` over a :class:`Routing`, proven equal.

Every expert is the same two-layer feed-forward network with its own weights, ``E_i(x) = gelu(x W1_i) W2_i``;
the weights of all ``E`` experts are stacked as ``w1 (E, d, h)`` and ``w2 (E, h, d)``.

1. :func:`moe_masked_loop` - the reference. The MoE equation evaluated literally (Shazeer et al. 2017, eq. 1):
   a Python loop over experts that runs *every* expert on *every* token and multiplies by the gate, which is
   zero where a token was not routed. ``E / k`` times the FLOPs of the sparse layer; obviously correct.
   :func:`moe_gather_loop` is the usual eager implementation (e.g. Hugging Face Mixtral): the same loop, but
   each expert gathers only its own tokens.
2. :func:`moe_dense` - the capacity-based layout of GShard/Switch (Mesh TensorFlow): a one-hot dispatch tensor
   ``(N, E, C)`` moves tokens into fixed-size expert buffers with an einsum, a batched matmul runs all experts,
   and a combine tensor of the same shape brings the outputs back. Static shapes, but ``N E C`` memory and
   ``O(N E C d)`` FLOPs for the two einsums alone.
3. :func:`moe_sorted` - dropless, sort-based (MegaBlocks, Gale et al. 2023): ``argsort`` the assignments by
   expert, gather the rows so every expert's tokens are contiguous, run one grouped matmul over the jagged
   segments, scale by the gates and scatter-add back. ``O(A d)`` memory, no padding, no capacity needed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from refimpl._checks import check_choice, check_int, check_tensor
from refimpl.moe.routers import Routing, queue_positions

__all__ = [
    "dense_dispatch_bytes",
    "dense_dispatch_tensors",
    "expert_ffn",
    "grouped_matmul",
    "grouped_mm_supported",
    "moe_dense",
    "moe_gather_loop",
    "moe_masked_loop",
    "moe_sorted",
    "sort_by_expert",
]


def expert_ffn(x: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    """One expert, ``gelu(x @ w1) @ w2``: ``x (n, d)``, ``w1 (d, h)``, ``w2 (h, d)`` -> ``(n, d)``."""
    return F.gelu(x @ w1) @ w2


def _check_problem(x: Tensor, routing: Routing, w1: Tensor, w2: Tensor) -> None:
    """Validate shapes of a dispatch call: x (N, d), w1 (E, d, h), w2 (E, h, d), routing over N tokens, E experts."""
    check_tensor("x", x, ndim=2, floating=True)
    check_tensor("w1", w1, ndim=3, floating=True)
    check_tensor("w2", w2, ndim=3, floating=True)
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a Routing, got {type(routing).__name__}")
    n, d = x.shape
    e, d1, h = w1.shape
    if d1 != d or tuple(w2.shape) != (e, h, d):
        raise ValueError(
            f"w1 must be (E, d={d}, h) and w2 (E, h, d), got w1 {tuple(w1.shape)} and w2 {tuple(w2.shape)}"
        )
    if routing.n_tokens != n or routing.n_experts != e:
        raise ValueError(
            f"routing must cover x's {n} tokens and w1's {e} experts, "
            f"got n_tokens={routing.n_tokens}, n_experts={routing.n_experts}"
        )


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    The CPU grouped-matmul backward rejects zero-stride (expanded) gradients such as the one ``y.sum()``
    produces; this costs nothing when the gradient is already contiguous.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad.contiguous()


def grouped_mm_supported(a: Tensor, b: Tensor) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` (PyTorch >= 2.9) can run this product."""
    if not hasattr(F, "grouped_mm"):
        return False
    if a.device.type == "cuda":
        ok_dtypes = (torch.bfloat16,)  # CUDA kernels: bf16 on SM >= 80
    elif a.device.type == "cpu":
        ok_dtypes = (torch.float32, torch.bfloat16, torch.float16)
    else:
        return False
    if a.dtype not in ok_dtypes or b.dtype != a.dtype:
        return False
    # The kernels need every row stride to be a multiple of 16 bytes.
    size = a.element_size()
    return (a.shape[1] * size) % 16 == 0 and (b.shape[2] * size) % 16 == 0


def grouped_matmul(a: Tensor, b: Tensor, counts: Tensor, *, impl: str = "auto") -> Tensor:
    """Jagged batched product: rows ``[o_i, o_i + counts[i])`` of ``a`` times ``b[i]``, for every group ``i``.

    ``a``: ``(A, K)`` rows sorted by group, ``A = counts.sum()``. ``b``: ``(G, K, M)`` one matrix per group.
    ``counts``: ``(G,)`` int64 rows per group (zeros allowed). ``impl``: ``"grouped_mm"`` (one
    ``torch.nn.functional.grouped_mm`` call; needs a supported dtype/device), ``"loop"`` (a matmul per contiguous
    slice), or ``"auto"`` (grouped_mm when supported).

    Returns ``(A, M)``.
    """
    check_tensor("a", a, ndim=2, floating=True)
    check_tensor("b", b, ndim=3, floating=True)
    check_tensor("counts", counts, ndim=1, dtypes=[torch.int64])
    impl = check_choice("impl", impl, ("auto", "grouped_mm", "loop"))
    if b.shape[0] != counts.shape[0] or b.shape[1] != a.shape[1]:
        raise ValueError(
            f"b must be (G={counts.shape[0]}, K={a.shape[1]}, M), got {tuple(b.shape)} for a {tuple(a.shape)}"
        )
    use_grouped = grouped_mm_supported(a, b)
    if impl == "grouped_mm" and not use_grouped:
        raise ValueError(f"impl='grouped_mm' is not supported for {a.dtype} on {a.device} with these shapes")
    if impl != "loop" and use_grouped:
        offs = torch.cumsum(counts, 0).to(torch.int32)  # (G,) end of each group's rows
        return _ContiguousGrad.apply(F.grouped_mm(a.contiguous(), b.contiguous(), offs=offs))
    pieces = torch.split(a, counts.tolist())  # views of contiguous segments, no copy
    return torch.cat([piece @ b[i] for i, piece in enumerate(pieces)], dim=0)


def moe_masked_loop(x: Tensor, routing: Routing, w1: Tensor, w2: Tensor) -> Tensor:
    """Reference: ``y = sum_i G(x)_i E_i(x)`` with every expert applied to every token (Shazeer 2017, eq. 1).

    ``G`` is the ``(N, E)`` gate matrix, zero wherever a token was not routed (or was dropped), so the
    skipped work is multiplied by zero. Differentiable in ``x``, the weights and ``routing.weight``.

    ``x``: ``(N, d)`` tokens. ``routing``: assignments over ``N`` tokens and ``E`` experts. ``w1, w2``: ``(E, d,
    h)`` and ``(E, h, d)`` expert weights.

    Returns ``(N, d)`` the expert mixture (without the residual).
    """
    _check_problem(x, routing, w1, w2)
    n, e = routing.n_tokens, routing.n_experts
    gates = routing.weight.new_zeros(n, e).index_put((routing.token, routing.expert), routing.weight, True)
    y = x.new_zeros(x.shape)
    for i in range(e):
        y = y + gates[:, i : i + 1] * expert_ffn(x, w1[i], w2[i])  # (N, d): all N tokens through expert i
    return y


def moe_gather_loop(x: Tensor, routing: Routing, w1: Tensor, w2: Tensor) -> Tensor:
    """Per-expert loop that gathers only the tokens routed to each expert (the usual eager implementation).

    Same arguments and result as :func:`moe_masked_loop`; ``A`` rows of FFN work instead of ``N E``.
    """
    _check_problem(x, routing, w1, w2)
    y = x.new_zeros(x.shape)
    for i in range(routing.n_experts):
        mine = torch.nonzero(routing.expert == i).squeeze(1)  # (A_i,) this expert's assignments
        token = routing.token[mine]
        out = expert_ffn(x.index_select(0, token), w1[i], w2[i])  # (A_i, d)
        y = y.index_add(0, token, out * routing.weight[mine, None])
    return y


def dense_dispatch_tensors(routing: Routing, capacity: int, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """GShard's one-hot dispatch tensor and its combine tensor, both ``(N, E, C)``.

    ``dispatch[n, i, c] = 1`` when token ``n`` occupies slot ``c`` of expert ``i``'s buffer, the slot being
    its position in the expert's priority queue (:func:`~refimpl.moe.routers.queue_positions`);
    ``combine`` holds the gate at the same place. Each tensor takes ``N E C`` elements of memory.

    Raises ``ValueError`` if some expert has more than ``capacity`` assignments (apply the capacity first).
    """
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a Routing, got {type(routing).__name__}")
    capacity = check_int("capacity", capacity, min_value=0)
    position = queue_positions(routing.expert, routing.n_experts)  # (A,) slot in the expert's buffer
    if routing.n_assignments and int(position.max()) >= capacity:
        most = int(routing.tokens_per_expert().max())
        raise ValueError(
            f"capacity must be >= the most assignments of one expert ({most}) for dense dispatch, got {capacity}; "
            "drop the overflow with apply_capacity first"
        )
    dtype = routing.weight.dtype if dtype is None else dtype
    shape = (routing.n_tokens, routing.n_experts, capacity)
    where = (routing.token, routing.expert, position)
    dispatch = torch.zeros(shape, dtype=dtype, device=routing.weight.device)
    dispatch[where] = 1.0
    combine = routing.weight.new_zeros(shape).index_put(where, routing.weight)  # differentiable in weight
    return dispatch, combine


def dense_dispatch_bytes(n_tokens: int, n_experts: int, capacity: int, dtype: torch.dtype) -> int:
    """Bytes of ONE ``(N, E, C)`` dispatch (or combine) tensor of ``dtype``: ``N * E * C * itemsize``."""
    n_tokens = check_int("n_tokens", n_tokens, min_value=0)
    n_experts = check_int("n_experts", n_experts, min_value=1)
    capacity = check_int("capacity", capacity, min_value=0)
    return n_tokens * n_experts * capacity * torch.empty((), dtype=dtype).element_size()


def moe_dense(x: Tensor, routing: Routing, w1: Tensor, w2: Tensor, capacity: int) -> Tensor:
    """Capacity-based dense dispatch (GShard, Switch Transformer): einsum in, batched FFN, einsum out.

    ``x``: ``(N, d)`` tokens. ``routing``: assignments, at most ``capacity`` per expert (see
    :func:`~refimpl.moe.routers.apply_capacity`). ``w1, w2``: ``(E, d, h)`` and ``(E, h, d)`` expert weights.
    ``capacity``: ``C``, the slots per expert buffer.

    Returns ``(N, d)`` the expert mixture, equal to :func:`moe_masked_loop` on the same routing.
    """
    _check_problem(x, routing, w1, w2)
    dispatch, combine = dense_dispatch_tensors(routing, capacity, dtype=x.dtype)  # (N, E, C) each
    expert_in = torch.einsum("nec,nd->ecd", dispatch, x)  # (E, C, d) fixed-size expert buffers
    hidden = F.gelu(torch.bmm(expert_in, w1))  # (E, C, h); empty slots stay 0 (no bias, gelu(0) = 0)
    expert_out = torch.bmm(hidden, w2)  # (E, C, d)
    return torch.einsum("nec,ecd->nd", combine, expert_out)  # (N, d)


def sort_by_expert(routing: Routing) -> tuple[Tensor, Tensor]:
    """Permutation that makes every expert's assignments contiguous, and the ``(E,)`` segment lengths.

    Returns ``(order, counts)``: ``order (A,)`` int64 with ``routing.expert[order]`` non-decreasing (stable, so
    priority order is kept within an expert) and ``counts (E,)`` int64.
    """
    order = torch.argsort(routing.expert, stable=True)
    return order, routing.tokens_per_expert()


def moe_sorted(x: Tensor, routing: Routing, w1: Tensor, w2: Tensor, *, impl: str = "auto") -> Tensor:
    """Dropless sort-based MoE (MegaBlocks, Gale et al. 2023): permute, grouped matmul, un-permute.

    ``x``: ``(N, d)`` tokens. ``routing``: any assignments (no capacity needed; pass a capacity-filtered routing to
    drop). ``w1, w2``: ``(E, d, h)`` and ``(E, h, d)`` expert weights. ``impl``: how to run the grouped matmul, see
    :func:`grouped_matmul`.

    Returns ``(N, d)`` the expert mixture, equal to :func:`moe_masked_loop` on the same routing.
    """
    _check_problem(x, routing, w1, w2)
    order, counts = sort_by_expert(routing)
    token = routing.token[order]  # (A,) source row of each sorted assignment
    x_sorted = x.index_select(0, token)  # (A, d) expert i's rows are the i-th contiguous segment
    hidden = F.gelu(grouped_matmul(x_sorted, w1, counts, impl=impl))  # (A, h)
    out = grouped_matmul(hidden, w2, counts, impl=impl) * routing.weight[order, None]  # (A, d)
    return out.new_zeros(x.shape).index_add(0, token, out)  # combine: sum each token's k outputs
