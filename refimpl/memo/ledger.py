"""Activation accounting: a byte ledger for "device" and "host", and the closed forms it is checked against.

Where activation memory comes from (Korthikanti et al. 2022, sec. 4.1): during the forward pass autograd keeps,
for every operator, the inputs (or outputs) its backward formula needs. For a GPT layer of sequence length ``s``,
micro-batch ``b``, hidden size ``h`` and ``a`` heads, with ``e``-byte activations and ``m``-byte dropout masks,
those saved tensors are (names as in :data:`refimpl.memo.block.ACTIVATION_NAMES`)::

    LayerNorm 1   x                      e s b h
    QKV           ln1_out                e s b h
    Q K^T         q, kt                  2 e s b h
    softmax       p                      e a s^2 b
    dropout       p_mask                 m a s^2 b
    P V           p_drop, v              e a s^2 b + e s b h
    out proj      ctx                    e s b h
    dropout       attn_mask              m s b h
    LayerNorm 2   ln2_in                 e s b h
    FC1           ln2_out                e s b h
    GeLU          fc1_out                e s b f
    FC2           gelu_out               e s b f
    dropout       mlp_mask               m s b h

With ``f = 4h``, ``e = 2`` (16-bit) and ``m = 1`` the total is the paper's ``s b h (34 + 5 a s / h)`` bytes. The
LayerNorms also save a per-token mean and 1/std (``4`` tensors of ``s b`` elements, in the input dtype on the
CPU, float32 on CUDA for 16-bit inputs); the paper omits them, :func:`block_activation_bytes` counts them.
With FlashAttention the three ``s^2`` tensors are never stored (the kernel recomputes them), leaving ``34 s b h``.

:class:`Ledger` is the "device" of this chapter on the CPU: strategies acquire and release bytes on it (for the
device and for the host) as activations are saved, offloaded, fetched, recomputed and freed, so peak memory and
traffic are counted exactly, with optional capacities that raise like an out-of-memory error.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import NamedTuple

from refimpl._checks import check_choice, check_int, check_positive_int

__all__ = [
    "WHERE",
    "KORTHIKANTI_TERMS",
    "Account",
    "Ledger",
    "OutOfMemoryError",
    "block_activation_bytes",
    "korthikanti_activation_bytes",
]

WHERE = ("device", "host")

# Which term of Korthikanti et al. (2022, sec. 4.1) each saved tensor is, in the paper's 16-bit units.
KORTHIKANTI_TERMS: dict[str, str] = {
    "x": "LayerNorm 1 input: 2sbh",
    "ln1_mean": "(not counted)",
    "ln1_rstd": "(not counted)",
    "ln1_out": "QKV input: 2sbh",
    "q": "QK^T inputs: 4sbh (with kt)",
    "kt": "QK^T inputs: 4sbh (with q)",
    "p": "softmax output: 2as^2b",
    "p_mask": "softmax dropout mask: as^2b",
    "p_drop": "attention over V: 2as^2b (with v: 2sbh)",
    "v": "attention over V: 2sbh",
    "ctx": "output projection input: 2sbh",
    "attn_mask": "attention dropout mask: sbh",
    "ln2_in": "LayerNorm 2 input: 2sbh",
    "ln2_mean": "(not counted)",
    "ln2_rstd": "(not counted)",
    "ln2_out": "FC1 input: 2sbh",
    "fc1_out": "GeLU input: 8sbh",
    "gelu_out": "FC2 input: 8sbh",
    "mlp_mask": "MLP dropout mask: sbh",
}


def korthikanti_activation_bytes(s: int, b: int, h: int, a: int, *, flash_attention: bool = False) -> int:
    """Bytes one GPT layer saves for backward, Korthikanti et al. (2022) eq. (1): ``s b h (34 + 5 a s / h)``.

    Assumptions of the formula: 16-bit activations, 1-byte dropout masks, a ``4h`` MLP, no sequence or tensor
    parallelism. With ``flash_attention=True`` the ``5 a s^2 b`` term (softmax output, its dropout mask and the
    dropout output) is dropped: the fused kernel recomputes it in the backward pass.
    """
    s, b, h, a = (check_positive_int(n, v) for n, v in (("s", s), ("b", b), ("h", h), ("a", a)))
    return 34 * s * b * h + (0 if flash_attention else 5 * a * s * s * b)


def block_activation_bytes(
    s: int,
    b: int,
    h: int,
    a: int,
    *,
    ffn_hidden: int | None = None,
    dropout: bool = True,
    act_bytes: int = 2,
    mask_bytes: int = 1,
    stat_bytes: int | None = None,
) -> dict[str, int]:
    """Exact bytes saved for backward by one :class:`~refimpl.memo.block.TransformerBlock`, by tensor name.

    ``s, b, h, a``: sequence length, micro-batch, hidden size, heads. ``ffn_hidden``: MLP width ``f`` (default
    ``4 h``). ``dropout``: whether the block has dropout (``p > 0``); without it there are no masks and the softmax
    output is the input of ``P V`` (one tensor instead of two). ``act_bytes``: ``e``, bytes per activation element
    (4 for float32, 2 for bfloat16/float16). ``mask_bytes``: ``m``, bytes per dropout-mask element (1:
    ``torch.bool``). ``stat_bytes``: bytes per LayerNorm mean/rstd element (default ``act_bytes``: what PyTorch
    keeps on the CPU).

    Returns ``{name: bytes}`` for the names of :data:`~refimpl.memo.block.ACTIVATION_NAMES` present. The sum without
    the four ``*_mean``/``*_rstd`` entries, at ``e = 2, m = 1, f = 4h``, equals
    :func:`korthikanti_activation_bytes`.
    """
    s, b, h, a = (check_positive_int(n, v) for n, v in (("s", s), ("b", b), ("h", h), ("a", a)))
    f = check_positive_int("ffn_hidden", 4 * h if ffn_hidden is None else ffn_hidden)
    e = check_positive_int("act_bytes", act_bytes)
    m = check_positive_int("mask_bytes", mask_bytes)
    st = check_positive_int("stat_bytes", e if stat_bytes is None else stat_bytes)
    sbh, sb, ass_b = s * b * h, s * b, a * s * s * b
    out = {
        "x": e * sbh,
        "ln1_mean": st * sb,
        "ln1_rstd": st * sb,
        "ln1_out": e * sbh,
        "q": e * sbh,
        "kt": e * sbh,
        "p": e * ass_b,
        "p_mask": m * ass_b,
        "p_drop": e * ass_b,
        "v": e * sbh,
        "ctx": e * sbh,
        "attn_mask": m * sbh,
        "ln2_in": e * sbh,
        "ln2_mean": st * sb,
        "ln2_rstd": st * sb,
        "ln2_out": e * sbh,
        "fc1_out": e * s * b * f,
        "gelu_out": e * s * b * f,
        "mlp_mask": m * sbh,
    }
    if not dropout:
        for name in ("p_mask", "p_drop", "attn_mask", "mlp_mask"):
            del out[name]
    return out


class OutOfMemoryError(RuntimeError):
    """A ledger capacity (device or host) would be exceeded."""


class Account(NamedTuple):
    """One memory of a :class:`Ledger` ("device" or "host") as it stood when read (a snapshot): ``live`` bytes
    held, the ``peak`` bytes held since the ledger's construction or :meth:`Ledger.reset_peaks`, and the
    ``capacity`` it may hold (``None``: unlimited)."""

    live: int
    peak: int
    capacity: int | None


@dataclass
class Ledger:
    """Bytes held on the "device" and the "host", acquired and released by key (a storage, a host buffer).

    Attributes read by the chapter: :attr:`device` and :attr:`host` (each an :class:`Account`: ``live`` and
    ``peak`` bytes, ``capacity``), ``bytes_to_host`` and ``bytes_to_device`` (traffic over the host link),
    ``by_name`` (device bytes first acquired per activation name, after :meth:`label`), ``timeline`` (``(device
    bytes, host bytes)`` held after every change).

    ``device_capacity``: bytes the device may hold (``None``: unlimited); exceeding it raises
    :class:`OutOfMemoryError`, as a GPU allocation would. ``host_capacity``: the same for host memory (pinned
    buffers for offloaded activations).
    """

    device_capacity: int | None = None
    host_capacity: int | None = None
    bytes_to_host: int = 0
    bytes_to_device: int = 0
    by_name: dict[str, int] = field(default_factory=dict)
    timeline: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("device_capacity", "host_capacity"):
            value = getattr(self, name)
            if value is not None:
                check_int(name, value, min_value=0)
        self._capacity = {"device": self.device_capacity, "host": self.host_capacity}
        self._live = dict.fromkeys(WHERE, 0)  # where -> bytes held now
        self._peak = dict.fromkeys(WHERE, 0)  # where -> the most bytes held since the last reset_peaks()
        self._held: dict[tuple[str, Hashable], list[int]] = {}  # (where, key) -> [bytes, holders]

    # -- queries --------------------------------------------------------------------------------------------
    def account(self, where: str) -> Account:
        """The bytes held on ``where`` ("device" or "host"): live, peak and capacity, as of now."""
        check_choice("where", where, WHERE)
        return Account(self._live[where], self._peak[where], self._capacity[where])

    @property
    def device(self) -> Account:
        """The device's account: ``ledger.device.live``, ``ledger.device.peak``, ``ledger.device.capacity``."""
        return self.account("device")

    @property
    def host(self) -> Account:
        """The host's account (offloaded activations): ``ledger.host.live``, ``.peak``, ``.capacity``."""
        return self.account("host")

    def holds(self, key: Hashable, where: str = "device") -> bool:
        """Whether ``key`` is held on ``where``."""
        return (where, key) in self._held

    # -- updates --------------------------------------------------------------------------------------------
    def acquire(self, key: Hashable, nbytes: int, where: str = "device") -> None:
        """Hold ``nbytes`` on ``where`` under ``key``.

        Keys are reference-counted: a key already held (one storage saved by two operators, or by two layers) is
        counted once and freed by the last matching :meth:`release`.
        """
        if where not in self._live:  # the hot path: validate without building messages
            check_choice("where", where, WHERE)
        if not isinstance(nbytes, int) or nbytes < 0:
            nbytes = check_int("nbytes", nbytes, min_value=0)
        held = self._held.get((where, key))
        if held is not None:
            held[1] += 1
            return
        live, capacity = self._live[where] + nbytes, self._capacity[where]
        if capacity is not None and live > capacity:
            raise OutOfMemoryError(
                f"{where} capacity exceeded: holding {self._live[where]} bytes, {nbytes} more requested, "
                f"{where}_capacity={capacity} bytes"
            )
        self._held[(where, key)] = [nbytes, 1]
        self._live[where] = live
        self._peak[where] = max(self._peak[where], live)
        self.timeline.append((self._live["device"], self._live["host"]))

    def release(self, key: Hashable, where: str = "device") -> None:
        """Drop one hold of ``key`` on ``where``; the bytes are freed with the last hold (no-op if not held)."""
        held = self._held.get((where, key))
        if held is None:
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del self._held[(where, key)]
        self._live[where] -= held[0]
        self.timeline.append((self._live["device"], self._live["host"]))

    def label(self, key: Hashable, name: str) -> None:
        """Attribute the device bytes held under ``key`` to the activation ``name`` (for :attr:`by_name`)."""
        held = self._held.get(("device", key))
        if held is not None:
            self.by_name[name] = self.by_name.get(name, 0) + held[0]

    def reset_peaks(self) -> None:
        """Set the peaks to the current holdings and clear traffic counters, names and timeline."""
        self._peak = dict(self._live)
        self.bytes_to_host = self.bytes_to_device = 0
        self.by_name = {}
        self.timeline = [(self._live["device"], self._live["host"])]
