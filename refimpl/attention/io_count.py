"""Counted IO: elements moved between "HBM" (full tensors) and "SRAM" (blocks), and their closed forms.

The tiled loops in :mod:`refimpl.attention.tiled` move every block through an :class:`IOCounter`:
``counter.load("K", block)`` counts the elements read from HBM into SRAM, ``counter.store("O", block)`` those
written back. The functions below give the same counts in closed form, derived from the loops' structure; the
tests check that loop and formula agree exactly, and the chapter uses them for the asymptotics of
FlashAttention's Theorem 2 (Dao et al. 2022, sec. 3.2): standard attention moves ``Theta(N d + N^2)`` elements,
the tiled loop ``Theta(N^2 d^2 / M)`` for an SRAM of ``M`` elements.

Conventions of the counts (per element, not per byte; multiply by the element size for bytes):

* a block read is counted once per time it is loaded (a KV block that two query blocks need is read twice);
* intermediate values that stay in SRAM (scores ``S``, probabilities ``P``, running max ``m`` and sum ``l``,
  the output accumulator) are not counted; tensors the loop keeps in HBM are, each time they move;
* grouped-query attention: a K/V block is loaded once for the ``G`` query heads that share it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from torch import Tensor

from refimpl._checks import check_int, check_positive_int

__all__ = [
    "AttentionTiling",
    "IOCount",
    "IOCounter",
    "TileVisit",
    "block_sizes_for_sram",
    "flash1_forward_io",
    "flash2_backward_io",
    "flash2_forward_io",
    "sram_footprint",
    "standard_attention_io",
]


@dataclass
class TileVisit:
    """One (query block, key block) pair the loop computed on, in loop order.

    ``masked``: the block crosses the causal diagonal, so it was masked element-wise. ``row_max`` and
    ``row_sum`` are the running softmax statistics ``m`` and ``l`` of the query block's rows after this key
    block (batch 0, KV head 0; the ``G`` query heads of a group stacked as rows), recorded only by the forward
    loops when the counter was made with ``record=True``.
    """

    q_block: int
    k_block: int
    masked: bool
    row_max: Tensor | None = None
    row_sum: Tensor | None = None


@dataclass
class IOCounter:
    """Counts HBM<->SRAM traffic of a tiled loop, per tensor name; optionally records each tile visited.

    ``reads[name]`` / ``writes[name]``: elements of tensor ``name`` loaded into / stored from SRAM.
    ``visits``: the :class:`TileVisit` list (only with ``record=True``; the snapshots cost memory).
    """

    record: bool = False
    reads: Counter[str] = field(default_factory=Counter)
    writes: Counter[str] = field(default_factory=Counter)
    visits: list[TileVisit] = field(default_factory=list)

    def load(self, name: str, block: Tensor) -> Tensor:
        """Count ``block.numel()`` elements of ``name`` read from HBM; return ``block`` unchanged."""
        self.reads[name] += block.numel()
        return block

    def store(self, name: str, block: Tensor) -> None:
        """Count ``block.numel()`` elements of ``name`` written to HBM."""
        self.writes[name] += block.numel()

    def visit(self, q_block: int, k_block: int, masked: bool, m: Tensor | None, ell: Tensor | None) -> None:
        """Note that the loop computed on tile ``(q_block, k_block)``; snapshot ``m`` and ``ell`` (l) if recording."""
        if self.record:
            snap = lambda t: None if t is None else t[0, 0].detach().clone()  # batch 0, KV head 0
            self.visits.append(TileVisit(q_block, k_block, masked, snap(m), snap(ell)))
        else:  # keep only the schedule, which is cheap
            self.visits.append(TileVisit(q_block, k_block, masked))

    @property
    def total_reads(self) -> int:
        return sum(self.reads.values())

    @property
    def total_writes(self) -> int:
        return sum(self.writes.values())

    @property
    def total(self) -> int:
        """All elements moved between HBM and SRAM, both directions."""
        return self.total_reads + self.total_writes


@dataclass(frozen=True)
class IOCount:
    """A closed-form count: elements read and written per tensor name (same keys as :class:`IOCounter`)."""

    reads: dict[str, int]
    writes: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.reads.values()) + sum(self.writes.values())


def _check_sizes(batch: int, heads_q: int, heads_kv: int, n_q: int, n_k: int, d: int) -> None:
    check_positive_int("batch", batch)
    check_positive_int("heads_q", heads_q)
    check_positive_int("heads_kv", heads_kv)
    if heads_q % heads_kv:
        raise ValueError(f"heads_kv must divide heads_q, got heads_q={heads_q}, heads_kv={heads_kv}")
    check_int("n_q", n_q, min_value=0)
    check_int("n_k", n_k, min_value=0)
    check_positive_int("d", d)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class AttentionTiling:
    """One tiled attention call: the sizes of ``q: (batch, heads_q, n_q, d)`` and ``k, v: (batch, heads_kv, n_k,
    d)``, the blocks of ``block_q`` query rows (``B_r``) and ``block_k`` key rows (``B_c``), and the causal mask.

    Validated on construction (``heads_kv`` must divide ``heads_q``; lengths may be 0); the closed-form counts
    :func:`flash2_forward_io`, :func:`flash1_forward_io` and :func:`flash2_backward_io` take one.
    """

    batch: int
    heads_q: int
    heads_kv: int
    n_q: int
    n_k: int
    d: int
    block_q: int
    block_k: int
    causal: bool = False

    def __post_init__(self) -> None:
        _check_sizes(self.batch, self.heads_q, self.heads_kv, self.n_q, self.n_k, self.d)
        check_positive_int("block_q", self.block_q)
        check_positive_int("block_k", self.block_k)

    @property
    def offset(self) -> int:
        """Bottom-right causal alignment: query ``i`` sees key ``j`` iff ``j <= i + offset``, ``offset = N_k - N_q``."""
        return self.n_k - self.n_q

    def keys_loaded_per_query_block(self) -> list[int]:
        """Key rows the FA2-order forward loads for each query block (the causal loop stops at the diagonal).

        Query block ``[i0, i1)`` needs keys ``[0, min(N_k, i1 + N_k - N_q))``; whole key blocks are loaded, so the
        count rounds that end up to a multiple of ``block_k`` (capped at ``N_k``).
        """
        out = []
        for i0 in range(0, self.n_q, self.block_q):
            i1 = min(i0 + self.block_q, self.n_q)
            end = min(self.n_k, max(0, i1 + self.offset)) if self.causal else self.n_k
            out.append(min(self.n_k, _ceil_div(end, self.block_k) * self.block_k))
        return out

    def query_rows_per_key_block(self) -> list[int]:
        """Query rows the key-outer loops (FA1 forward, FA2 backward) load for each key block.

        Key block ``[j0, j1)`` is seen by queries ``i >= j0 - (N_k - N_q)``; whole query blocks are loaded, so the
        first row rounds down to a multiple of ``block_q``.
        """
        out = []
        for j0 in range(0, self.n_k, self.block_k):
            first = j0 - self.offset if self.causal else 0
            out.append(0 if first >= self.n_q else self.n_q - (max(0, first) // self.block_q) * self.block_q)
        return out


def _key_outer_counts(t: AttentionTiling) -> tuple[int, int, int]:
    """Sizes of a key-outer loop (FA1 forward, FA2 backward): ``(per_row, rows, kv_elems)``, the query rows it
    moves over all key blocks and heads, the query rows ``B H N_q`` and the elements of K (or V)."""
    if t.causal:
        q_rows = sum(t.query_rows_per_key_block())
    else:
        q_rows = _ceil_div(t.n_k, t.block_k) * t.n_q  # T_c passes over all query rows
    return t.batch * t.heads_q * q_rows, t.batch * t.heads_q * t.n_q, t.batch * t.heads_kv * t.n_k * t.d


def flash2_forward_io(t: AttentionTiling) -> IOCount:
    """HBM traffic of the FA2-order forward (Dao 2023, Algorithm 1) as implemented in ``tiled.py``.

    Each query block ``Q_i`` is read once and ``O_i``, ``L_i`` written once; every key block it needs is read:
    ``K, V: B H_kv d sum_i keys_i`` with ``keys_i = N_k`` without masking, so ``T_r N_k`` in total with
    ``T_r = ceil(N_q / B_r)``. With ``B_r = Theta(M / d)`` this is ``Theta(N^2 d^2 / M)``.
    """
    if t.causal:
        key_rows = sum(t.keys_loaded_per_query_block())
    else:
        key_rows = _ceil_div(t.n_q, t.block_q) * t.n_k  # T_r passes over all of K and V
    q_elems = t.batch * t.heads_q * t.n_q * t.d
    kv_elems = t.batch * t.heads_kv * key_rows * t.d
    return IOCount(
        reads={"Q": q_elems, "K": kv_elems, "V": kv_elems},
        writes={"O": q_elems, "L": t.batch * t.heads_q * t.n_q},
    )


def flash1_forward_io(t: AttentionTiling) -> IOCount:
    """HBM traffic of the FA1-order forward (Dao et al. 2022, Algorithm 1) as implemented in ``tiled.py``.

    K and V are read once; for every (key block, query block) pair the loop reads ``Q_i, O_i, l_i, m_i`` and
    writes ``O_i, l_i, m_i`` back. Plus the initialisation ``O = 0, l = 0, m = -inf`` (line 2) and a last pass
    reading ``m, l`` and writing ``L = m + log l``. Without masking the pairs number ``T_c T_r``.
    """
    per_row, rows, kv_elems = _key_outer_counts(t)
    d = t.d
    return IOCount(
        reads={
            "K": kv_elems,
            "V": kv_elems,
            "Q": per_row * d,
            "O": per_row * d,
            "l": per_row + rows,
            "m": per_row + rows,
        },
        writes={"O": per_row * d + rows * d, "l": per_row + rows, "m": per_row + rows, "L": rows},
    )


def flash2_backward_io(t: AttentionTiling) -> IOCount:
    """HBM traffic of the FA2-order backward (Dao 2023, Algorithm 2) as implemented in ``tiled.py``.

    Preprocessing ``D = rowsum(dO * O)`` reads ``dO, O`` and writes ``D``. The loop reads each ``K_j, V_j`` once
    and writes ``dK_j, dV_j`` once; for each visited (key block, query block) pair it reads
    ``Q_i, dO_i, L_i, D_i`` and reads and writes the float32 accumulator ``dQ_i`` (FA2's atomic add).
    """
    per_row, rows, kv_elems = _key_outer_counts(t)
    d = t.d
    return IOCount(
        reads={
            "dO": rows * d + per_row * d,
            "O": rows * d,
            "K": kv_elems,
            "V": kv_elems,
            "Q": per_row * d,
            "L": per_row,
            "D": per_row,
            "dQ": per_row * d,
        },
        writes={"D": rows, "dQ": per_row * d, "dK": kv_elems, "dV": kv_elems},
    )


def standard_attention_io(batch: int, heads_q: int, n_q: int, n_k: int, d: int, return_lse: bool = False) -> IOCount:
    """HBM traffic of standard attention (Dao et al. 2022, Algorithm 0) as implemented in ``naive.py``.

    Three passes, each reading its inputs from HBM and writing its output: ``S = Q K^T`` (read Q, K; write
    S), ``P = softmax(S)`` (read S; write P; the causal mask is fused), ``O = P V`` (read P, V; write O);
    with ``return_lse`` a fourth reads S and writes ``L``. Per head ``4 N d + 4 N^2`` for ``N_q = N_k = N``:
    ``Theta(N d + N^2)``. Each query head reads its KV head's K and V (no reuse across a group).
    """
    _check_sizes(batch, heads_q, 1, n_q, n_k, d)
    bh = batch * heads_q
    scores = bh * n_q * n_k
    reads = {
        "Q": bh * n_q * d,
        "K": bh * n_k * d,
        "S": scores * (2 if return_lse else 1),
        "P": scores,
        "V": bh * n_k * d,
    }
    writes = {"S": scores, "P": scores, "O": bh * n_q * d}
    if return_lse:
        writes["L"] = bh * n_q
    return IOCount(reads=reads, writes=writes)


def sram_footprint(block_q: int, block_k: int, d: int) -> int:
    """Elements one FA2-order forward program keeps in SRAM: ``Q_i, O~_i`` (``B_r d`` each), ``K_j, V_j``
    (``B_c d`` each), ``S, P`` in place (``B_r B_c``) and ``m, l`` (``B_r`` each); one query head."""
    block_q, block_k = check_positive_int("block_q", block_q), check_positive_int("block_k", block_k)
    d = check_positive_int("d", d)
    return 2 * block_q * d + 2 * block_k * d + block_q * block_k + 2 * block_q


def block_sizes_for_sram(sram_elements: int, d: int) -> tuple[int, int]:
    """Block sizes ``(B_r, B_c)`` whose working set fits an SRAM of ``M = sram_elements`` elements.

    Analogue of FlashAttention's line 1 (``B_c = ceil(M / 4d), B_r = min(B_c, d)``) for the FA2 loop order, where
    the query block is the one held across the inner loop: ``B_r = floor(M / (5 d + 2))`` and
    ``B_c = min(B_r, d)``, so ``sram_footprint <= B_r (5 d + 2) <= M`` and ``B_r = Theta(M / d)``.
    Requires ``M >= 5 d + 2``.
    """
    m = check_positive_int("sram_elements", sram_elements)
    d = check_positive_int("d", d)
    if m < 5 * d + 2:
        raise ValueError(f"sram_elements must be >= 5*d + 2 = {5 * d + 2} to hold one row of each block, got {m}")
    block_q = m // (5 * d + 2)
    return block_q, min(block_q, d)
