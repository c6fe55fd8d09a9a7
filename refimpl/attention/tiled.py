"""Tiled exact attention: online softmax, the FlashAttention forward (FA2 and FA1 loop orders), and the
backward pass by recomputation, as a ``torch.autograd.Function``.

Notation of the papers (Dao et al. 2022; Dao 2023): ``Q_i`` is the i-th block of ``B_r`` query rows,
``K_j, V_j`` the j-th block of ``B_c`` key/value rows, ``S_i^(j) = Q_i K_j^T`` a score tile, ``m`` the running
row maximum, ``l`` the running row sum of ``exp(S - m)``, ``L = m + log l`` the log-sum-exp of a row.
The full ``N_q x N_k`` score matrix never exists: only one ``B_r x B_c`` tile at a time ("SRAM"), while the
full tensors ``Q, K, V, O, L`` live in "HBM". Every block that moves between the two goes through an
:class:`~refimpl.attention.io_count.IOCounter`, so the traffic is counted by the same loop that computes.

The Python loops run over blocks, never over tokens; inside a tile everything is a batched tensor op over
``(B, H_kv, G * B_r, B_c)``: the ``G`` query heads that share a KV head are stacked as rows of one tile, so a
K/V block is loaded once per group (grouped-query attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from refimpl._checks import check_choice, check_positive_int, check_same_device, check_tensor
from refimpl.attention.common import accumulation_dtype, causal_visible, check_attention_inputs, recomputing_function
from refimpl.attention.io_count import IOCounter

__all__ = [
    "FlashAttentionFunction",
    "flash_attention",
    "flash_attention_backward",
    "flash_attention_forward",
    "online_softmax",
]

NEG_INF = float("-inf")
POS_INF = float("inf")


def online_softmax(x: Tensor, block_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax over the last dim of ``x`` read in blocks of ``block_size`` columns (Milakov & Gimelshein 2018).

    One pass keeps, per row, the running maximum ``m`` and the running sum ``ell = sum exp(x - m)`` (the papers'
    l); a new block with maximum ``m~`` and sum ``ell~`` (relative to ``m~``) is merged by ``m' = max(m, m~)``,
    ``ell' = exp(m - m') ell + exp(m~ - m') ell~`` (their Algorithm 3), exact at every step because
    ``exp(x - m) = exp(x - m') exp(m' - m)``. A second pass forms ``exp(x - m) / ell``.

    Shapes: ``x: (..., n)``; returns ``(softmax(x), m, ell)`` with ``m, ell: (...)``. Rows of ``-inf`` give zero
    probabilities and ``ell = 0``.
    """
    check_tensor("x", x, floating=True)
    block_size = check_positive_int("block_size", block_size)
    m = torch.full(x.shape[:-1], NEG_INF, dtype=x.dtype, device=x.device)
    ell = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
    for j0 in range(0, x.shape[-1], block_size):
        block = x[..., j0 : j0 + block_size]
        m_new = torch.maximum(m, block.amax(dim=-1))
        m_use = m_new.masked_fill(m_new == NEG_INF, 0.0)  # nothing seen yet: keep exp() away from -inf - -inf
        ell = torch.exp(m - m_use) * ell + torch.exp(block - m_use.unsqueeze(-1)).sum(dim=-1)
        m = m_new
    m_use = m.masked_fill(m == NEG_INF, 0.0)
    p = torch.exp(x - m_use.unsqueeze(-1)) / ell.masked_fill(ell == 0, 1.0).unsqueeze(-1)
    return p, m, ell


@dataclass(frozen=True)
class _Grid:
    """What the three tile loops share: shapes, the accumulation dtype, the causal diagonal."""

    dims: tuple[int, int, int, int, int, int]  # (B, H_kv, G, N_q, N_k, d)
    acc_dtype: torch.dtype  # float32 (float64 for float64 inputs): see refimpl.attention.common
    causal: bool
    offset: int  # bottom-right causal: query i sees keys j <= i + offset
    q_pos: Tensor  # (N_q,)
    k_pos: Tensor  # (N_k,)

    @staticmethod
    def of(q: Tensor, k: Tensor, causal: bool) -> _Grid:
        b, h_q, n_q, d = q.shape
        h_kv, n_k = k.shape[1], k.shape[2]
        dims = (b, h_kv, h_q // h_kv, n_q, n_k, d)
        pos = torch.arange(n_q, device=q.device), torch.arange(n_k, device=q.device)
        return _Grid(dims, accumulation_dtype(q.dtype), causal, n_k - n_q, *pos)

    def load_kv(self, io: IOCounter, k: Tensor, v: Tensor, j0: int, j1: int) -> tuple[Tensor, Tensor]:
        """Load ``K_j, V_j`` (rows ``j0:j1``) to SRAM in the accumulation dtype: ``(B, H_kv, B_c, d)`` each."""
        return io.load("K", k[:, :, j0:j1]).to(self.acc_dtype), io.load("V", v[:, :, j0:j1]).to(self.acc_dtype)

    def mask_(self, s: Tensor, i0: int, i1: int, j0: int, j1: int) -> bool:
        """Set the scores of tile ``S_i^(j)`` right of the causal diagonal to ``-inf`` in place; return whether
        the tile crosses the diagonal (tiles entirely left of it need no mask)."""
        masked = self.causal and j1 - 1 > i0 + self.offset
        if masked:
            visible = causal_visible(self.q_pos[i0:i1], self.k_pos[j0:j1], self.offset)
            s.masked_fill_(~visible.repeat(self.dims[2], 1), NEG_INF)  # the G stacked query heads share it
        return masked


# ----------------------------------------------------------------------------------------------------------
# Forward, FlashAttention-2 loop order (Dao 2023, Algorithm 1)
# ----------------------------------------------------------------------------------------------------------


def _fa2_forward(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, block_q: int, block_k: int, io: IOCounter
) -> tuple[Tensor, Tensor]:
    """Outer loop over query blocks (independent: one GPU thread block each), inner over key blocks."""
    grid = _Grid.of(q, k, causal)
    (b, h_kv, g, n_q, n_k, d), acc_dtype = grid.dims, grid.acc_dtype
    q5 = q.unflatten(1, (h_kv, g))  # (B, H_kv, G, N_q, d)
    o = q.new_empty(b, h_kv, g, n_q, d)  # HBM
    lse = torch.empty(b, h_kv, g, n_q, dtype=acc_dtype, device=q.device)  # HBM

    for qb, i0 in enumerate(range(0, n_q, block_q)):
        i1 = min(i0 + block_q, n_q)
        rows = g * (i1 - i0)  # the group's query heads stacked as rows
        # Load Q_i to SRAM; the softmax scale is folded into it once instead of into every S tile.
        q_i = io.load("Q", q5[:, :, :, i0:i1]).to(acc_dtype).reshape(b, h_kv, rows, d) * scale
        m_i = torch.full((b, h_kv, rows), NEG_INF, dtype=acc_dtype, device=q.device)  # m_i^(0) = -inf
        l_i = torch.zeros(b, h_kv, rows, dtype=acc_dtype, device=q.device)  # l_i^(0) = 0
        acc = torch.zeros(b, h_kv, rows, d, dtype=acc_dtype, device=q.device)  # O~_i^(0) = 0
        # Causal: key blocks right of the diagonal are skipped entirely (never loaded, never computed).
        j_end = min(n_k, max(0, i1 + grid.offset)) if causal else n_k
        for kb, j0 in enumerate(range(0, j_end, block_k)):
            j1 = min(j0 + block_k, n_k)
            k_j, v_j = grid.load_kv(io, k, v, j0, j1)  # (B, H_kv, B_c, d)
            s = q_i @ k_j.transpose(-1, -2)  # S_i^(j) = Q_i K_j^T             (B, H_kv, G B_r, B_c)
            masked = grid.mask_(s, i0, i1, j0, j1)
            m_new = torch.maximum(m_i, s.amax(dim=-1))  # m_i^(j) = max(m_i^(j-1), rowmax(S_i^(j)))
            m_use = m_new.masked_fill(m_new == NEG_INF, 0.0)  # a row that saw no key yet: exp(-inf - 0) = 0
            p = torch.exp(s - m_use.unsqueeze(-1))  # P~_i^(j) = exp(S_i^(j) - m_i^(j))
            alpha = torch.exp(m_i - m_use)  # exp(m_i^(j-1) - m_i^(j)): rescales what was summed so far
            l_i = alpha * l_i + p.sum(dim=-1)  # l_i^(j)
            acc = alpha.unsqueeze(-1) * acc + p @ v_j  # O~_i^(j) = diag(alpha) O~_i^(j-1) + P~ V_j, unnormalised
            m_i = m_new
            io.visit(qb, kb, masked, m_i, l_i)
        # FA2's single rescale after the inner loop, and the log-sum-exp the backward pass will need.
        # A row that saw no key has l = 0: output 0 and L = +inf, so P = exp(S - L) = 0 in the backward.
        empty = l_i == 0
        o_i = acc / l_i.masked_fill(empty, 1.0).unsqueeze(-1)  # O_i = diag(l_i)^-1 O~_i
        lse_i = (m_i + torch.log(l_i)).masked_fill(empty, POS_INF)  # L_i = m_i + log(l_i)
        o[:, :, :, i0:i1] = o_i.view(b, h_kv, g, i1 - i0, d)  # cast back to the input dtype on the write
        lse[:, :, :, i0:i1] = lse_i.view(b, h_kv, g, i1 - i0)
        io.store("O", o_i)
        io.store("L", lse_i)
    return o.flatten(1, 2), lse.flatten(1, 2)


# ----------------------------------------------------------------------------------------------------------
# Forward, FlashAttention-1 loop order (Dao et al. 2022, Algorithm 1), for comparison
# ----------------------------------------------------------------------------------------------------------


def _first_query_block_start(j0: int, n_q: int, offset: int, block_q: int, causal: bool) -> int:
    """Start row of the first query block that sees key ``j0`` (``n_q`` if none does)."""
    first = j0 - offset if causal else 0  # query i sees key j0 iff i >= j0 - offset
    return n_q if first >= n_q else (max(0, first) // block_q) * block_q


def _fa1_forward(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, block_q: int, block_k: int, io: IOCounter
) -> tuple[Tensor, Tensor]:
    """Outer loop over key blocks, inner over query blocks; O, l, m go back to HBM after every tile."""
    grid = _Grid.of(q, k, causal)
    (b, h_kv, g, n_q, n_k, d), acc_dtype = grid.dims, grid.acc_dtype
    q5 = q.unflatten(1, (h_kv, g))
    # Line 2: initialise O = 0, l = 0, m = -inf in HBM.
    o = torch.zeros(b, h_kv, g, n_q, d, dtype=acc_dtype, device=q.device)
    l_hbm = torch.zeros(b, h_kv, g, n_q, dtype=acc_dtype, device=q.device)
    m_hbm = torch.full((b, h_kv, g, n_q), NEG_INF, dtype=acc_dtype, device=q.device)
    for name, t in (("O", o), ("l", l_hbm), ("m", m_hbm)):
        io.store(name, t)

    for kb, j0 in enumerate(range(0, n_k, block_k)):  # line 5
        j1 = min(j0 + block_k, n_k)
        k_j, v_j = grid.load_kv(io, k, v, j0, j1)
        for i0 in range(_first_query_block_start(j0, n_q, grid.offset, block_q, causal), n_q, block_q):  # line 7
            i1 = min(i0 + block_q, n_q)
            rows = g * (i1 - i0)
            q_i = io.load("Q", q5[:, :, :, i0:i1]).to(acc_dtype).reshape(b, h_kv, rows, d) * scale
            o_i = io.load("O", o[:, :, :, i0:i1]).reshape(b, h_kv, rows, d)
            l_i = io.load("l", l_hbm[:, :, :, i0:i1]).reshape(b, h_kv, rows)
            m_i = io.load("m", m_hbm[:, :, :, i0:i1]).reshape(b, h_kv, rows)
            s = q_i @ k_j.transpose(-1, -2)  # line 9
            masked = grid.mask_(s, i0, i1, j0, j1)
            m_t = s.amax(dim=-1)  # line 10: m~_ij = rowmax(S_ij)
            p = torch.exp(s - m_t.masked_fill(m_t == NEG_INF, 0.0).unsqueeze(-1))  # P~_ij = exp(S_ij - m~_ij)
            l_t = p.sum(dim=-1)  # l~_ij = rowsum(P~_ij)
            m_new = torch.maximum(m_i, m_t)  # line 11
            m_use = m_new.masked_fill(m_new == NEG_INF, 0.0)
            a, c = torch.exp(m_i - m_use), torch.exp(m_t - m_use)  # e^(m_i - m_new), e^(m~_ij - m_new)
            l_new = a * l_i + c * l_t
            # Line 12: O_i <- diag(l_new)^-1 (diag(l_i) e^(m_i - m_new) O_i + e^(m~_ij - m_new) P~_ij V_j)
            o_i = ((a * l_i).unsqueeze(-1) * o_i + c.unsqueeze(-1) * (p @ v_j)) / l_new.masked_fill(
                l_new == 0, 1.0
            ).unsqueeze(-1)
            o[:, :, :, i0:i1] = o_i.view(b, h_kv, g, i1 - i0, d)  # lines 12-13: write O_i, l_i, m_i back
            l_hbm[:, :, :, i0:i1] = l_new.view(b, h_kv, g, i1 - i0)
            m_hbm[:, :, :, i0:i1] = m_new.view(b, h_kv, g, i1 - i0)
            for name, t in (("O", o_i), ("l", l_new), ("m", m_new)):
                io.store(name, t)
            io.visit(i0 // block_q, kb, masked, m_new, l_new)
    # FA1 returns (O, l, m); one more pass forms L = m + log l, the form FA2 and this package save.
    lse = (io.load("m", m_hbm) + torch.log(io.load("l", l_hbm))).masked_fill(l_hbm == 0, POS_INF)
    io.store("L", lse)
    return o.to(q.dtype).flatten(1, 2), lse.flatten(1, 2)


# ----------------------------------------------------------------------------------------------------------
# Backward by recomputation, FlashAttention-2 loop order (Dao 2023, Algorithm 2)
# ----------------------------------------------------------------------------------------------------------


def _fa2_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    do: Tensor,
    causal: bool,
    scale: float,
    block_q: int,
    block_k: int,
    io: IOCounter,
) -> tuple[Tensor, Tensor, Tensor]:
    """Outer loop over key blocks (each owns dK_j, dV_j), inner over query blocks (dQ_i accumulated in HBM)."""
    grid = _Grid.of(q, k, causal)
    (b, h_kv, g, n_q, n_k, d), acc_dtype = grid.dims, grid.acc_dtype
    # First pass: D = rowsum(dO * O), so that dS = P * (dP - D) needs no row sum inside the loop.
    delta = (io.load("dO", do).to(acc_dtype) * io.load("O", o).to(acc_dtype)).sum(dim=-1)  # (B, H_q, N_q)
    io.store("D", delta)
    q5, do5 = q.unflatten(1, (h_kv, g)), do.unflatten(1, (h_kv, g))  # (B, H_kv, G, N_q, d)
    lse5, delta5 = lse.unflatten(1, (h_kv, g)), delta.unflatten(1, (h_kv, g))  # (B, H_kv, G, N_q)
    dq = torch.zeros(b, h_kv, g, n_q, d, dtype=acc_dtype, device=q.device)  # FA2's float32 dQ accumulator
    dk, dv = torch.empty_like(k), torch.empty_like(v)

    for kb, j0 in enumerate(range(0, n_k, block_k)):
        j1 = min(j0 + block_k, n_k)
        k_j, v_j = grid.load_kv(io, k, v, j0, j1)  # (B, H_kv, B_c, d)
        dk_j = torch.zeros_like(k_j)  # summed over every query head of the group: GQA's dK
        dv_j = torch.zeros_like(v_j)
        # Causal: query blocks entirely above the diagonal never see K_j and are skipped.
        for i0 in range(_first_query_block_start(j0, n_q, grid.offset, block_q, causal), n_q, block_q):
            i1 = min(i0 + block_q, n_q)
            rows = g * (i1 - i0)
            q_i = io.load("Q", q5[:, :, :, i0:i1]).to(acc_dtype).reshape(b, h_kv, rows, d) * scale
            do_i = io.load("dO", do5[:, :, :, i0:i1]).to(acc_dtype).reshape(b, h_kv, rows, d)
            l_i = io.load("L", lse5[:, :, :, i0:i1]).reshape(b, h_kv, rows, 1)
            d_i = io.load("D", delta5[:, :, :, i0:i1]).reshape(b, h_kv, rows, 1)
            s = q_i @ k_j.transpose(-1, -2)  # S_i^(j) = scale Q_i K_j^T            (B, H_kv, G B_r, B_c)
            masked = grid.mask_(s, i0, i1, j0, j1)
            p = torch.exp(s - l_i)  # P_i^(j) = exp(S - L_i): the softmax, recomputed from the saved L
            dv_j += p.transpose(-1, -2) @ do_i  # dV_j += P^T dO_i
            dp = do_i @ v_j.transpose(-1, -2)  # dP_i^(j) = dO_i V_j^T
            ds = p * (dp - d_i)  # dS_i^(j) = P * (dP - D_i)
            dq_i = io.load("dQ", dq[:, :, :, i0:i1])  # read-modify-write; FA2 uses an atomic add here
            dq_i += (scale * (ds @ k_j)).view(b, h_kv, g, i1 - i0, d)  # dQ_i += scale dS K_j
            io.store("dQ", dq_i)
            dk_j += ds.transpose(-1, -2) @ q_i  # dK_j += scale dS^T Q_i (the scale is in q_i)
            io.visit(i0 // block_q, kb, masked, None, None)
        dk[:, :, j0:j1] = dk_j
        dv[:, :, j0:j1] = dv_j
        io.store("dK", dk_j)
        io.store("dV", dv_j)
    return dq.flatten(1, 2).to(q.dtype), dk, dv


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def _check_inputs(
    q: Tensor, k: Tensor, v: Tensor, scale: float | None, block_q: int, block_k: int
) -> tuple[float, int, int]:
    """What every public function here checks first; returns ``(scale, block_q, block_k)`` (see
    :func:`~refimpl.attention.common.check_attention_inputs` for the default scale)."""
    scale, _ = check_attention_inputs(q, k, v, scale)
    return scale, check_positive_int("block_q", block_q), check_positive_int("block_k", block_k)


def flash_attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = False,
    scale: float | None = None,
    block_q: int = 128,
    block_k: int = 128,
    *,
    loop_order: str = "fa2",
    io: IOCounter | None = None,
) -> tuple[Tensor, Tensor]:
    """Tiled attention forward with online softmax; returns ``(O, L)``, no autograd graph.

    ``loop_order="fa2"``: Dao 2023, Algorithm 1 (outer loop over query blocks of ``block_q`` rows, inner over
    key blocks of ``block_k`` rows, one rescale of the accumulator at the end). ``loop_order="fa1"``: Dao et al.
    2022, Algorithm 1 (outer loop over key blocks; ``O, l, m`` rescaled and written to HBM after every tile).

    Shapes: ``q: (B, H_q, N_q, d)``, ``k, v: (B, H_kv, N_k, d)``; returns ``O: (B, H_q, N_q, d)`` in ``q.dtype``
    and ``L: (B, H_q, N_q)`` in float32 (float64 for float64 inputs). Any block sizes, any lengths; a query that
    sees no key gets ``O = 0``, ``L = +inf``. ``io``: an :class:`IOCounter` that receives the loop's traffic.
    Raises ``TypeError``/``ValueError`` on bad inputs.
    """
    scale, block_q, block_k = _check_inputs(q, k, v, scale, block_q, block_k)
    loop = {"fa2": _fa2_forward, "fa1": _fa1_forward}[check_choice("loop_order", loop_order, ("fa2", "fa1"))]
    with torch.no_grad():
        return loop(q, k, v, bool(causal), scale, block_q, block_k, io if io is not None else IOCounter())


def flash_attention_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    do: Tensor,
    causal: bool = False,
    scale: float | None = None,
    block_q: int = 128,
    block_k: int = 128,
    *,
    io: IOCounter | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Tiled attention backward by recomputation (Dao 2023, Algorithm 2); returns ``(dQ, dK, dV)``.

    Needs only what the forward saved, ``O: (B, H_q, N_q, d)`` and ``L: (B, H_q, N_q)``, plus the incoming
    gradient ``dO`` (shape of ``O``): each score tile is recomputed and ``P = exp(S - L)`` restored from the
    log-sum-exp; ``D = rowsum(dO * O)`` replaces the softmax Jacobian's row sums (``dS = P * (dP - D)``).
    Gradients have the shapes and dtypes of ``q, k, v``; GQA sums ``dK, dV`` over each group's query heads.
    """
    scale, block_q, block_k = _check_inputs(q, k, v, scale, block_q, block_k)
    check_tensor("o", o, ndim=4)
    check_tensor("do", do, ndim=4, floating=True)
    check_tensor("lse", lse, ndim=3, floating=True)
    check_same_device(q=q, o=o, lse=lse, do=do)
    for name, t in (("o", o), ("do", do)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(t.shape)}")
    if lse.shape != q.shape[:3]:
        raise ValueError(f"lse must have shape (B, H_q, N_q) = {tuple(q.shape[:3])}, got {tuple(lse.shape)}")
    with torch.no_grad():
        return _fa2_backward(
            q, k, v, o, lse, do, bool(causal), scale, block_q, block_k, io if io is not None else IOCounter()
        )


FlashAttentionFunction = recomputing_function(
    "FlashAttentionFunction",
    lambda *args: _fa2_forward(*args, IOCounter()),  # args: q, k, v, causal, scale, block_q, block_k
    lambda *args: _fa2_backward(*args, IOCounter()),  # args: q, k, v, o, lse, do, causal, scale, block_q, block_k
    doc="""Autograd wrapper: the forward saves only ``Q, K, V, O, L`` (no ``N x N`` tensor), the backward
    recomputes. Use through :func:`flash_attention`, which validates the inputs.""",
)


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = False,
    scale: float | None = None,
    block_q: int = 128,
    block_k: int = 128,
) -> Tensor:
    """Exact attention ``softmax(scale Q K^T + mask) V``, tiled, differentiable (FlashAttention-2).

    Shapes: ``q: (B, H_q, N_q, d)``, ``k, v: (B, H_kv, N_k, d)`` (``H_kv`` divides ``H_q``); returns
    ``(B, H_q, N_q, d)`` in ``q.dtype``. Memory beyond the inputs and output is ``O(N_q)`` for the saved
    log-sum-exp plus one tile, forward and backward. Conventions (causal alignment, fully masked rows, float32
    accumulation) are in :mod:`refimpl.attention.common`. Raises ``TypeError``/``ValueError`` on bad inputs.
    """
    scale, block_q, block_k = _check_inputs(q, k, v, scale, block_q, block_k)
    return FlashAttentionFunction.apply(q, k, v, bool(causal), scale, block_q, block_k)
