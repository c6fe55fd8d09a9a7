"""KIVI's streaming KV cache: quantized history plus a full-precision residual (Liu et al. 2024, sec. 3.3).

Each of the key and value tensors of one layer is a :class:`QuantizedStream`:
``[X_g (quantized, packed) | X_r (full precision, the most recent tokens)]``. Attention reads
``[dequantize(X_g) | X_r]`` in token order, so the position mask of
:func:`refimpl.llm.cache.grouped_attention` applies unchanged.

KIVI's choice (sec. 3.2): keys per channel (``G`` tokens of one channel share a scale, because a few key
channels carry outliers), values per token (``G`` channels of one token share a scale, because each value row
is mixed by one attention weight). Per-channel groups span tokens, so keys can only be quantized ``G`` at a
time: they wait in the residual until ``R`` have arrived, are quantized together and the residual empties.
Values quantize token by token, keeping the ``R`` most recent in full precision. Both rules depend only on how
many tokens arrived, not on how they were chunked: a prefill of ``l`` tokens leaves the same state as ``l``
decode steps.

Order of operations (checked in the authors' ``models/llama_kivi.py``, github.com/jy-yuan/KIVI at 876b4d2):
a step attends first, with its own new tokens in full precision, and quantizes afterwards; the prefill's
attention is over the unquantized keys and values. :class:`KIVICache` does the same by default and offers the
other order as an option. Defaults ``G = 32``, ``R = 128``: the setting of the authors' memory and speed
script (``mem_spd_test.py``, same commit); their command-line defaults (``utils/process_args.py``) are
``G = 128``, ``R = 128`` and their examples (``example.py``) use ``G = 32``, ``R = 32``.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
from torch import Tensor

from refimpl._checks import check_choice, check_int, check_positive_int
from refimpl.kivi.quant import AXES, BITS, QuantizedTensor, check_packing, dequantize, quantize
from refimpl.llm.cache import FULL_PRECISION_PREFILL, KVCache, check_step

__all__ = ["ORDERS", "KIVICache", "QuantizedStream", "bits_per_element", "n_quantized"]

#: When a step's tokens are quantized relative to its attention (see :class:`KIVICache`).
ORDERS = ("attend_then_quantize", "quantize_then_attend")


def n_quantized(n_tokens: int, group_size: int, residual_length: int, axis: str) -> int:
    """Tokens KIVI holds quantized once ``l = n_tokens`` tokens have arrived (sec. 3.3).

    ``axis="channel"`` (keys): whole blocks of ``R`` tokens (``G`` if ``R = 0``), i.e. ``l - (l mod R)``;
    ``axis="token"`` (values): all but the ``R`` most recent, ``max(l - R, 0)``. The rest is full precision.
    """
    n = check_int("n_tokens", n_tokens, min_value=0)
    g = check_positive_int("group_size", group_size)
    r = check_int("residual_length", residual_length, min_value=0)
    check_choice("axis", axis, AXES)
    if axis == "channel":
        block = max(r, g)
        return n // block * block
    return max(n - r, 0)


def bits_per_element(
    seq: int,
    bits: int = 2,
    group_size: int = 32,
    residual_length: int = 128,
    key_axis: str = "channel",
    value_axis: str = "token",
    stat_bits: int = 16,
    residual_bits: int = 16,
) -> float:
    """Average bits a KIVI cache stores per K/V element at context ``seq``, everything included.

    A quantized element costs ``bits`` plus its share of one scale and one zero point per group of ``G``
    (``2 * stat_bits / G``); a residual element costs ``residual_bits``. This is the ``kv_bits`` to give the
    roofline model (``Workload(kv_bits=...)`` of :func:`refimpl.roofline.analyze`); ``16 / bits_per_element`` is
    the compression over fp16.
    """
    seq = check_positive_int("seq", seq)
    check_choice("bits", bits, BITS)
    stat_bits = check_positive_int("stat_bits", stat_bits)
    residual_bits = check_positive_int("residual_bits", residual_bits)
    quantized_bits = bits + 2 * stat_bits / group_size
    total = 0.0
    for axis in (key_axis, value_axis):
        n_q = n_quantized(seq, group_size, residual_length, axis)
        total += n_q * quantized_bits + (seq - n_q) * residual_bits
    return total / (2 * seq)


class _Growable:
    """A tensor that grows along one dimension by doubling its storage (amortized O(1) append)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._buf: Tensor | None = None
        self._len = 0

    def append(self, x: Tensor) -> None:
        end = self._len + x.shape[self.dim]
        if self._buf is None or end > self._buf.shape[self.dim]:
            cap = max(end, 2 * (0 if self._buf is None else self._buf.shape[self.dim]))
            shape = list(x.shape)
            shape[self.dim] = cap
            buf = x.new_empty(shape)
            if self._buf is not None:
                buf.narrow(self.dim, 0, self._len).copy_(self.view())
            self._buf = buf
        self._buf.narrow(self.dim, self._len, end - self._len).copy_(x)
        self._len = end

    def view(self) -> Tensor | None:
        return None if self._buf is None else self._buf.narrow(self.dim, 0, self._len)

    def __len__(self) -> int:
        return self._len

    def nbytes(self) -> int:
        """Bytes of the filled part (what a right-sized allocation would hold)."""
        v = self.view()
        return 0 if v is None else v.numel() * v.element_size()


class QuantizedStream:
    """One of the key or value tensors of a KIVI cache: ``[quantized history | full-precision residual]``.

    Tokens ``x: (B, H, T_new, D)`` go into the residual ``X_r``; then (sec. 3.3, with ``l`` tokens so far):

    * ``axis="channel"`` (keys): once ``X_r`` holds ``R`` tokens (``G`` if ``R = 0``) they are quantized, in
      groups of ``G`` tokens per channel, and ``X_r`` empties. The history holds ``l - (l mod R)`` tokens and
      ``X_r`` holds ``l mod R < R`` (``r = l mod R`` in the paper's prefill rule ``X_Kg = X_K[:l - r]``).
    * ``axis="token"`` (values): ``X_r`` keeps the ``R`` most recent tokens; every older token is quantized,
      in groups of ``G`` channels. The history holds ``max(l - R, 0)`` tokens (``X_Vg = X_V[:l - R]``).

    ``G * bits`` must be a multiple of 8 and ``R`` a multiple of ``G`` (validated by :class:`KIVICache`).
    """

    def __init__(
        self, bits: int, group_size: int, residual_length: int, axis: str, stat_dtype: torch.dtype | None
    ) -> None:
        self.bits, self.group_size, self.residual_length = bits, group_size, residual_length
        self.axis, self.stat_dtype = axis, stat_dtype
        # Quantized history, grown along the token-group dimension (dim 2 of codes, scale and zero).
        self._codes, self._scale, self._zero = _Growable(2), _Growable(2), _Growable(2)
        self._seen = 0  # l: tokens appended so far
        self._n_quantized = 0  # tokens in the quantized history
        self._dtype: torch.dtype | None = None
        # What attention reads, in token order: [dequantized history | residual X_r], (B, H, T, D). It holds the
        # residual (every token after the first n_quantized, exact; counted in nbytes()) and a working copy of
        # the history, each token dequantized once, when it is quantized (dequantization is elementwise within a
        # group, so this equals dequantizing the whole history at every step); a fused GPU kernel dequantizes in
        # registers instead, so the history part is not counted in nbytes().
        self._read = _Growable(2)
        # The tokens the last append quantized: their first index and dequantized values, not yet written into
        # _read (until then _read holds them exact: KIVI's released code attends before it quantizes, so the
        # step that quantizes them still reads them exact), and their full-precision values.
        self._pending: tuple[int, Tensor] | None = None
        self._fresh: tuple[int, Tensor] | None = None  # (first index, (B, H, T_fresh, D))

    def append(self, x: Tensor) -> None:
        """Add ``x: (B, H, T_new, D)`` and quantize whatever the rule above moves out of the residual."""
        self._dtype = x.dtype
        self._flush()
        self._read.append(x)
        self._seen += x.shape[2]
        # The oldest tokens of the residual that the rule moves into the quantized history.
        n_total = n_quantized(self._seen, self.group_size, self.residual_length, self.axis)
        n_quant = n_total - self._n_quantized
        self._fresh = None
        if n_quant:
            exact = self._read.view().narrow(2, self._n_quantized, n_quant).clone()  # (B, H, n_quant, D)
            q = quantize(exact, self.bits, self.group_size, self.axis, self.stat_dtype)
            self._codes.append(q.codes)
            self._scale.append(q.scale)
            self._zero.append(q.zero)
            self._fresh = (self._n_quantized, exact)
            self._pending = (self._n_quantized, dequantize(q))  # whole groups: the same as in the full history
            self._n_quantized = n_total

    def _flush(self) -> None:
        """Write the last append's dequantized tokens into the read buffer."""
        if self._pending is not None:
            start, deq = self._pending
            self._read.view().narrow(2, start, deq.shape[2]).copy_(deq)
            self._pending = None

    def quantized(self) -> QuantizedTensor | None:
        """The quantized history as a :class:`QuantizedTensor` (``None`` before anything is quantized)."""
        if self._codes.view() is None:
            return None
        return QuantizedTensor(
            self._codes.view(), self._scale.view(), self._zero.view(), self.bits, self.group_size, self.axis,
            self._dtype,
        )  # fmt: skip

    @property
    def n_quantized(self) -> int:
        """Tokens in the quantized history."""
        return self._n_quantized

    @property
    def n_residual(self) -> int:
        """Tokens in the full-precision residual ``X_r``."""
        return self._seen - self._n_quantized

    @property
    def residual(self) -> Tensor | None:
        """``X_r``: the full-precision residual, ``(B, H, T_r, D)`` (a view; ``None`` before any token)."""
        v = self._read.view()
        return None if v is None else v.narrow(2, self._n_quantized, self.n_residual)

    def tensor(self, last_step_exact: bool = False) -> Tensor:
        """``[dequantize(X_g) | X_r]``: ``(B, H, T, D)`` in the dtype the tokens arrived in.

        ``last_step_exact=True``: the tokens the last :meth:`append` quantized come back in full precision,
        i.e. the stream as it was before that append quantized anything (what KIVI's released code attends
        over: it quantizes after attention).
        The result is a view of a working buffer that later appends overwrite: copy it to keep it.
        """
        if self._seen == 0:
            raise RuntimeError("the stream is empty: append tokens first")
        if not last_step_exact:
            self._flush()
            return self._read.view()
        if self._pending is not None or self._fresh is None:  # not flushed yet: the buffer still holds them exact
            return self._read.view()
        start, fresh = self._fresh  # flushed by an earlier call: put the exact values back, in a copy
        out = self._read.view().clone()
        out.narrow(2, start, fresh.shape[2]).copy_(fresh)
        return out

    def nbytes(self) -> int:
        """Bytes held: packed codes, scales, zero points and the residual buffer."""
        r = self.residual
        res = 0 if r is None else r.numel() * r.element_size()  # the residual part of the read buffer
        return self._codes.nbytes() + self._scale.nbytes() + self._zero.nbytes() + res


class KIVICache(KVCache):
    """KIVI KV cache for one decoder layer (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization
    for KV Cache", sec. 3.3).

    Arguments (paper symbols): ``bits`` ``B`` in {2, 4, 8}; ``group_size`` ``G`` (``G * bits`` a multiple
    of 8, so a group packs into whole bytes); ``residual_length`` ``R`` (a multiple of ``G``, may be 0);
    ``key_axis`` / ``value_axis`` in {"channel", "token"}: KIVI is keys per channel, values per token; the
    per-token-keys setting is the one the paper shows failing at 2 bits. ``stat_dtype`` stores scales and
    zero points (fp16 as in KIVI; ``None``: the dtype of the tokens).

    ``order`` says when a step's tokens are quantized relative to its attention. ``"attend_then_quantize"``
    (the default) follows the authors' released model code (``models/llama_kivi.py`` of jy-yuan/KIVI): a
    step attends over the cache with its own new tokens, and the residual tokens it moves out, still in full
    precision, and quantizes them afterwards; a prefill's attention is therefore exact.
    ``"quantize_then_attend"`` quantizes in :meth:`update`, so attention already reads the freshly quantized
    tokens. The stored state after a step is the same in both orders; only what that step's attention reads
    differs.

    :meth:`keys_values` returns the stored ``[dequantized history | residual]`` for keys and values (each
    ``(B, H_kv, T, D)``); :meth:`attend` reads :meth:`attention_keys_values`; :meth:`nbytes` counts packed
    codes, scales, zero points and both residual buffers (the filled part of the growable buffers, as
    :class:`~refimpl.llm.cache.FullCache` does; positions are not counted). Attention reads a working copy in
    which each token is dequantized once, when it is quantized (the same numbers as dequantizing the whole
    history at every step; a fused GPU kernel dequantizes in registers instead, so the copy is not counted).
    With ``order="attend_then_quantize"`` a prefill attends exactly as :class:`~refimpl.llm.cache.FullCache`
    does, so :meth:`prefill_key` lets a batched evaluation share the prefill with it.
    Raises ``ValueError``/``TypeError`` naming the argument on a bad setting or a step whose shape, dtype or
    head layout differs from earlier steps.
    """

    def __init__(
        self,
        bits: int = 2,
        group_size: int = 32,
        residual_length: int = 128,
        key_axis: str = "channel",
        value_axis: str = "token",
        stat_dtype: torch.dtype | None = torch.float16,
        order: str = "attend_then_quantize",
    ) -> None:
        g = check_packing(bits, group_size)
        check_choice("order", order, ORDERS)
        r = check_int("residual_length", residual_length, min_value=0)
        check_choice("key_axis", key_axis, AXES)
        check_choice("value_axis", value_axis, AXES)
        if r % g:
            raise ValueError(f"residual_length must be a multiple of group_size={g}, got {r}")
        floating = isinstance(stat_dtype, torch.dtype) and stat_dtype.is_floating_point
        if stat_dtype is not None and not floating:
            raise TypeError(f"stat_dtype must be a floating-point torch.dtype or None, got {stat_dtype!r}")
        self.bits, self.group_size, self.residual_length = bits, g, r
        self.key_axis, self.value_axis, self.order = key_axis, value_axis, order
        self.k_stream = QuantizedStream(bits, g, r, key_axis, stat_dtype)
        self.v_stream = QuantizedStream(bits, g, r, value_axis, stat_dtype)
        self._pos = _Growable(0)  # (T,) absolute positions, in cache order
        self._layout: tuple[int, int, int, torch.dtype] | None = None  # (B, H_kv, D, dtype) of the first step

    def update(self, k: Tensor, v: Tensor, positions: Tensor) -> None:
        """Append keys and values ``(B, H_kv, T_new, D)`` at ``positions: (T_new,)``; quantize as sec. 3.3."""
        check_step(k, v, positions)
        b, h, _, d = k.shape
        layout = (b, h, d, k.dtype)
        if self._layout is None:
            for name, axis in (("key_axis", self.key_axis), ("value_axis", self.value_axis)):
                if axis == "token" and d % self.group_size:
                    raise ValueError(
                        f"{name}='token' needs the head dimension D to be a multiple of "
                        f"group_size={self.group_size}, got D={d}"
                    )
            self._layout = layout
        elif layout != self._layout:
            raise ValueError(f"k must keep (B, H_kv, D, dtype) = {self._layout} across steps, got {layout}")
        self.k_stream.append(k)
        self.v_stream.append(v)
        self._pos.append(positions.to(torch.long))

    def keys_values(self) -> tuple[Tensor, Tensor]:
        """The stored ``[dequantized history | residual]`` keys and values, ``(B, H_kv, T, D)`` each (copies)."""
        if self._layout is None:
            raise RuntimeError("the cache is empty: call update() before keys_values()")
        return self.k_stream.tensor().clone(), self.v_stream.tensor().clone()

    def prefill_key(self) -> Hashable | None:
        """:data:`~refimpl.llm.cache.FULL_PRECISION_PREFILL` for ``order="attend_then_quantize"`` (a prefill
        attends over its own keys and values before quantizing them), ``None`` otherwise."""
        return FULL_PRECISION_PREFILL if self.order == "attend_then_quantize" else None

    def attention_keys_values(self) -> tuple[Tensor, Tensor]:
        """What this step's attention reads: :meth:`keys_values`, except that with
        ``order="attend_then_quantize"`` the tokens the last :meth:`update` quantized are still exact.
        Views of the cache's working buffers, valid until the next :meth:`update`."""
        if self._layout is None:
            raise RuntimeError("the cache is empty: call update() before attention_keys_values()")
        exact = self.order == "attend_then_quantize"
        return self.k_stream.tensor(last_step_exact=exact), self.v_stream.tensor(last_step_exact=exact)

    def attend(self, q: Tensor, q_positions: Tensor, scale: float) -> Tensor:
        """Attention of ``q: (B, H_q, T_new, D)`` over :meth:`attention_keys_values` (in the order ``order``)."""
        k, v = self.attention_keys_values()
        visible = self.key_positions() <= q_positions[:, None]  # (T_q, T_k): causal by position
        # PyTorch's fused attention, as FullCache's: a prefill gives the same numbers as the full cache's.
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=visible, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )

    def key_positions(self) -> Tensor:
        if self._layout is None:
            raise RuntimeError("the cache is empty: call update() before key_positions()")
        return self._pos.view()

    def nbytes(self) -> int:
        return self.k_stream.nbytes() + self.v_stream.nbytes()

    def __len__(self) -> int:
        return len(self._pos)
