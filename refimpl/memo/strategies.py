"""What to do with each layer's activations between forward and backward: four policies, one mechanism.

Every policy is a pair of ``torch.autograd.graph.saved_tensors_hooks`` installed around one layer's forward
call only (and removed when it returns): ``pack`` sees each tensor autograd saves for backward and returns
what the graph stores instead; ``unpack`` gives the backward pass a tensor bit-identical to the one saved.
The autograd graph is always the one the forward pass built, so gradients equal the keep-everything baseline
bit for bit when every unpacked tensor does.

* :class:`KeepAll` - the baseline: the graph holds the tensors.
* :class:`FullRecompute` - activation checkpointing per layer (Chen et al. 2016): keep the layer input, drop
  everything, re-run the layer in the backward pass (restoring the RNG state, as ``torch.utils.checkpoint``
  does) and hand out the recomputed tensors in the order they were saved. Works for any module.
* :class:`FullOffload` - copy every saved storage to the host after the layer's forward pass, fetch it back in
  the backward pass. Works for any module.
* :class:`MemoTokenwise` - MEMO (Zhao et al. 2024): after each layer's forward pass, the activations of the
  first ``alpha`` fraction of the tokens go to the host; the layer input of the other tokens stays on the
  device; in the backward pass the first tokens' activations are fetched and the rest are recomputed from the
  kept input, using the fetched keys and values of the first tokens (causal attention of token ``t`` needs
  the keys and values of tokens ``<= t``). ``alpha = 0`` is full recomputation, ``alpha = 1`` full offload.
  Needs the book's :class:`~refimpl.memo.block.TransformerBlock` (its tape says which axis is tokens).

Device and host: on the CPU both are this machine's memory, and a :class:`~refimpl.memo.ledger.Ledger` is the
budgeted "device": offloaded tensors are copied into separate host storage, the device copy is dropped, and the
ledger counts both sides and the bytes moved. On CUDA the same code uses pinned host buffers, a side stream
and events, so the copies overlap compute, and prefetches the next layer's tensors in the backward pass.
"""

from __future__ import annotations

import math
import time
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from refimpl._checks import check_float, check_tensor
from refimpl.memo.block import Tape, TransformerBlock
from refimpl.memo.ledger import Ledger

__all__ = [
    "FullOffload",
    "FullRecompute",
    "KeepAll",
    "MemoTokenwise",
    "StepResult",
    "Strategy",
    "forward_stack",
    "train_step",
]


def _key(t: torch.Tensor) -> int:
    """A saved tensor's storage: the unit of memory (views of one storage are one allocation)."""
    return t.untyped_storage().data_ptr()


def _nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def _storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 tensor over ``t``'s whole storage."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


@dataclass(frozen=True)
class _Geometry:
    """How a saved tensor views its storage, so it can be rebuilt on a copy of the storage."""

    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype

    @staticmethod
    def of(t: torch.Tensor) -> _Geometry:
        return _Geometry(tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.dtype)

    def on_bytes(self, flat: torch.Tensor) -> torch.Tensor:
        """The view on a flat uint8 copy of the storage."""
        return flat.view(self.dtype).as_strided(self.size, self.stride, self.offset)

    def on_tensor(self, base: torch.Tensor) -> torch.Tensor:
        """The view on a tensor that owns a same-shaped copy of the storage."""
        return base.as_strided(self.size, self.stride, self.offset)


class _HostLink:
    """Copies between the device and the host.

    CUDA: pinned host buffers, one side stream and an event per fetch, so that copies overlap the compute on the
    default stream; ``record_stream`` tells the caching allocator a tensor is in use on the side stream. CPU:
    plain copies into separate storage (nothing to overlap with; the ledger still counts the bytes).
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda" and torch.cuda.is_available()
        self.device = device
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """Start copying ``t`` into a new host buffer; the caller may drop ``t`` afterwards."""
        t = t.detach()  # a copy_ from a tensor that requires grad would put the host buffer in the graph
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=self.cuda)
        if not self.cuda:
            return host.copy_(t)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # t has been written
        with torch.cuda.stream(self.stream):
            host.copy_(t, non_blocking=True)
        t.record_stream(self.stream)  # t's memory is not reused before the copy ends
        return host

    def start_to_device(self, host: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Start copying ``host`` to the device; returns ``(tensor, event)`` for :meth:`wait`."""
        if not self.cuda:
            return host.to(self.device, copy=True), None
        with torch.cuda.stream(self.stream):
            dev = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return dev, event

    def wait(self, pending: tuple[torch.Tensor, Any]) -> torch.Tensor:
        """Make the compute stream wait for a fetch started by :meth:`start_to_device`; return the tensor."""
        dev, event = pending
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            dev.record_stream(stream)
        return dev


class _Handle:
    """What the autograd graph stores in place of a saved activation; tells its layer state when it dies."""

    __slots__ = ("state", "key", "geometry", "tensor", "__weakref__")

    def __init__(self, state: _LayerState, key: Any, geometry: _Geometry | None, tensor: Any = None) -> None:
        self.state, self.key, self.geometry, self.tensor = state, key, geometry, tensor
        state.handle_born(key)

    def __del__(self) -> None:
        try:
            self.state.handle_died(self.key)
        except Exception:  # noqa: BLE001  (interpreter shutdown: nothing left to account)
            pass


class _LayerState:
    """One layer's saved activations during one step: the pack/unpack hooks and the ledger bookkeeping."""

    def __init__(self, layer: nn.Module, x: torch.Tensor, ledger: Ledger, link: _HostLink) -> None:
        self.layer, self.ledger, self.link = layer, ledger, link
        self.params = {_key(p) for p in layer.parameters()} | {_key(b) for b in layer.buffers()}
        self.alive: Counter[Any] = Counter()  # key -> live handles
        self.previous: weakref.ReferenceType[_LayerState] | None = None  # the layer before this one

    def handle_born(self, key: Any) -> None:
        self.alive[key] += 1

    def handle_died(self, key: Any) -> None:
        self.alive[key] -= 1
        if self.alive[key] == 0:
            del self.alive[key]
            self.drop(key)
            if not self.alive:
                self.drop_all()

    # Overridden by each policy.
    def pack(self, t: torch.Tensor) -> Any:
        raise NotImplementedError

    def unpack(self, obj: Any) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, tape: Tape | None) -> None:
        """Called once the layer's forward pass has returned."""

    def drop(self, key: Any) -> None:
        """The last handle of ``key`` died: free what backs it."""

    def drop_all(self) -> None:
        """Every handle died: free anything left (also runs when the graph is freed without a backward)."""

    def prefetch(self) -> None:
        """Start fetching this layer's tensors before its backward pass needs them (CUDA only)."""

    def label(self, tape: Tape | None, tensors: dict[int, torch.Tensor]) -> None:
        if tape is None:
            return
        for key, t in tensors.items():
            entry = tape.lookup(t)
            self.ledger.label(key, entry.name if entry is not None else "unnamed")


class Strategy:
    """A policy for the activations of each layer; subclasses say what a layer's saved tensors become."""

    name = "strategy"

    def __init__(self) -> None:
        self._last: weakref.ReferenceType[_LayerState] | None = None

    def make_state(self, layer: nn.Module, x: torch.Tensor, ledger: Ledger) -> _LayerState:
        raise NotImplementedError

    def begin_step(self) -> None:
        """Forget the previous step's layers (called by :func:`forward_stack`)."""
        self._last = None

    def forward_layer(self, layer: nn.Module, x: torch.Tensor, ledger: Ledger) -> torch.Tensor:
        """Run ``layer(x)`` with this policy's hooks installed for exactly that call."""
        state = self.make_state(layer, x, ledger)
        state.previous = self._last
        tape = Tape() if isinstance(layer, TransformerBlock) else None
        with torch.autograd.graph.saved_tensors_hooks(state.pack, state.unpack):
            out = layer(x, tape=tape) if tape is not None else layer(x)
        state.finish(tape)
        self._last = weakref.ref(state)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# ----------------------------------------------------------------------------------------------------------
# Keep everything


class _KeepState(_LayerState):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.seen: dict[int, torch.Tensor] = {}

    def pack(self, t: torch.Tensor) -> Any:
        if _key(t) in self.params:
            return t
        key = _key(t)
        self.ledger.acquire(key, _nbytes(t))
        self.seen.setdefault(key, t)
        # detach: a saved output would otherwise reference its own grad_fn, a cycle that keeps the graph alive
        return _Handle(self, key, None, t.detach())

    def unpack(self, obj: Any) -> torch.Tensor:
        return obj if isinstance(obj, torch.Tensor) else obj.tensor

    def finish(self, tape: Tape | None) -> None:
        self.label(tape, self.seen)
        self.seen = {}

    def handle_died(self, key: Any) -> None:
        self.ledger.release(key)  # one hold per handle


class KeepAll(Strategy):
    """The baseline: autograd keeps every saved tensor on the device until its backward node has run."""

    name = "keep all"

    def make_state(self, layer: nn.Module, x: torch.Tensor, ledger: Ledger) -> _LayerState:
        return _KeepState(layer, x, ledger, _HostLink(x.device))


# ----------------------------------------------------------------------------------------------------------
# Full recomputation (activation checkpointing)


class _RecomputeState(_LayerState):
    def __init__(self, layer: nn.Module, x: torch.Tensor, ledger: Ledger, link: _HostLink) -> None:
        super().__init__(layer, x, ledger, link)
        # The checkpoint: the layer input stays on the device (detached: the state must not hold the graph).
        self.x: torch.Tensor | None = x.detach()
        self.x_requires_grad = x.requires_grad
        ledger.acquire(_key(x), _nbytes(x))
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(x.device) if link.cuda else None
        self.count = 0  # saved tensors (parameters excluded), in save order
        self.values: dict[int, torch.Tensor] | None = None

    def pack(self, t: torch.Tensor) -> Any:
        if _key(t) in self.params:
            return t
        self.count += 1
        return _Handle(self, self.count - 1, None)  # the tensor itself is dropped

    def unpack(self, obj: Any) -> torch.Tensor:
        if isinstance(obj, torch.Tensor):
            return obj
        if self.values is None:
            self.recompute()
        return self.values[obj.key]

    def finish(self, tape: Tape | None) -> None:
        if self.x is not None and tape is not None:
            self.ledger.label(_key(self.x), "x")
        if self.count == 0:  # nothing saved (no grad): nothing to recompute
            self.drop_all()

    def recompute(self) -> None:
        """Re-run the layer on the kept input, with the forward pass's RNG state, collecting saved tensors."""
        collected: list[torch.Tensor] = []

        def collect(t: torch.Tensor) -> None:
            if _key(t) not in self.params:
                collected.append(t.detach())
            # Returning nothing: the recomputation's own graph is never used, and holding a saved output there
            # would make a reference cycle through its grad_fn that outlives the step.

        devices = [self.x.device] if self.link.cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu_rng)
            if self.cuda_rng is not None:
                torch.cuda.set_rng_state(self.cuda_rng, self.x.device)
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(collect, lambda _: None):
                x = self.x.detach().requires_grad_(self.x_requires_grad)
                self.layer(x)
        if len(collected) != self.count:
            raise RuntimeError(
                f"recomputation saved {len(collected)} tensors but the forward pass saved {self.count}: the layer "
                "must run the same operators when called again"
            )
        self.values = dict(enumerate(collected))
        for i in self.alive:  # only tensors the graph still needs are held
            self.ledger.acquire(_key(self.values[i]), _nbytes(self.values[i]))
        for i in set(self.values) - set(self.alive):
            del self.values[i]
        self.ledger.release(_key(self.x))
        self.x = None

    def drop(self, key: Any) -> None:
        if self.values is not None and key in self.values:
            self.ledger.release(_key(self.values.pop(key)))

    def drop_all(self) -> None:
        if self.x is not None:
            self.ledger.release(_key(self.x))
            self.x = None


class FullRecompute(Strategy):
    """Activation checkpointing of every layer: keep its input, recompute it in the backward pass."""

    name = "full recompute"

    def make_state(self, layer: nn.Module, x: torch.Tensor, ledger: Ledger) -> _LayerState:
        return _RecomputeState(layer, x, ledger, _HostLink(x.device))


# ----------------------------------------------------------------------------------------------------------
# Full offload


def _check_host_room(ledger: Ledger, need: int, what: str) -> None:
    cap = ledger.host_capacity
    if cap is not None and need > cap:
        raise ValueError(f"host_capacity={cap} bytes is smaller than one layer's offload ({what}): {need} bytes")


class _OffloadState(_LayerState):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.src: dict[int, torch.Tensor] = {}  # storage -> a saved view (kept alive until finish)
        self.host: dict[int, torch.Tensor] = {}  # storage -> flat host copy
        self.pending: dict[int, tuple[torch.Tensor, Any]] = {}  # storage -> fetch in flight
        self.dev: dict[int, torch.Tensor] = {}  # storage -> flat device copy in the backward pass
        self.backward_started = False

    def pack(self, t: torch.Tensor) -> Any:
        key = _key(t)
        if key in self.params:
            return t
        if key not in self.src:
            self.src[key] = t
            self.ledger.acquire(key, _nbytes(t))
        return _Handle(self, key, _Geometry.of(t))

    def finish(self, tape: Tape | None) -> None:
        self.label(tape, self.src)
        _check_host_room(self.ledger, sum(_nbytes(t) for t in self.src.values()), "full offload")
        for key, t in self.src.items():
            host = self.link.to_host(_storage_bytes(t))
            self.ledger.acquire(_key(host), host.nbytes, "host")
            self.ledger.bytes_to_host += host.nbytes
            self.host[key] = host
            self.ledger.release(key)
        self.src = {}

    def prefetch(self) -> None:
        if self.link.cuda:
            for key in list(self.host):
                self._start_fetch(key)

    def _start_fetch(self, key: int) -> None:
        host = self.host.pop(key)
        self.pending[key] = self.link.start_to_device(host)
        self.ledger.acquire(("fetch", id(self), key), host.nbytes)
        self.ledger.bytes_to_device += host.nbytes
        self.ledger.release(_key(host), "host")

    def unpack(self, obj: Any) -> torch.Tensor:
        if isinstance(obj, torch.Tensor):
            return obj
        if not self.backward_started:
            self.backward_started = True
            prev = self.previous() if self.previous is not None else None
            if prev is not None:  # the layer whose backward pass runs next
                prev.prefetch()
        key = obj.key
        if key not in self.dev:
            if key not in self.pending:
                self._start_fetch(key)
            self.dev[key] = self.link.wait(self.pending.pop(key))
        return obj.geometry.on_bytes(self.dev[key])

    def drop(self, key: Any) -> None:
        self.dev.pop(key, None)
        self.pending.pop(key, None)
        self.ledger.release(("fetch", id(self), key))
        host = self.host.pop(key, None)
        if host is not None:
            self.ledger.release(_key(host), "host")

    def drop_all(self) -> None:
        for key in list(self.host) + list(self.pending) + list(self.dev):
            self.drop(key)


class FullOffload(Strategy):
    """Swap every saved activation to host memory after the layer's forward pass; fetch it for backward."""

    name = "full offload"

    def make_state(self, layer: nn.Module, x: torch.Tensor, ledger: Ledger) -> _LayerState:
        return _OffloadState(layer, x, ledger, _HostLink(x.device))


# ----------------------------------------------------------------------------------------------------------
# MEMO: token-wise swapping and recomputation


class _MemoState(_LayerState):
    def __init__(self, layer: TransformerBlock, x: torch.Tensor, ledger: Ledger, link: _HostLink, alpha: float):
        super().__init__(layer, x, ledger, link)
        self.s = x.shape[0]
        self.n_tiles = len(layer.tiles(self.s))
        # The split is at a tile boundary, rounded down: t0 = j0 * tile tokens go to the host.
        self.j0 = math.floor(alpha * self.n_tiles + 1e-9)
        self.t0 = min(self.j0 * layer.tile, self.s)
        self.src: dict[int, torch.Tensor] = {}  # storage -> a saved view (kept alive until finish)
        self.name_of: dict[int, tuple[str, int | None]] = {}  # storage -> (name, tile)
        self.host: dict[tuple[str, int | None], torch.Tensor] = {}
        self.pending: dict[tuple[str, int | None], tuple[torch.Tensor, Any]] = {}
        self.x_keep: torch.Tensor | None = None  # layer input of tokens t0: (s - t0, b, h)
        self.full: dict[tuple[str, int | None], torch.Tensor] | None = None

    def pack(self, t: torch.Tensor) -> Any:
        key = _key(t)
        if key in self.params:
            return t
        if key not in self.src:
            self.src[key] = t
            self.ledger.acquire(key, _nbytes(t))
        return _Handle(self, key, _Geometry.of(t))

    def finish(self, tape: Tape | None) -> None:
        if not self.src:
            return
        parts: dict[tuple[str, int | None], torch.Tensor] = {}  # what goes to the host
        for key, t in self.src.items():
            entry = tape.lookup(t)
            if entry is None:
                raise RuntimeError(f"MEMO: a saved tensor of shape {tuple(t.shape)} is not on the block's tape")
            name = (entry.name, entry.tile)
            self.name_of[key] = name
            self.ledger.label(key, entry.name)
            if entry.tile is None:  # x, kt, v: the first t0 tokens along the token axis
                if self.t0 > 0:
                    parts[name] = entry.tensor.narrow(entry.token_dim, 0, self.t0)
            elif entry.tile < self.j0:  # a tile of the first tokens: all of it
                parts[name] = entry.tensor
        _check_host_room(self.ledger, sum(p.numel() * p.element_size() for p in parts.values()), "MEMO")
        for name, part in parts.items():
            host = self.link.to_host(part)
            self.ledger.acquire(_key(host), host.nbytes, "host")
            self.ledger.bytes_to_host += host.nbytes
            self.host[name] = host
        # Free the device copies, then keep the layer input of the tokens that will be recomputed.
        x = tape.entries[("x", None)].tensor.detach()
        for key in self.src:
            if key != _key(x):
                self.ledger.release(key)
        if self.t0 == 0:
            self.x_keep = x
        elif self.t0 < self.s:
            self.x_keep = x[self.t0 :].clone()
        if self.x_keep is not None:
            self.ledger.acquire(_key(self.x_keep), _nbytes(self.x_keep))
            self.ledger.label(_key(self.x_keep), "x_kept")
        self.ledger.release(_key(x))
        self.src = {}

    def prefetch(self) -> None:
        if self.link.cuda:
            for name in list(self.host):
                self._start_fetch(name)

    def _start_fetch(self, name: tuple[str, int | None]) -> None:
        host = self.host.pop(name)
        self.pending[name] = self.link.start_to_device(host)
        self.ledger.acquire(("fetch", id(self), name), host.nbytes)
        self.ledger.bytes_to_device += host.nbytes
        self.ledger.release(_key(host), "host")

    def materialize(self) -> None:
        """Fetch the first tokens' activations, recompute the others' from the kept input, assemble."""
        if self.previous is not None:
            prev = self.previous()
            if prev is not None:
                prev.prefetch()
        for name in list(self.host):
            self._start_fetch(name)
        fetched = {name: self.link.wait(p) for name, p in self.pending.items()}
        block: TransformerBlock = self.layer
        x_prefix = fetched.pop(("x", None), None)
        if self.t0 == 0:
            x_full = self.x_keep
        elif self.t0 == self.s:
            x_full = x_prefix
        else:  # the same values as the forward input, in a storage of the same shape
            x_full = torch.cat([x_prefix, self.x_keep], dim=0)
        full = dict(fetched)
        if self.j0 < self.n_tiles:
            kv = None
            if self.j0 > 0:  # K of the first t0 tokens from K^T: (b a, d, t0) -> (b a, t0, d)
                kv = (full.pop(("kt", None)).transpose(1, 2), full.pop(("v", None)))
            tape = Tape()
            with torch.no_grad():
                block.forward_tiles(x_full, first_tile=self.j0, kv_prefix=kv, tape=tape)
            full.update((name, e.tensor) for name, e in tape.entries.items())
        full[("x", None)] = x_full
        # The fetch buffers and the kept input live on (or not) as parts of ``full``: count them once. Like
        # every strategy here, the ledger counts activations, not the working buffers of one operation.
        for name in self.pending:
            self.ledger.release(("fetch", id(self), name))
        self.pending = {}
        if self.x_keep is not None:
            self.ledger.release(_key(self.x_keep))
            self.x_keep = None
        self.full = {name: full[name] for name in set(self.name_of.values())}
        for t in self.full.values():
            self.ledger.acquire(_key(t), _nbytes(t))

    def unpack(self, obj: Any) -> torch.Tensor:
        if isinstance(obj, torch.Tensor):
            return obj
        if self.full is None:
            self.materialize()
        return obj.geometry.on_tensor(self.full[self.name_of[obj.key]])

    def drop(self, key: Any) -> None:
        if self.full is None:
            return
        t = self.full.pop(self.name_of[key], None)  # one storage per name: its last handle died
        if t is not None:
            self.ledger.release(_key(t))

    def drop_all(self) -> None:
        for name in list(self.host):
            self.ledger.release(_key(self.host.pop(name)), "host")
        for name in list(self.pending):
            self.ledger.release(("fetch", id(self), name))
        self.pending = {}
        if self.x_keep is not None:
            self.ledger.release(_key(self.x_keep))
            self.x_keep = None
        for t in (self.full or {}).values():
            self.ledger.release(_key(t))
        self.full = {} if self.full is not None else None


class MemoTokenwise(Strategy):
    """MEMO's token-wise swapping and recomputation (Zhao et al. 2024) with swap fraction ``alpha``.

    Args:
        alpha: fraction of each layer's tokens whose activations are offloaded to the host, in ``[0, 1]``;
            rounded down to whole tiles of the block (the effective value is ``t0 / s``).
    """

    name = "MEMO"

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.alpha = check_float("alpha", alpha, min_value=0.0, max_value=1.0)

    def make_state(self, layer: nn.Module, x: torch.Tensor, ledger: Ledger) -> _LayerState:
        if not isinstance(layer, TransformerBlock):
            raise TypeError(
                f"MemoTokenwise needs refimpl.memo.TransformerBlock layers (their tape names the token axis), "
                f"got {type(layer).__name__}"
            )
        return _MemoState(layer, x, ledger, _HostLink(x.device), self.alpha)

    def __repr__(self) -> str:
        return f"MemoTokenwise(alpha={self.alpha})"


# ----------------------------------------------------------------------------------------------------------
# Running a stack


def forward_stack(
    layers: nn.ModuleList | list[nn.Module], x: torch.Tensor, strategy: Strategy, ledger: Ledger | None = None
) -> torch.Tensor:
    """Run ``x`` through ``layers`` in order, each under ``strategy``'s hooks; bytes go to ``ledger``.

    Args:
        layers: at least one module mapping a tensor to a tensor of the same kind (e.g. ``(s, b, h)``).
        x: the input of the first layer.
        strategy: a :class:`Strategy` instance.
        ledger: where bytes are counted (a fresh unlimited one if ``None``).
    """
    if len(layers) == 0:
        raise ValueError("layers must hold at least one layer, got an empty model (0 layers)")
    if not isinstance(strategy, Strategy):
        raise TypeError(f"strategy must be a refimpl.memo Strategy, got {type(strategy).__name__}")
    check_tensor("x", x, floating=True)
    ledger = Ledger() if ledger is None else ledger
    strategy.begin_step()
    for layer in layers:
        x = strategy.forward_layer(layer, x, ledger)
    return x


@dataclass
class StepResult:
    """One training step: its output, wall-clock seconds (forward + backward) and the ledger it filled."""

    output: torch.Tensor
    seconds: float
    ledger: Ledger


def train_step(
    layers: nn.ModuleList | list[nn.Module],
    x: torch.Tensor,
    grad_output: torch.Tensor,
    strategy: Strategy,
    ledger: Ledger | None = None,
) -> StepResult:
    """Forward ``x`` through ``layers`` under ``strategy``, then backward with ``grad_output`` (the gradient of
    the loss with respect to the output, same shape). Gradients accumulate in ``.grad`` as usual."""
    ledger = Ledger() if ledger is None else ledger
    start = time.perf_counter()
    out = forward_stack(layers, x, strategy, ledger)
    if grad_output.shape != out.shape:
        raise ValueError(f"grad_output must have the output's shape {tuple(out.shape)}, got {tuple(grad_output.shape)}")
    out.backward(grad_output)
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    return StepResult(out.detach(), time.perf_counter() - start, ledger)
