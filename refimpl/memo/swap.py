"""The machinery under the activation policies of :mod:`refimpl.memo.strategies`: lifetimes and swapping.

A policy is a pair of ``torch.autograd.graph.saved_tensors_hooks`` around one layer's forward call; this module
holds what every policy shares, one job per class:

* :class:`LayerState` - one layer's saved tensors during one step. ``pack`` returns a :class:`Handle` that the
  autograd graph stores in place of a tensor; when the last handle of a storage dies (its backward node ran, or
  the graph was dropped) the state frees what backs it, so the ledger follows what the graph really holds.
* :class:`HostLink` - the copies between device and host. CUDA: pinned host buffers, one side stream and an event
  per fetch, so copies overlap compute; CPU: plain copies into separate storage (the ledger still counts them).
* :class:`SwapSpace` - one layer's tensors on the host: sent after the forward pass, prefetched while the next
  layer's backward pass runs (CUDA), fetched at first use, freed with their last handle. The ledger counts the
  host bytes, the fetch buffers on the device and the bytes moved each way.
* :class:`SwapState` - a :class:`LayerState` that saves each storage once and owns a :class:`SwapSpace`: the
  common part of full offload and MEMO, which differ only in what they send and how they rebuild it.

A tensor's storage is the unit of memory (views of one storage are one allocation), keyed by its data pointer.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from refimpl.memo.block import Tape
from refimpl.memo.ledger import Ledger

__all__ = [
    "Geometry",
    "Handle",
    "HostLink",
    "LayerState",
    "SwapSpace",
    "SwapState",
    "storage_as_bytes",
    "storage_bytes",
    "storage_key",
]


def storage_key(t: torch.Tensor) -> int:
    """The key of ``t``'s storage in the ledger (its data pointer)."""
    return t.untyped_storage().data_ptr()


def storage_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t``'s whole storage."""
    return t.untyped_storage().nbytes()


def storage_as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 tensor over ``t``'s whole storage."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


@dataclass(frozen=True)
class Geometry:
    """How a saved tensor views its storage, so it can be rebuilt on a copy of the storage."""

    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype

    @staticmethod
    def of(t: torch.Tensor) -> Geometry:
        return Geometry(tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.dtype)

    def on_bytes(self, flat: torch.Tensor) -> torch.Tensor:
        """The view on a flat uint8 copy of the storage."""
        return flat.view(self.dtype).as_strided(self.size, self.stride, self.offset)

    def on_tensor(self, base: torch.Tensor) -> torch.Tensor:
        """The view on a tensor that owns a same-shaped copy of the storage."""
        return base.as_strided(self.size, self.stride, self.offset)


class HostLink:
    """Copies between ``device`` and the host (see the module docstring)."""

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
        t.record_stream(self.stream)  # the caching allocator does not reuse t's memory before the copy ends
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


class Handle:
    """What the autograd graph stores in place of a saved activation; tells its layer state when it dies."""

    __slots__ = ("state", "key", "geometry", "tensor", "__weakref__")

    def __init__(self, state: LayerState, key: Any, geometry: Geometry | None, tensor: Any = None) -> None:
        self.state, self.key, self.geometry, self.tensor = state, key, geometry, tensor
        state.handle_born(key)

    def __del__(self) -> None:
        try:
            self.state.handle_died(self.key)
        except Exception:  # noqa: BLE001  (interpreter shutdown: nothing left to account)
            pass


class LayerState:
    """One layer's saved activations during one step: the hooks a policy overrides, and handle lifetimes."""

    def __init__(self, layer: nn.Module, x: torch.Tensor, ledger: Ledger, link: HostLink) -> None:
        self.layer, self.ledger, self.link = layer, ledger, link
        self.params = {storage_key(p) for p in layer.parameters()} | {storage_key(b) for b in layer.buffers()}
        self.alive: Counter[Any] = Counter()  # key -> live handles
        self.previous: weakref.ReferenceType[LayerState] | None = None  # the layer before this one

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

    def prefetch_previous(self) -> None:
        """Called at this layer's first unpack: the layer before it runs its backward pass next."""
        prev = self.previous() if self.previous is not None else None
        if prev is not None:
            prev.prefetch()

    def label(self, tape: Tape | None, tensors: dict[int, torch.Tensor]) -> None:
        """Name each storage in the ledger after its entry on the block's tape."""
        if tape is None:
            return
        for key, t in tensors.items():
            entry = tape.lookup(t)
            self.ledger.label(key, entry.name if entry is not None else "unnamed")


class SwapSpace:
    """One layer's tensors on the host, under keys the policy chooses (see the module docstring)."""

    def __init__(self, ledger: Ledger, link: HostLink) -> None:
        self.ledger, self.link = ledger, link
        self.host: dict[Hashable, torch.Tensor] = {}  # key -> host copy
        self.pending: dict[Hashable, tuple[torch.Tensor, Any]] = {}  # key -> fetch in flight

    def send(self, parts: dict[Hashable, torch.Tensor], what: str, *, free_sources: bool = False) -> None:
        """Copy each part to the host; ``free_sources``: release each key on the device once its copy started.

        Raises ``ValueError`` when the host capacity cannot hold even this one layer's parts.
        """
        need, cap = sum(p.numel() * p.element_size() for p in parts.values()), self.ledger.host_capacity
        if cap is not None and need > cap:
            raise ValueError(f"host_capacity={cap} bytes is smaller than one layer's offload ({what}): {need} bytes")
        for key, part in parts.items():
            host = self.link.to_host(part)
            self.ledger.acquire(storage_key(host), host.nbytes, "host")
            self.ledger.bytes_to_host += host.nbytes
            self.host[key] = host
            if free_sources:
                self.ledger.release(key)

    def _fetch_key(self, key: Hashable) -> tuple[str, int, Hashable]:
        return ("fetch", id(self), key)  # the device buffer of a fetch, in the ledger

    def start_fetch(self, key: Hashable) -> None:
        """Start copying ``key`` back; its device buffer is held in the ledger until :meth:`free`."""
        host = self.host.pop(key)
        self.pending[key] = self.link.start_to_device(host)
        self.ledger.acquire(self._fetch_key(key), host.nbytes)
        self.ledger.bytes_to_device += host.nbytes
        self.ledger.release(storage_key(host), "host")

    def prefetch(self) -> None:
        """On CUDA, start every fetch now, so the copies overlap the backward pass of the layer after."""
        if self.link.cuda:
            for key in list(self.host):
                self.start_fetch(key)

    def fetch(self, key: Hashable) -> torch.Tensor:
        """The device copy of ``key`` (fetched now unless a prefetch started it), ready on the compute stream."""
        if key not in self.pending:
            self.start_fetch(key)
        return self.link.wait(self.pending.pop(key))

    def free(self, key: Hashable) -> None:
        """Release whatever still backs ``key``: a fetch buffer, a host copy."""
        self.pending.pop(key, None)
        self.ledger.release(self._fetch_key(key))
        host = self.host.pop(key, None)
        if host is not None:
            self.ledger.release(storage_key(host), "host")

    def free_all(self) -> None:
        """:meth:`free` every key still on the host or in flight."""
        for key in list(self.host) + list(self.pending):
            self.free(key)


class SwapState(LayerState):
    """A layer whose saved storages may go to the host: ``pack`` keeps each storage once (``src``, until
    :meth:`finish`) and hands out views by :class:`Geometry`; ``swap`` holds what was sent."""

    def __init__(self, layer: nn.Module, x: torch.Tensor, ledger: Ledger, link: HostLink) -> None:
        super().__init__(layer, x, ledger, link)
        self.src: dict[int, torch.Tensor] = {}  # storage -> a saved view (kept alive until finish)
        self.swap = SwapSpace(ledger, link)

    def pack(self, t: torch.Tensor) -> Any:
        key = storage_key(t)
        if key in self.params:
            return t
        if key not in self.src:
            self.src[key] = t
            self.ledger.acquire(key, storage_bytes(t))
        return Handle(self, key, Geometry.of(t))

    def prefetch(self) -> None:
        self.swap.prefetch()
