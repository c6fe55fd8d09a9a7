"""A paged KV cache: PagedAttention's block pool, block tables and free list (Kwon et al. 2023, sec. 4.1-4.3).

The KV cache of every sequence is stored in fixed-size *blocks* of ``block_size`` tokens taken from one pool
preallocated per layer, ``(num_blocks * block_size, H_kv, D)`` for keys and the same for values; a *slot* is one
token's row, ``slot = block * block_size + offset``. Each sequence owns a *block table* (its blocks, in token
order), so its logical KV cache is contiguous while its physical blocks are anywhere in the pool; only its last
block can be partly filled, so at most ``block_size - 1`` slots per sequence are allocated and unused (sec. 4.2).
Free blocks sit on a free list; every block carries a reference count, so a block can be shared by sequences
with a common prefix (:meth:`PagedKVPool.fork`, copy-on-write of a shared partly-filled last block, sec. 4.4).

Block ids index the same block in every layer (vLLM's layout): one block table serves the whole model.

One step of the model over a batch of sequences:

1. ``pool.prepare(seq_ids, n_new)`` allocates the slots of ``n_new`` new tokens per sequence (one count for
   all, or one per sequence) and computes the step's *slot mapping* ``(N,)`` of the ``N`` new tokens and the
   gather index ``(S, T_max)`` of each sequence's tokens, once for all layers (vLLM passes the same metadata to
   its model runner);
2. the model calls, per layer, ``cache.update(k, v, positions)`` and ``cache.attend(q, q_positions, scale)`` on
   :meth:`PagedKVPool.caches` (the :class:`~refimpl.llm.cache.KVCache` interface): ``update`` writes the new
   keys/values into their slots, ``attend`` gathers each sequence's blocks into ``(S, H_kv, T_max, D)`` and
   runs causal softmax attention, masking the padding of shorter sequences.

A sequence stores every one of its tokens, at positions ``0 .. len - 1``. The new tokens reach the model in
one of two layouts: as *rows* ``(S, n_new)`` when every sequence adds the same count (``positions``
``(n_new,)`` or ``(S, n_new)``), or *packed* ``(1, N)``, the sequences' new tokens one after another
(``positions (N,)``), when the counts differ: a step that prefills several prompts of different lengths, or
mixes prompt chunks with single decode tokens (chunked prefill, Agrawal et al. 2024). Packing costs the
linear layers no padding; only attention pads the queries, to ``(S, n_max)``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from refimpl._checks import check_int, check_positive_int, check_tensor
from refimpl.llm.cache import KVCache

__all__ = ["BlockAllocator", "OutOfBlocksError", "PagedCache", "PagedKVPool"]

#: key position given to padding slots: larger than every query position, so the causal mask hides them
PAD_POSITION = torch.iinfo(torch.int64).max


class OutOfBlocksError(RuntimeError):
    """Raised when an allocation needs more free blocks than the pool has (nothing is allocated then)."""


class BlockAllocator:
    """The free list and reference counts of ``num_blocks`` blocks (ids ``0 .. num_blocks - 1``).

    :meth:`allocate` takes a block off the free list with reference count 1; :meth:`share` adds a reference;
    :meth:`release` drops one and returns the block to the free list when none is left.
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = check_positive_int("num_blocks", num_blocks)
        self._free: list[int] = list(range(self.num_blocks - 1, -1, -1))  # a stack: allocate pops block 0 first
        self._refs = [0] * self.num_blocks

    @property
    def num_free(self) -> int:
        """Blocks on the free list."""
        return len(self._free)

    def ref_count(self, block: int) -> int:
        """References held on ``block`` (0: free)."""
        return self._refs[self._check(block)]

    def allocate(self) -> int:
        """A free block with reference count 1; raises :class:`OutOfBlocksError` if none is free."""
        if not self._free:
            raise OutOfBlocksError(f"all {self.num_blocks} blocks are in use")
        block = self._free.pop()
        self._refs[block] = 1
        return block

    def share(self, block: int) -> None:
        """Add a reference to an allocated ``block``."""
        if self._refs[self._check(block)] == 0:
            raise ValueError(f"block {block} is free; only an allocated block can be shared")
        self._refs[block] += 1

    def release(self, block: int) -> None:
        """Drop one reference to ``block``; the last one returns it to the free list."""
        if self._refs[self._check(block)] == 0:
            raise ValueError(f"block {block} is already free (double release)")
        self._refs[block] -= 1
        if self._refs[block] == 0:
            self._free.append(block)

    def _check(self, block: int) -> int:
        return check_int("block", block, min_value=0, max_value=self.num_blocks - 1)


@dataclass
class _Step:
    """Metadata of one prepared step, shared by every layer."""

    seq_ids: list[Hashable]
    n_new: list[int]  # (S,): new tokens per sequence
    slot_mapping: Tensor  # (N,): slots of the new tokens, sequence after sequence (N = sum n_new)
    new_positions: Tensor  # (N,): their positions, in the same order
    gather: Tensor  # (S, T_max): slots of each sequence's tokens, padding -> slot 0
    key_positions: Tensor  # (S, T_max): 0 .. len-1, padding -> PAD_POSITION
    q_index: Tensor  # (S, n_max): each sequence's new tokens in the packed order, padding -> its last one
    q_valid: Tensor  # (S * n_max,): the padded query rows that are real tokens
    written: list[bool]  # per layer: update() done this step

    def rows(self, b: int, t: int) -> None:
        """Check that a ``(b, t)`` batch of new tokens is this step's, as rows or packed."""
        n, s = len(self.new_positions), len(self.seq_ids)
        uniform = all(c == self.n_new[0] for c in self.n_new)
        if not ((b == 1 and t == n) or (uniform and b == s and t == self.n_new[0])):
            raise ValueError(
                f"the step adds {self.n_new} token(s) to {s} sequence(s): the batch must be rows ({s}, n_new) "
                f"(equal counts only) or packed (1, {n}), got ({b}, {t})"
            )


class PagedKVPool:
    """Block pools of ``n_layers`` layers, the block tables of the sequences, and the step metadata.

    ``num_blocks`` blocks of ``block_size`` tokens, each ``n_kv_heads x head_dim`` keys and values, in ``dtype``;
    the pool's capacity is ``num_blocks * block_size`` tokens, shared by all sequences.
    """

    def __init__(
        self,
        n_layers: int,
        num_blocks: int,
        block_size: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        self.n_layers = check_positive_int("n_layers", n_layers)
        self.block_size = check_positive_int("block_size", block_size)
        self.n_kv_heads = check_positive_int("n_kv_heads", n_kv_heads)
        self.head_dim = check_positive_int("head_dim", head_dim)
        self.allocator = BlockAllocator(num_blocks)
        slots = self.allocator.num_blocks * self.block_size
        # (L, num_blocks * block_size, H_kv, D): one preallocated pool per layer, indexed by slot
        self.k = torch.zeros(self.n_layers, slots, self.n_kv_heads, self.head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.tables: dict[Hashable, list[int]] = {}
        self.lengths: dict[Hashable, int] = {}
        self._step: _Step | None = None
        self._caches = [PagedCache(self, i) for i in range(self.n_layers)]

    # ------------------------------------------------------------------------------------------ accounting

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    @property
    def capacity_tokens(self) -> int:
        """Tokens the whole pool can hold."""
        return self.num_blocks * self.block_size

    def tokens_stored(self) -> int:
        """Tokens held by all sequences (a shared block's tokens counted once per sequence)."""
        return sum(self.lengths.values())

    def slots_allocated(self) -> int:
        """Slots in allocated blocks (each block once, however many sequences share it)."""
        return (self.num_blocks - self.num_free_blocks) * self.block_size

    def blocks_needed(self, seq_id: Hashable, n_new: int) -> int:
        """New blocks that appending ``n_new`` tokens to ``seq_id`` takes (a new sequence: ``seq_id`` unknown;
        blocks already reserved by :meth:`reserve` count as held).

        Counts the copy of a shared partly-filled last block (copy-on-write)."""
        n_new = check_int("n_new", n_new, min_value=0)
        length, table = self.lengths.get(seq_id, 0), self.tables.get(seq_id, [])
        need = max(0, -(-(length + n_new) // self.block_size) - len(table))
        if n_new and length % self.block_size and self.allocator.ref_count(table[-1]) > 1:
            need += 1  # the partly-filled last block is shared: it is copied before it is written
        return need

    def caches(self) -> list[PagedCache]:
        """One :class:`PagedCache` per layer, to hand to the model's forward."""
        return list(self._caches)

    # ------------------------------------------------------------------------------------------ sequences

    def add_sequence(self, seq_id: Hashable) -> None:
        """Register an empty sequence."""
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id!r} already exists")
        self.tables[seq_id] = []
        self.lengths[seq_id] = 0

    def free_sequence(self, seq_id: Hashable) -> None:
        """Release the sequence's blocks (shared ones stay allocated while another sequence holds them)."""
        table = self._table(seq_id)
        for block in table:
            self.allocator.release(block)
        del self.tables[seq_id], self.lengths[seq_id]
        self._step = None

    def fork(self, parent: Hashable, child: Hashable, n_tokens: int | None = None) -> None:
        """Start ``child`` as a copy of the first ``n_tokens`` (default: all) of ``parent``'s tokens, sharing the
        blocks that hold them (reference counts, no copy; a shared partly-filled last block is copied when the
        child first writes into it)."""
        table = self._table(parent)
        length = self.lengths[parent]
        n_tokens = length if n_tokens is None else check_int("n_tokens", n_tokens, min_value=0, max_value=length)
        shared = table[: -(-n_tokens // self.block_size)]
        self.add_sequence(child)
        for block in shared:
            self.allocator.share(block)
        self.tables[child] = list(shared)
        self.lengths[child] = n_tokens

    def reserve(self, seq_id: Hashable, n_tokens: int) -> None:
        """Allocate now the blocks that ``seq_id`` needs to hold ``n_tokens`` tokens in all, without storing any
        (vLLM allocates a prompt's blocks when it admits the request, then prefills it chunk by chunk). All or
        nothing: raises :class:`OutOfBlocksError` if the free blocks do not suffice."""
        length = self.lengths.get(seq_id, 0)
        n_tokens = check_int("n_tokens", n_tokens, min_value=length)
        table = self._table(seq_id)
        need = self.blocks_needed(seq_id, n_tokens - length)
        if need > self.num_free_blocks:
            raise OutOfBlocksError(f"reserving {n_tokens} tokens for {seq_id!r} needs {need} blocks, "
                                   f"{self.num_free_blocks} of {self.num_blocks} are free")  # fmt: skip
        if length % self.block_size and n_tokens > length and self.allocator.ref_count(table[-1]) > 1:
            self._copy_on_write(table)
        while len(table) * self.block_size < n_tokens:
            table.append(self.allocator.allocate())

    def _table(self, seq_id: Hashable) -> list[int]:
        if seq_id not in self.tables:
            raise KeyError(f"unknown sequence {seq_id!r}; known: {sorted(map(repr, self.tables))}")
        return self.tables[seq_id]

    def slots(self, seq_id: Hashable) -> Tensor:
        """Slots of the sequence's tokens in order, ``(len,)``."""
        table = torch.tensor(self._table(seq_id), dtype=torch.long)
        offsets = torch.arange(self.block_size)
        return (table[:, None] * self.block_size + offsets).flatten()[: self.lengths[seq_id]]

    # ------------------------------------------------------------------------------------------ a step

    def prepare(self, seq_ids: Sequence[Hashable], n_new: int | Sequence[int]) -> None:
        """Allocate the slots of ``n_new`` tokens (one count for all, or one per sequence) for each of
        ``seq_ids`` (the sequences of the next forward, in order) and compute the step's metadata. All or
        nothing: raises :class:`OutOfBlocksError` (and allocates nothing) if the free blocks do not suffice."""
        seq_ids = list(seq_ids)
        if not seq_ids:
            raise ValueError("seq_ids must name at least one sequence")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"seq_ids must be distinct, got {seq_ids!r}")
        if isinstance(n_new, int):
            counts = [check_positive_int("n_new", n_new)] * len(seq_ids)
        else:
            counts = [check_positive_int("n_new", c) for c in n_new]
            if len(counts) != len(seq_ids):
                raise ValueError(f"n_new must hold one count per sequence ({len(seq_ids)}), got {len(counts)}")
        for s in seq_ids:
            self._table(s)
        need = sum(self.blocks_needed(s, c) for s, c in zip(seq_ids, counts, strict=True))
        if need > self.num_free_blocks:
            raise OutOfBlocksError(
                f"appending {counts} token(s) to {len(seq_ids)} sequence(s) needs {need} blocks, "
                f"{self.num_free_blocks} of {self.num_blocks} are free"
            )
        for s, c in zip(seq_ids, counts, strict=True):
            self._grow(s, c)
        rows = [self.slots(s) for s in seq_ids]  # (len,) each, the new tokens last
        t_max, n_max = max(len(r) for r in rows), max(counts)
        gather = torch.zeros(len(rows), t_max, dtype=torch.long)
        key_pos = torch.full((len(rows), t_max), PAD_POSITION, dtype=torch.long)
        q_index = torch.zeros(len(rows), n_max, dtype=torch.long)
        q_valid = torch.zeros(len(rows), n_max, dtype=torch.bool)
        start = 0
        for i, (r, c) in enumerate(zip(rows, counts, strict=True)):
            gather[i, : len(r)] = r
            key_pos[i, : len(r)] = torch.arange(len(r))
            q_index[i] = start + torch.arange(n_max).clamp(max=c - 1)  # padding repeats the last new token
            q_valid[i, :c] = True
            start += c
        device = self.k.device
        self._step = _Step(
            seq_ids=seq_ids,
            n_new=counts,
            slot_mapping=torch.cat([r[len(r) - c :] for r, c in zip(rows, counts, strict=True)]).to(device),
            new_positions=torch.cat([torch.arange(len(r) - c, len(r)) for r, c in zip(rows, counts, strict=True)]).to(
                device
            ),
            gather=gather.to(device),
            key_positions=key_pos.to(device),
            q_index=q_index.to(device),
            q_valid=q_valid.flatten().to(device),
            written=[False] * self.n_layers,
        )

    def _grow(self, seq_id: Hashable, n_new: int) -> None:
        """Append ``n_new`` token slots to ``seq_id``, copying a shared partly-filled last block first."""
        table, length, bs = self.tables[seq_id], self.lengths[seq_id], self.block_size
        if length % bs and self.allocator.ref_count(table[-1]) > 1:
            self._copy_on_write(table)
        while len(table) * bs < length + n_new:
            table.append(self.allocator.allocate())
        self.lengths[seq_id] = length + n_new

    def _copy_on_write(self, table: list[int]) -> None:
        """Give ``table`` its own copy of its shared last block (Kwon et al. 2023, sec. 4.4)."""
        bs = self.block_size
        old, new = table[-1], self.allocator.allocate()
        self.k[:, new * bs : (new + 1) * bs] = self.k[:, old * bs : (old + 1) * bs]
        self.v[:, new * bs : (new + 1) * bs] = self.v[:, old * bs : (old + 1) * bs]
        self.allocator.release(old)
        table[-1] = new

    def _current_step(self) -> _Step:
        if self._step is None:
            raise RuntimeError("no step is prepared: call pool.prepare(seq_ids, n_new) before the forward")
        return self._step


class PagedCache(KVCache):
    """Layer ``layer`` of a :class:`PagedKVPool`, behind the model's :class:`~refimpl.llm.cache.KVCache`
    interface. The rows of the batch are the sequences of the last :meth:`PagedKVPool.prepare`."""

    def __init__(self, pool: PagedKVPool, layer: int) -> None:
        self.pool = pool
        self.layer = layer

    def update(self, k: Tensor, v: Tensor, positions: Tensor) -> None:
        """Write ``k, v: (B, H_kv, T, D)`` into the step's slots: rows ``(S, n_new)`` or packed ``(1, N)`` (see
        the module docstring); ``positions``: ``(T,)`` or ``(B, T)``, which must be the new tokens' positions
        (a paged sequence stores every token)."""
        step = self.pool._current_step()
        for name, t in (("k", k), ("v", v)):
            check_tensor(name, t, ndim=4, floating=True)
            if t.shape[1] != self.pool.n_kv_heads or t.shape[3] != self.pool.head_dim:
                raise ValueError(f"{name} must have shape (B, H_kv={self.pool.n_kv_heads}, T, "
                                 f"D={self.pool.head_dim}), got {tuple(t.shape)}")  # fmt: skip
        b, h, n, d = k.shape
        step.rows(b, n)
        if v.shape != k.shape:
            raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
        self._check_positions(step, positions, b, n)
        if step.written[self.layer]:
            raise RuntimeError(f"layer {self.layer} was already updated in this step; call prepare() again")
        # (B, H_kv, T, D) -> (B * T, H_kv, D): one row per new token, in the order of the slot mapping
        self.pool.k[self.layer].index_copy_(0, step.slot_mapping, k.transpose(1, 2).reshape(b * n, h, d))
        self.pool.v[self.layer].index_copy_(0, step.slot_mapping, v.transpose(1, 2).reshape(b * n, h, d))
        step.written[self.layer] = True

    @staticmethod
    def _check_positions(step: _Step, positions: Tensor, b: int, n: int) -> None:
        pos = (positions if positions.dim() == 2 else positions.expand(b, -1)).reshape(-1)
        if pos.shape != step.new_positions.shape or not torch.equal(pos, step.new_positions):
            raise ValueError(
                f"positions must be the new tokens' positions {step.new_positions.tolist()} (packed order), "
                f"got {positions.tolist()}"
            )

    def _written_step(self) -> _Step:
        step = self.pool._current_step()
        if not step.written[self.layer]:
            raise RuntimeError(f"layer {self.layer} has no keys for this step yet: call update() first")
        return step

    def keys_values(self) -> tuple[Tensor, Tensor]:
        """Each row's blocks gathered into ``(B, H_kv, T_max, D)`` (shorter rows padded; see key_positions)."""
        step = self._written_step()
        k = self.pool.k[self.layer][step.gather]  # (B, T_max, H_kv, D)
        v = self.pool.v[self.layer][step.gather]
        return k.transpose(1, 2), v.transpose(1, 2)

    def key_positions(self) -> Tensor:
        """``(B, H_kv, T_max)``: ``0 .. len-1`` per row, padding at a position no query reaches."""
        step = self._written_step()
        return step.key_positions[:, None, :].expand(-1, self.pool.n_kv_heads, -1)

    def attend(self, q: Tensor, q_positions: Tensor, scale: float) -> Tensor:
        """Causal attention of ``q: (B, H_q, T, D)`` (rows or packed, as in :meth:`update`) at ``q_positions``
        ``(T,)`` or ``(B, T)`` over each sequence's gathered blocks: a key at position ``p'`` of the same
        sequence is visible to a query at ``p`` iff ``p' <= p``. The queries are laid out as ``(S, n_max)`` rows
        for one batched softmax attention (a padded query repeats its sequence's last one and is dropped)."""
        k, v = self.keys_values()  # (S, H_kv, T_max, D)
        step = self.pool._current_step()
        b, h, n, d = q.shape
        step.rows(b, n)
        self._check_positions(step, q_positions, b, n)
        s, n_max = step.q_index.shape
        packed = q.transpose(1, 2).reshape(b * n, h, d)  # (N, H_q, D)
        q_rows = packed[step.q_index].transpose(1, 2)  # (S, H_q, n_max, D)
        q_pos = step.new_positions[step.q_index]  # (S, n_max)
        visible = step.key_positions[:, None, :] <= q_pos[:, :, None]  # (S, n_max, T_max)
        o = torch.nn.functional.scaled_dot_product_attention(
            q_rows, k, v, attn_mask=visible[:, None], scale=scale, enable_gqa=h != k.shape[1]
        )  # (S, H_q, n_max, D)
        o = o.transpose(1, 2).reshape(s * n_max, h, d)[step.q_valid]  # (N, H_q, D), packed order
        return o.reshape(b, n, h, d).transpose(1, 2)

    def nbytes(self) -> int:
        """Bytes of this layer's allocated blocks, keys and values (partly-filled blocks counted whole)."""
        per_slot = 2 * self.pool.n_kv_heads * self.pool.head_dim * self.pool.k.element_size()
        return self.pool.slots_allocated() * per_slot

    def __len__(self) -> int:
        """Tokens of the longest sequence of the prepared step (0 if none)."""
        return 0 if self.pool._step is None else int(self.pool._step.gather.shape[1])
