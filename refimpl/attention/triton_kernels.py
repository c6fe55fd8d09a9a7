"""FlashAttention-2 in Triton: the same algorithm as :mod:`refimpl.attention.tiled`, one program per tile row.

Forward (Dao 2023, Algorithm 1): program ``(i, b * H_q + h)`` owns query block ``Q_i`` of head ``h``; it streams
the key blocks of KV head ``h // G`` through on-chip memory with the online-softmax update, rescales its
accumulator once at the end, and writes ``O_i`` and ``L_i`` (natural log). Scores are kept in base 2
(``exp2``, with ``log2(e)`` folded into the scale), as the FlashAttention kernels do. The key loop runs in two
stages: tiles that every row of the block sees completely (no mask at all) and the tiles on the causal diagonal
or at the ragged end of the sequence (element-wise mask). Key blocks beyond the diagonal are never visited.

Backward (Algorithm 2, with the split used by Triton's fused-attention tutorial instead of FA2's atomic dQ
add): a small kernel computes ``D = rowsum(dO * O)``; one kernel per key block accumulates ``dK_j, dV_j`` over
the query blocks (and over the ``G`` query heads of its KV head, so GQA needs no atomics); another per query
block accumulates ``dQ_i`` over the key blocks. Both recompute ``P = exp(S - L)`` from the saved log-sum-exp.

On a machine without a GPU, set ``TRITON_INTERPRET=1`` in the environment *before* Triton is imported: the
kernels then run (slowly) in Triton's NumPy interpreter on CPU tensors, which is how the tests check them.
Conventions (causal alignment, fully masked rows, float32 accumulation) follow :mod:`refimpl.attention.common`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from refimpl._checks import check_positive_int
from refimpl.attention.common import check_attention_inputs, recomputing_function

__all__ = [
    "TritonFlashAttentionFunction",
    "interpreting",
    "triton_flash_attention",
    "triton_flash_attention_forward",
]

# Constants the kernels read (a kernel can read a global only if it is a constexpr).
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x log2(e))
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): back from base 2 to natural log


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Triton decides when this module is imported (at ``@triton.jit``) whether its kernels are interpreted; so does this.
INTERPRETED = tl.constexpr(interpreting())


@triton.jit
def _dot(a, b):
    """``a @ b`` with float32 accumulation; float32 operands multiply exactly (``ieee``, not TF32), and a 16-bit
    product is exact in float32 anyway. Triton's interpreter multiplies the raw bits of bfloat16 tensors, so there
    bfloat16 operands are widened to float32 first (the same products)."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    if INTERPRETED and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


# ----------------------------------------------------------------------------------------------------------
# What the kernels share: the head a program owns, blocks of rows, score tiles. Triton inlines these
# functions into each kernel; a constexpr argument (HEAD_DIM, BLOCK_*, CAUSAL, ...) stays a constexpr.
# The launchers make every tensor contiguous, so a head's rows and a row's elements follow from the sizes.
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _head(P, bh, n, ROW: tl.constexpr):
    """Pointer to head ``bh = b * H + h`` of a contiguous ``(B, H, N, ROW)`` tensor (``ROW = d``), or of a ``(B, H,
    N)`` one (``ROW = 1``), at ``P``: ``P + bh N ROW``, in int64 (a tensor may have more than 2^31 elements)."""
    return P + bh.to(tl.int64) * n * ROW


@triton.jit
def _rows(start, n, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``start .. start + BLOCK`` of one head ``(N, d)``: the row indices ``(BLOCK,)``, the element offsets
    and the in-bounds mask ``(BLOCK, BLOCK_D)`` (rows past ``n`` and the padding of ``d`` up to ``BLOCK_D`` are
    out)."""
    rows = start + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_D)
    offsets = rows[:, None] * HEAD_DIM + cols[None, :]
    mask = (rows[:, None] < n) & (cols[None, :] < HEAD_DIM)
    return rows, offsets, mask


@triton.jit
def _load_kv(K, V, start, n_k, HEAD_DIM, BLOCK_N, BLOCK_D, MASKED: tl.constexpr):
    """``K_j, V_j: (BLOCK_N, BLOCK_D)``, keys ``start .. start + BLOCK_N`` of the KV head at ``K, V`` (zero out
    of bounds), after their key indices, offsets and mask (see :func:`_rows`). ``MASKED=False``: a tile inside the
    sequence, whose rows need no bounds check."""
    cols, offsets, mask = _rows(start, n_k, HEAD_DIM, BLOCK_N, BLOCK_D)
    if not MASKED:
        mask = tl.arange(0, BLOCK_D)[None, :] < HEAD_DIM  # only the padding of d
    k = tl.load(K + offsets, mask=mask, other=0.0)
    v = tl.load(V + offsets, mask=mask, other=0.0)
    return cols, offsets, mask, k, v


@triton.jit
def _key_end(start_m, n_q, n_k, offset, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """Keys at or past this index are unseen by every query of the block ``start_m .. start_m + BLOCK_M``:
    ``N_k``, or with the causal mask one past the diagonal of the block's last row (clamped to ``[0, N_k]``)."""
    end = n_k
    if CAUSAL:
        end = tl.minimum(n_k, tl.maximum(tl.minimum(start_m + BLOCK_M, n_q) + offset, 0))
    return end


@triton.jit
def _scores(a, b, q_pos, k_pos, n_k, offset, qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr):
    """A score tile in base 2, ``scale log2(e) a b^T``, ``-inf`` where a query does not see a key: ``S_i^(j)`` for
    ``a, b = Q_i, K_j`` (positions ``q_pos: (BLOCK_M, 1)``, ``k_pos: (1, BLOCK_N)``) or its transpose for
    ``a, b = K_j, Q_i`` (``q_pos: (1, BLOCK_M)``, ``k_pos: (BLOCK_N, 1)``). ``MASKED=False``: a tile that every
    query sees whole (inside the sequence, left of the causal diagonal) needs no mask."""
    s = _dot(a, tl.trans(b)) * qk_scale
    if MASKED:
        visible = k_pos < n_k
        if CAUSAL:  # bottom-right aligned: query i sees key j iff j <= i + offset
            visible = visible & (k_pos <= q_pos + offset)
        s = tl.where(visible, s, float("-inf"))
    return s


# ----------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _online_softmax_update(acc, l_i, m_i, s, v):
    """One key block of the online softmax (Algorithm 1, lines 8-10) in base 2: the score tile
    ``s: (BLOCK_M, BLOCK_N)`` and values ``v: (BLOCK_N, BLOCK_D)`` update the unnormalised output
    ``acc: (BLOCK_M, BLOCK_D)``, the running sum ``l_i`` and maximum ``m_i`` (``(BLOCK_M,)`` each)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))  # running max
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that saw no key yet: exp2(-inf) = 0
    p = tl.math.exp2(s - m_use[:, None])  # P~ = exp(S - m)
    alpha = tl.math.exp2(m_i - m_use)  # exp(m_old - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd(
    Q,
    K,
    V,
    Out,
    L,
    sm_scale,
    group,
    n_q,
    n_k,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)  # query head b * H_q + h; it reads KV head b * H_kv + h // G = bh // G (GQA)
    Q, Out, L = _head(Q, bh, n_q, HEAD_DIM), _head(Out, bh, n_q, HEAD_DIM), _head(L, bh, n_q, 1)
    K, V = _head(K, bh // group, n_k, HEAD_DIM), _head(V, bh // group, n_k, HEAD_DIM)
    offset = n_k - n_q  # bottom-right causal: query i sees keys j <= i + offset
    rows, q_off, q_mask = _rows(start_m, n_q, HEAD_DIM, BLOCK_M, BLOCK_D)
    q = tl.load(Q + q_off, mask=q_mask, other=0.0)  # O has Q's layout: q_off addresses O_i too
    qk_scale = sm_scale * LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = _key_end(start_m, n_q, n_k, offset, BLOCK_M, CAUSAL)  # key blocks past the diagonal: never visited
    full_end = (n_k // BLOCK_N) * BLOCK_N  # tiles before this lie entirely inside the sequence
    lo = full_end
    if CAUSAL:  # tiles before lo lie left of the diagonal for every row of the block, too
        lo = (tl.maximum(start_m + offset + 1, 0) // BLOCK_N) * BLOCK_N
        lo = tl.minimum(tl.minimum(lo, hi), full_end)
    for start_n in range(0, lo, BLOCK_N):  # stage 1: tiles every row sees whole, no mask
        cols, _, _, k, v = _load_kv(K, V, start_n, n_k, HEAD_DIM, BLOCK_N, BLOCK_D, False)
        s = _scores(q, k, rows[:, None], cols[None, :], n_k, offset, qk_scale, False, CAUSAL)
        acc, l_i, m_i = _online_softmax_update(acc, l_i, m_i, s, v)
    for start_n in range(lo, hi, BLOCK_N):  # stage 2: the causal diagonal and the ragged end, masked
        cols, _, _, k, v = _load_kv(K, V, start_n, n_k, HEAD_DIM, BLOCK_N, BLOCK_D, True)
        s = _scores(q, k, rows[:, None], cols[None, :], n_k, offset, qk_scale, True, CAUSAL)
        acc, l_i, m_i = _online_softmax_update(acc, l_i, m_i, s, v)
    # One rescale at the end; a row that saw no key: O = 0, L = +inf.
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
    tl.store(Out + q_off, o.to(Out.dtype.element_ty), mask=q_mask)
    tl.store(L + rows, lse, mask=rows < n_q)


# ----------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _query_head(Q, DO, L, Delta, bh, n_q, HEAD_DIM: tl.constexpr):
    """``Q, dO, L, D`` moved to query head ``bh`` (see :func:`_head`)."""
    return _head(Q, bh, n_q, HEAD_DIM), _head(DO, bh, n_q, HEAD_DIM), _head(L, bh, n_q, 1), _head(Delta, bh, n_q, 1)


@triton.jit
def _load_query_block(Q, DO, L, Delta, start, n_q, HEAD_DIM, BLOCK_M, BLOCK_D):
    """What the backward reads per query block (Algorithm 2, line 8) of the query head at ``Q, DO, L, Delta``:
    ``Q_i, dO_i: (BLOCK_M, BLOCK_D)`` and ``L_i, D_i: (BLOCK_M,)``, after the query indices, offsets and mask (see
    :func:`_rows`). Rows past ``n_q`` get ``L = +inf``, so ``P = 0`` there."""
    rows, offsets, mask = _rows(start, n_q, HEAD_DIM, BLOCK_M, BLOCK_D)
    q = tl.load(Q + offsets, mask=mask, other=0.0)
    do = tl.load(DO + offsets, mask=mask, other=0.0)
    lse = tl.load(L + rows, mask=rows < n_q, other=float("inf"))
    delta = tl.load(Delta + rows, mask=rows < n_q, other=0.0)
    return rows, offsets, mask, q, do, lse, delta


@triton.jit
def _attn_bwd_preprocess(Out, DO, Delta, n_q, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(1)
    rows, off, mask = _rows(tl.program_id(0) * BLOCK_M, n_q, HEAD_DIM, BLOCK_M, BLOCK_D)
    o = tl.load(_head(Out, bh, n_q, HEAD_DIM) + off, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(_head(DO, bh, n_q, HEAD_DIM) + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(_head(Delta, bh, n_q, 1) + rows, tl.sum(o * do, 1), mask=rows < n_q)  # D = rowsum(dO * O)


@triton.jit
def _attn_bwd_dkdv(
    Q,
    K,
    V,
    DO,
    L,
    Delta,
    DK,
    DV,
    sm_scale,
    group,
    n_q,
    n_k,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    bh_kv = tl.program_id(1)  # grid axis 1 over B * H_kv: KV head b * H_kv + hk
    K, V = _head(K, bh_kv, n_k, HEAD_DIM), _head(V, bh_kv, n_k, HEAD_DIM)
    DK, DV = _head(DK, bh_kv, n_k, HEAD_DIM), _head(DV, bh_kv, n_k, HEAD_DIM)
    offset = n_k - n_q
    cols, kv_off, kv_mask, k, v = _load_kv(K, V, start_n, n_k, HEAD_DIM, BLOCK_N, BLOCK_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * LOG2E
    lo = 0
    if CAUSAL:  # query blocks above the diagonal never see this key block
        lo = (tl.maximum(start_n - offset, 0) // BLOCK_M) * BLOCK_M
    for g in range(0, group):  # every query head b * H_q + hk * G + g reading this KV head adds to its dK, dV
        Q_g, DO_g, L_g, Delta_g = _query_head(Q, DO, L, Delta, bh_kv * group + g, n_q, HEAD_DIM)
        for start_m in range(lo, n_q, BLOCK_M):
            rows, _, _, q, do, lse, delta = _load_query_block(
                Q_g, DO_g, L_g, Delta_g, start_m, n_q, HEAD_DIM, BLOCK_M, BLOCK_D
            )
            # S^T log2(e), (BLOCK_N, BLOCK_M)
            s_t = _scores(k, q, rows[None, :], cols[:, None], n_k, offset, qk_scale, True, CAUSAL)
            p_t = tl.math.exp2(s_t - lse[None, :] * LOG2E)  # P^T = exp(S - L)^T, recomputed
            dv += _dot(p_t.to(do.dtype), do)  # dV_j += P^T dO_i
            dp_t = _dot(v, tl.trans(do))  # dP^T = V_j dO_i^T
            ds_t = p_t * (dp_t - delta[None, :])  # dS^T = P^T * (dP^T - D_i)
            dk += _dot(ds_t.to(q.dtype), q)  # dK_j += dS^T Q_i
    tl.store(DK + kv_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq(
    Q,
    K,
    V,
    DO,
    L,
    Delta,
    DQ,
    sm_scale,
    group,
    n_q,
    n_k,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)  # query head b * H_q + h, reading KV head bh // G
    Q, DO, L, Delta = _query_head(Q, DO, L, Delta, bh, n_q, HEAD_DIM)
    K, V = _head(K, bh // group, n_k, HEAD_DIM), _head(V, bh // group, n_k, HEAD_DIM)
    offset = n_k - n_q
    rows, q_off, q_mask, q, do, lse, delta = _load_query_block(
        Q, DO, L, Delta, start_m, n_q, HEAD_DIM, BLOCK_M, BLOCK_D
    )
    qk_scale = sm_scale * LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = _key_end(start_m, n_q, n_k, offset, BLOCK_M, CAUSAL)  # key blocks past the diagonal: skipped
    for start_n in range(0, hi, BLOCK_N):
        cols, _, _, k, v = _load_kv(K, V, start_n, n_k, HEAD_DIM, BLOCK_N, BLOCK_D, True)
        s = _scores(q, k, rows[:, None], cols[None, :], n_k, offset, qk_scale, True, CAUSAL)
        p = tl.math.exp2(s - lse[:, None] * LOG2E)  # P = exp(S - L), recomputed
        dp = _dot(do, tl.trans(v))  # dP = dO_i V_j^T
        ds = p * (dp - delta[:, None])  # dS = P * (dP - D_i)
        dq += _dot(ds.to(k.dtype), k)  # dQ_i += dS K_j
    tl.store(_head(DQ, bh, n_q, HEAD_DIM) + q_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------------------------------------
# Launchers and the autograd function
# ----------------------------------------------------------------------------------------------------------

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_triton_inputs(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> float:
    """What the Triton entry points check first (also dtype and device); returns the softmax scale."""
    scale, _ = check_attention_inputs(q, k, v, scale)
    if q.dtype not in TRITON_DTYPES:
        raise TypeError(f"q must have dtype in {list(TRITON_DTYPES)} for the Triton kernel, got {q.dtype}")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"q must be a CUDA tensor for the Triton kernel, got device {q.device}; on a CPU, set "
            "TRITON_INTERPRET=1 in the environment before importing triton to run the kernels in the interpreter"
        )
    return scale


def _config(d: int, block_m: int | None, block_n: int | None) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages): small tiles in the interpreter, FA2-like on a GPU."""
    block_d = max(16, triton.next_power_of_2(d))
    if interpreting():
        default_m, default_n, warps, stages = 16, 16, 4, 1
    else:
        default_m, default_n = (128, 64) if block_d <= 128 else (64, 32)
        warps, stages = (8 if block_d >= 128 else 4), 3
    block_m = default_m if block_m is None else check_positive_int("block_m", block_m)
    block_n = default_n if block_n is None else check_positive_int("block_n", block_n)
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot tile), got {value}")
    return block_m, block_n, block_d, warps, stages


def _meta(d: int, bm: int, bn: int, bd: int, causal: bool, warps: int, stages: int) -> dict[str, object]:
    """What the forward and both backward kernels are compiled and launched with (see :func:`_config`)."""
    return {
        "HEAD_DIM": d,
        "BLOCK_M": bm,
        "BLOCK_N": bn,
        "BLOCK_D": bd,
        "CAUSAL": causal,
        "num_warps": warps,
        "num_stages": stages,
    }


def _forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool,
    scale: float,
    block_m: int | None,
    block_n: int | None,
) -> tuple[Tensor, Tensor]:
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # the kernels address contiguous tensors
    b, h_q, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    bm, bn, bd, warps, stages = _config(d, block_m, block_n)
    o = torch.empty_like(q)
    lse = torch.empty(b, h_q, n_q, dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse.fill_(float("inf"))
    grid = (triton.cdiv(n_q, bm), b * h_q)
    meta = _meta(d, bm, bn, bd, causal, warps, stages)
    _attn_fwd[grid](q, k, v, o, lse, scale, h_q // h_kv, n_q, n_k, **meta)  # G = H_q / H_kv query heads per KV head
    return o, lse


def _backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    do: Tensor,
    causal: bool,
    scale: float,
    block_m: int | None,
    block_n: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v, o, lse, do = (t.contiguous() for t in (q, k, v, o, lse, do))  # the kernels address contiguous tensors
    b, h_q, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    bm, bn, bd, warps, stages = _config(d, block_m, block_n)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if n_q == 0 or n_k == 0 or b == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if not interpreting():  # the backward keeps more tiles alive: smaller tiles than the forward
        bm, bn = min(bm, 64), min(bn, 64)
    delta = torch.empty(b, h_q, n_q, dtype=torch.float32, device=q.device)
    group = h_q // h_kv
    grid_q = (triton.cdiv(n_q, bm), b * h_q)
    _attn_bwd_preprocess[grid_q](o, do, delta, n_q, HEAD_DIM=d, BLOCK_M=bm, BLOCK_D=bd)
    meta = _meta(d, bm, bn, bd, causal, warps, stages)
    _attn_bwd_dkdv[(triton.cdiv(n_k, bn), b * h_kv)](q, k, v, do, lse, delta, dk, dv, scale, group, n_q, n_k, **meta)
    _attn_bwd_dq[grid_q](q, k, v, do, lse, delta, dq, scale, group, n_q, n_k, **meta)
    return dq, dk, dv


TritonFlashAttentionFunction = recomputing_function(
    "TritonFlashAttentionFunction",
    _forward,
    _backward,
    doc="Autograd wrapper of the Triton kernels: saves ``Q, K, V, O, L``; use :func:`triton_flash_attention`.",
)


def triton_flash_attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = False,
    scale: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Triton FlashAttention-2 forward; returns ``(O: (B, H_q, N_q, d), L: (B, H_q, N_q) float32)``, no graph.

    Same contract as :func:`refimpl.attention.flash_attention_forward` for float32/float16/bfloat16 inputs on a
    CUDA device, or on the CPU under ``TRITON_INTERPRET=1``. ``block_m, block_n``: tile sizes (powers of two
    >= 16); by default 16 in the interpreter, ``128 x 64`` on a GPU. Raises ``TypeError``/``ValueError``.
    """
    scale = _check_triton_inputs(q, k, v, scale)
    with torch.no_grad():
        return _forward(q, k, v, bool(causal), scale, block_m, block_n)


def triton_flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = False,
    scale: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> Tensor:
    """Exact attention by the Triton FlashAttention-2 kernels, differentiable (forward and backward kernels).

    Shapes: ``q: (B, H_q, N_q, d)``, ``k, v: (B, H_kv, N_k, d)``; returns ``(B, H_q, N_q, d)`` in ``q.dtype``.
    See :func:`triton_flash_attention_forward` for devices, dtypes and tile sizes.
    """
    scale = _check_triton_inputs(q, k, v, scale)
    _config(q.shape[-1], block_m, block_n)  # validate the tile sizes before launching
    return TritonFlashAttentionFunction.apply(q, k, v, bool(causal), scale, block_m, block_n)
