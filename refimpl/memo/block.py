"""The book's transformer block: a GPT layer whose saved activations are those of Korthikanti et al. (2022).

Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models" (2022), sec. 4.1, count the
bytes one transformer layer keeps for its backward pass, for a GPT layer in the Megatron layout ``(s, b, h)``
(sequence, batch, hidden) with ``a`` heads, a ``4h`` GeLU MLP, dropout after the attention probabilities and
after both residual branches, 16-bit activations and 1-byte dropout masks::

    attention  11 s b h + 5 a s^2 b      MLP  19 s b h      two LayerNorms  4 s b h

This block is written so that what autograd saves is exactly that list (:func:`refimpl.memo.ledger` checks it
with ``saved_tensors_hooks``), plus the LayerNorms' per-token mean and 1/std, which the paper leaves out:

* ``torch.native_layer_norm`` returns its mean and rstd, so the block can name them;
* the attention scale is folded into ``torch.baddbmm`` (``x * 0.125`` would save a 0-d tensor);
* the causal mask is an additive constant (``masked_fill`` would save a boolean ``s x s`` mask);
* dropout is :class:`MaskedScale`, which saves a 1-byte boolean mask and nothing else.

Two choices serve MEMO's token-wise recomputation (:mod:`refimpl.memo.strategies`):

* **Tiles.** Tokens are processed in tiles of ``tile`` tokens, each with identical kernel calls. A BLAS GEMM on
  the last ``s - t0`` rows of a matrix does not in general return the same bits as rows ``t0:`` of the GEMM on all
  ``s`` rows (the library picks different kernels and blockings for different shapes), so recomputing "the
  rest of the tokens" would not reproduce the forward pass bit for bit. Recomputing whole tiles with the same
  calls does.
* **Counter-based dropout.** A stateful generator cannot produce the mask of tokens ``t0:`` without replaying
  the stream from the start; :func:`dropout_keep_mask` seeds a generator from ``(seed, site, tile)`` instead,
  as Philox's ``(seed, offset)`` does on GPUs, so any tile's mask can be regenerated on its own.

Every tensor the block creates for the backward pass is announced on an optional :class:`Tape` with its name,
its tile and its token axis; that is what lets a strategy swap the first tokens' activations and recompute the
others. Without a tape the block is an ordinary ``nn.Module``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from refimpl._checks import check_float, check_int, check_positive_int, check_tensor

__all__ = [
    "ACTIVATION_NAMES",
    "MaskedScale",
    "Tape",
    "TapeEntry",
    "TransformerBlock",
    "dropout_keep_mask",
    "make_stack",
    "splitmix64",
    "tile_seed",
]

# Names of the tensors one block saves for backward, in Korthikanti et al.'s order (sec. 4.1). ``x`` is the
# layer input (saved by the first LayerNorm); ``kt`` is K transposed, ``v`` is V (saved by the two attention
# matmuls); ``ctx`` is the attention output (input of the output projection).
ACTIVATION_NAMES = (
    "x",
    "ln1_mean",
    "ln1_rstd",
    "ln1_out",
    "q",
    "kt",
    "p",
    "p_mask",
    "p_drop",
    "v",
    "ctx",
    "attn_mask",
    "ln2_in",
    "ln2_mean",
    "ln2_rstd",
    "ln2_out",
    "fc1_out",
    "gelu_out",
    "mlp_mask",
)

# Dropout sites: one independent mask stream each.
_SITE_PROBS, _SITE_ATTN_OUT, _SITE_MLP_OUT = 1, 2, 3

_M64 = (1 << 64) - 1


def splitmix64(z: int) -> int:
    """SplitMix64's output function (Steele, Lea and Flood 2014): a 64-bit integer mixer on Python ints."""
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def tile_seed(seed: int, site: int, tile: int) -> int:
    """The generator seed of one dropout mask tile: a mix of ``(seed, site, tile)`` in ``[0, 2^63)``."""
    return splitmix64(splitmix64(splitmix64(seed) ^ site) ^ tile) >> 1


def dropout_keep_mask(
    seed: int, site: int, tile: int, shape: tuple[int, ...], keep_prob: float, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Counter-based dropout at tile granularity: the mask of one tile is a pure function of its coordinates.

    ``seed``: the layer's dropout seed (an int >= 0); change it between steps for fresh masks. ``site``: which
    dropout of the layer (an int >= 0). ``tile``: which tile of tokens (an int >= 0). ``shape``: the tile's shape.
    ``keep_prob``: probability of keeping an element, in ``(0, 1]``. ``device``: where to build the mask.

    Returns a bool tensor of ``shape`` (1 byte per element, Korthikanti et al.'s mask size) drawn from a generator
    seeded with :func:`tile_seed`. A stateful stream (one generator for the whole step) could not give the mask of
    tile ``j`` without replaying tiles ``0 .. j-1``; seeding per tile can, as Philox's ``(seed, offset)`` does on
    GPUs, so a recomputed tile gets the forward pass's mask bit for bit.
    """
    seed = check_int("seed", seed, min_value=0)
    site = check_int("site", site, min_value=0)
    tile = check_int("tile", tile, min_value=0)
    keep_prob = check_float("keep_prob", keep_prob, min_value=0.0, max_value=1.0, min_inclusive=False)
    gen = torch.Generator(device=device).manual_seed(tile_seed(seed, site, tile))
    return torch.rand(shape, generator=gen, device=device) < keep_prob


def _owned(t: torch.Tensor) -> torch.Tensor:
    """``t`` if it is contiguous and owns its whole storage, else a contiguous copy."""
    whole = t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    return t if t.is_contiguous() and whole else t.clone(memory_format=torch.contiguous_format)


class MaskedScale(torch.autograd.Function):
    """Dropout given its mask: ``y = x * mask / keep_prob``; saves only the 1-byte mask for backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return (x * mask).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (mask,) = ctx.saved_tensors
        return (grad * mask).mul_(ctx.scale), None, None


@dataclass
class TapeEntry:
    """One tensor the block created for its backward pass.

    Attributes:
        name: one of :data:`ACTIVATION_NAMES`.
        tensor: the tensor (contiguous, owning its whole storage).
        tile: the tile it belongs to, or ``None`` for a tensor shared by all tokens (``x``, ``kt``, ``v``).
        token_dim: for a shared tensor, the axis along which tokens run (``x``: 0, ``kt``: 2, ``v``: 1).
    """

    name: str
    tensor: torch.Tensor
    tile: int | None = None
    token_dim: int | None = None


@dataclass
class Tape:
    """Where the block announces the tensors it saves for backward (see :class:`TapeEntry`).

    ``entries`` maps ``(name, tile)`` to the entry; ``by_storage`` maps a storage's data pointer to the same
    key, so a saved-tensor hook can name any view autograd hands it. The tape holds strong references: drop it
    when the layer's forward pass is over.
    """

    entries: dict[tuple[str, int | None], TapeEntry] = field(default_factory=dict)
    by_storage: dict[int, tuple[str, int | None]] = field(default_factory=dict)

    def record(self, name: str, tensor: torch.Tensor, *, tile: int | None = None, token_dim: int | None = None) -> None:
        """Announce ``tensor`` under ``(name, tile)``; it must be contiguous and own its storage."""
        if not tensor.is_contiguous() or tensor.storage_offset() != 0:
            raise ValueError(f"tape entry {name!r} must be a contiguous tensor at storage offset 0")
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            raise ValueError(f"tape entry {name!r} must own its whole storage")
        key = (name, tile)
        self.entries[key] = TapeEntry(name, tensor, tile, token_dim)
        self.by_storage[tensor.untyped_storage().data_ptr()] = key

    def lookup(self, t: torch.Tensor) -> TapeEntry | None:
        """The entry whose storage ``t`` (any view) lives in, or ``None``."""
        key = self.by_storage.get(t.untyped_storage().data_ptr())
        return None if key is None else self.entries[key]


class TransformerBlock(nn.Module):
    """A pre-LayerNorm GPT layer on ``(s, b, h)`` activations, computed in tiles of ``tile`` tokens.

    ``forward(x)`` with ``x: (s, b, h)`` returns ``(s, b, h)``: causal self-attention and a GeLU MLP, each with a
    residual connection.

    ``hidden``: ``h``, the model width. ``heads``: ``a``, the number of attention heads (must divide ``hidden``).
    ``ffn_hidden``: width of the MLP (default ``4 h``, Korthikanti et al.'s assumption). ``dropout``: dropout
    probability ``p`` in ``[0, 1)`` on the attention probabilities and on both residual branches (0 disables dropout
    and its masks). ``tile``: tokens per tile (the granularity of MEMO's token split). ``seed``: the counter-based
    dropout seed; a training loop sets ``block.seed`` per step. ``eps``: LayerNorm epsilon. ``dtype, device``: of
    the parameters.
    """

    def __init__(
        self,
        hidden: int,
        heads: int,
        *,
        ffn_hidden: int | None = None,
        dropout: float = 0.1,
        tile: int = 16,
        seed: int = 0,
        eps: float = 1e-5,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.hidden = check_positive_int("hidden", hidden)
        self.heads = check_positive_int("heads", heads)
        if hidden % heads:
            raise ValueError(f"heads must divide hidden, got hidden={hidden}, heads={heads}")
        self.ffn_hidden = check_positive_int("ffn_hidden", 4 * hidden if ffn_hidden is None else ffn_hidden)
        self.dropout = check_float("dropout", dropout, min_value=0.0, max_value=1.0, max_inclusive=False)
        self.tile = check_positive_int("tile", tile)
        self.seed = check_int("seed", seed, min_value=0)
        self.eps = check_float("eps", eps, min_value=0.0, min_inclusive=False)
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        self.ln1 = nn.LayerNorm(hidden, eps=eps, **kw)
        self.qkv = nn.Linear(hidden, 3 * hidden, **kw)
        self.proj = nn.Linear(hidden, hidden, **kw)
        self.ln2 = nn.LayerNorm(hidden, eps=eps, **kw)
        self.fc1 = nn.Linear(hidden, self.ffn_hidden, **kw)
        self.fc2 = nn.Linear(self.ffn_hidden, hidden, **kw)

    @property
    def head_dim(self) -> int:
        """``d = h / a``."""
        return self.hidden // self.heads

    def tiles(self, seq_len: int) -> list[tuple[int, int]]:
        """Token ranges ``[lo, hi)`` of the tiles of a sequence of ``seq_len`` tokens (the last may be short)."""
        return [(lo, min(lo + self.tile, seq_len)) for lo in range(0, seq_len, self.tile)]

    def forward(self, x: torch.Tensor, tape: Tape | None = None) -> torch.Tensor:
        """``x: (s, b, h) -> (s, b, h)``; announces saved tensors on ``tape`` when one is given."""
        check_tensor("x", x, ndim=3, floating=True)
        if x.shape[2] != self.hidden:
            raise ValueError(f"x must have hidden size {self.hidden} in dim 2, got shape {tuple(x.shape)}")
        if tape is not None:
            x = _owned(x)  # the tape needs x to own its storage
        return self.forward_tiles(x, first_tile=0, kv_prefix=None, tape=tape)

    def _dropout(self, t: torch.Tensor, site: int, tape: Tape | None, name: str, tile: int) -> torch.Tensor:
        if self.dropout == 0.0:
            return t
        mask = dropout_keep_mask(self.seed, site, tile, tuple(t.shape), 1.0 - self.dropout, t.device)
        if tape is not None:
            tape.record(name, mask, tile=tile)
        return MaskedScale.apply(t, mask, 1.0 / (1.0 - self.dropout))

    def _layer_norm(self, t: torch.Tensor, ln: nn.LayerNorm, prefix: str, tape: Tape | None, tile: int) -> torch.Tensor:
        # native_layer_norm returns (out, mean, rstd) and saves exactly (input, weight, bias, mean, rstd).
        out, mean, rstd = torch.native_layer_norm(t, (self.hidden,), ln.weight, ln.bias, self.eps)
        if tape is not None:
            tape.record(f"{prefix}_mean", mean, tile=tile)
            tape.record(f"{prefix}_rstd", rstd, tile=tile)
            tape.record(f"{prefix}_out", out, tile=tile)
        return out

    def forward_tiles(
        self,
        x: torch.Tensor,
        *,
        first_tile: int,
        kv_prefix: tuple[torch.Tensor, torch.Tensor] | None,
        tape: Tape | None,
    ) -> torch.Tensor:
        """Run the tiles ``first_tile, first_tile + 1, ...`` of the layer on the full input ``x: (s, b, h)``.

        ``first_tile = 0`` is the forward pass. With ``first_tile = j0 > 0`` (MEMO's recomputation) the keys and
        values of the first ``t0 = j0 * tile`` tokens are not recomputed but given as
        ``kv_prefix = (K[:, :t0], V[:, :t0])``, each ``(b a, t0, d)``; the result is the output of tokens
        ``t0:``, ``(s - t0, b, h)``, and ``tape`` receives those tiles' tensors plus the full ``kt`` and ``v``.
        """
        s, b, h = x.shape
        a, d = self.heads, self.head_dim
        tiles = self.tiles(s)
        if tape is not None:
            tape.record("x", x, token_dim=0)
        # Phase 1, per tile: LayerNorm and the QKV projection; split heads into (b a, c, d) copies.
        q_tiles: dict[int, torch.Tensor] = {}
        k_parts = [] if kv_prefix is None else [kv_prefix[0]]
        v_parts = [] if kv_prefix is None else [kv_prefix[1]]
        for j in range(first_tile, len(tiles)):
            lo, hi = tiles[j]
            c = hi - lo
            y = self._layer_norm(x[lo:hi], self.ln1, "ln1", tape, j)  # (c, b, h)
            qkv = F.linear(y, self.qkv.weight, self.qkv.bias)  # (c, b, 3h)
            qkv = qkv.view(c, b, 3, a, d).permute(2, 1, 3, 0, 4)  # (3, b, a, c, d)
            # Copies (never views of qkv, whose storage holds all three): the operands of the two bmm's.
            q_tiles[j] = _owned(qkv[0].reshape(b * a, c, d))
            k_parts.append(qkv[1].reshape(b * a, c, d))
            v_parts.append(qkv[2].reshape(b * a, c, d))
            if tape is not None:
                tape.record("q", q_tiles[j], tile=j)
        kt = torch.cat(k_parts, dim=1).transpose(1, 2).contiguous()  # K^T: (b a, d, s)
        v = torch.cat(v_parts, dim=1)  # V: (b a, s, d)
        if tape is not None:
            tape.record("kt", kt, token_dim=2)
            tape.record("v", v, token_dim=1)
        # Causal mask as an additive constant (saves nothing): -inf above the diagonal.
        bias = torch.full((s, s), float("-inf"), dtype=x.dtype, device=x.device).triu_(1)
        outs = []
        # Phase 2, per query tile: attention over all keys, projection, MLP.
        for j in range(first_tile, len(tiles)):
            lo, hi = tiles[j]
            c = hi - lo
            # scores = Q K^T / sqrt(d) + mask: (b a, c, s); baddbmm saves q and kt only.
            scores = torch.baddbmm(bias[lo:hi], q_tiles[j], kt, alpha=1.0 / math.sqrt(d))
            p = torch.softmax(scores, dim=-1)  # saves its output
            if tape is not None:
                tape.record("p", p, tile=j)
            p = self._dropout(p, _SITE_PROBS, tape, "p_mask", j)
            if tape is not None and self.dropout > 0:
                tape.record("p_drop", p, tile=j)
            ctx = torch.bmm(p, v)  # (b a, c, d); saves p_drop and v
            ctx = _owned(ctx.view(b, a, c, d).permute(2, 0, 1, 3).reshape(c, b, h))  # (c, b, h)
            if tape is not None:
                tape.record("ctx", ctx, tile=j)
            o = F.linear(ctx, self.proj.weight, self.proj.bias)
            o = self._dropout(o, _SITE_ATTN_OUT, tape, "attn_mask", j)
            r = x[lo:hi] + o  # residual: saves nothing
            if tape is not None:
                tape.record("ln2_in", r, tile=j)
            z = self._layer_norm(r, self.ln2, "ln2", tape, j)
            f = F.linear(z, self.fc1.weight, self.fc1.bias)  # (c, b, ffn)
            g = F.gelu(f)  # saves its input f
            if tape is not None:
                tape.record("fc1_out", f, tile=j)
                tape.record("gelu_out", g, tile=j)
            m = F.linear(g, self.fc2.weight, self.fc2.bias)
            m = self._dropout(m, _SITE_MLP_OUT, tape, "mlp_mask", j)
            outs.append(r + m)
        if not outs:
            return x.new_empty((0, b, h))
        return torch.cat(outs, dim=0)


def make_stack(
    n_layers: int,
    hidden: int,
    heads: int,
    *,
    seed: int = 0,
    **block_kwargs: Any,
) -> nn.ModuleList:
    """``n_layers`` :class:`TransformerBlock` s with parameters from ``torch.manual_seed(seed)`` and dropout
    seeds ``seed + i``; ``block_kwargs`` go to every block. ``n_layers`` must be >= 1."""
    n_layers = check_positive_int("n_layers", n_layers)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        blocks = [TransformerBlock(hidden, heads, seed=seed + i, **block_kwargs) for i in range(n_layers)]
    finally:
        torch.random.set_rng_state(gen_state)
    return nn.ModuleList(blocks)
