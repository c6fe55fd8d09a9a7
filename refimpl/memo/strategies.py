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
ledger counts both sides and the bytes moved. The machinery (handle lifetimes, the host link with its CUDA
streams, the swap space that full offload and MEMO share) is in :mod:`refimpl.memo.swap`; this module holds
the policies.
"""

from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from refimpl._checks import check_float, check_tensor
from refimpl.memo.block import Tape, TransformerBlock
from refimpl.memo.ledger import Ledger
from refimpl.memo.swap import Handle, HostLink, LayerState, SwapState, storage_as_bytes, storage_bytes, storage_key

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


class Strategy:
    """A policy for the activations of each layer; subclasses say what a layer's saved tensors become."""

    name = "strategy"

    def __init__(self) -> None:
        self._last: weakref.ReferenceType[LayerState] | None = None

    def make_state(self, layer: nn.Module, x: torch.Tensor, ledger: Ledger) -> LayerState:
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


class _KeepState(LayerState):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.seen: dict[int, torch.Tensor] = {}

    def pack(self, t: torch.Tensor) -> Any:
        if storage_key(t) in self.params:
            return t
        key = storage_key(t)
        self.ledger.acquire(key, storage_bytes(t))
        self.seen.setdefault(key, t)
        # detach: a saved output would otherwise reference its own grad_fn, a cycle that keeps the graph alive
        return Handle(self, key, None, t.detach())

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

    def make_state(self, layer: nn.Module, x: torch.Tensor, ledger: Ledger) -> LayerState:
        return _KeepState(layer, x, ledger, HostLink(x.device))


# ----------------------------------------------------------------------------------------------------------
# Full recomputation (activation checkpointing)


class _RecomputeState(LayerState):
    def __init__(self, layer: nn.Module, x: torch.Tensor, ledger: Ledger, link: HostLink) -> None:
        super().__init__(layer, x, ledger, link)
        # The checkpoint: the layer input stays on the device (detached: the state must not hold the graph).
        self.x: torch.Tensor | None = x.detach()
        self.x_requires_grad = x.requires_grad
        ledger.acquire(storage_key(x), storage_bytes(x))
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(x.device) if link.cuda else None
        self.count = 0  # saved tensors (parameters excluded), in save order
        self.values: dict[int, torch.Tensor] | None = None

    def pack(self, t: torch.Tensor) -> Any:
        if storage_key(t) in self.params:
            return t
        self.count += 1
        return Handle(self, self.count - 1, None)  # the tensor itself is dropped

    def unpack(self, obj: Any) -> torch.Tensor:
        if isinstance(obj, torch.Tensor):
            return obj
        if self.values is None:
            self.recompute()
        return self.values[obj.key]

    def finish(self, tape: Tape | None) -> None:
        if self.x is not None and tape is not None:
            self.ledger.label(storage_key(self.x), "x")
        if self.count == 0:  # nothing saved (no grad): nothing to recompute
            self.drop_all()

    def recompute(self) -> None:
        """Re-run the layer on the kept input, with the forward pass's RNG state, collecting saved tensors."""
        collected: list[torch.Tensor] = []

        def collect(t: torch.Tensor) -> None:
            if storage_key(t) not in self.params:
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
            self.ledger.acquire(storage_key(self.values[i]), storage_bytes(self.values[i]))
        for i in set(self.values) - set(self.alive):
            del self.values[i]
        self.ledger.release(storage_key(self.x))
        self.x = None

    def drop(self, key: Any) -> None:
        if self.values is not None and key in self.values:
            self.ledger.release(storage_key(self.values.pop(key)))

    def drop_all(self) -> None:
        if self.x is not None:
            self.ledger.release(storage_key(self.x))
            self.x = None


class FullRecompute(Strategy):
    """Activation checkpointing of every layer: keep its input, recompute it in the backward pass."""

    name = "full recompute"

    def make_state(self, layer: nn.Module, x: torch.Tensor, ledger: Ledger) -> LayerState:
        return _RecomputeState(layer, x, ledger, HostLink(x.device))


# ----------------------------------------------------------------------------------------------------------
# Full offload


class _OffloadState(SwapState):
    """Every saved storage goes to the host after the forward pass, and comes back whole at first use."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.dev: dict[int, torch.Tensor] = {}  # storage -> flat device copy in the backward pass
        self.backward_started = False

    def finish(self, tape: Tape | None) -> None:
        self.label(tape, self.src)
        self.swap.send({key: storage_as_bytes(t) for key, t in self.src.items()}, "full offload", free_sources=True)
        self.src = {}

    def unpack(self, obj: Any) -> torch.Tensor:
        if isinstance(obj, torch.Tensor):
            return obj
        if not self.backward_started:
            self.backward_started = True
            self.prefetch_previous()
        if obj.key not in self.dev:
            self.dev[obj.key] = self.swap.fetch(obj.key)
        return obj.geometry.on_bytes(self.dev[obj.key])

    def drop(self, key: Any) -> None:
        self.dev.pop(key, None)
        self.swap.free(key)

    def drop_all(self) -> None:
        for key in list(self.swap.host) + list(self.swap.pending) + list(self.dev):
            self.drop(key)


class FullOffload(Strategy):
    """Swap every saved activation to host memory after the layer's forward pass; fetch it for backward."""

    name = "full offload"

    def make_state(self, layer: nn.Module, x: torch.Tensor, ledger: Ledger) -> LayerState:
        return _OffloadState(layer, x, ledger, HostLink(x.device))


# ----------------------------------------------------------------------------------------------------------
# MEMO: token-wise swapping and recomputation


class _MemoState(SwapState):
    """MEMO for one layer (Zhao et al. 2024, sec. 3.1): tokens ``< t0`` swapped, tokens ``>= t0`` recomputed."""

    def __init__(self, layer: TransformerBlock, x: torch.Tensor, ledger: Ledger, link: HostLink, alpha: float):
        super().__init__(layer, x, ledger, link)
        self.s, self.n_tiles = x.shape[0], len(layer.tiles(x.shape[0]))
        # The split is at a tile boundary, rounded down: t0 = j0 * tile tokens go to the host.
        self.j0 = math.floor(alpha * self.n_tiles + 1e-9)
        self.t0 = min(self.j0 * layer.tile, self.s)
        self.name_of: dict[int, tuple[str, int | None]] = {}  # storage -> (name, tile) on the block's tape
        self.x_keep: torch.Tensor | None = None  # layer input of tokens t0..: (s - t0, b, h)
        self.full: dict[tuple[str, int | None], torch.Tensor] | None = None  # rebuilt for the backward pass

    def finish(self, tape: Tape | None) -> None:
        """Send the first ``t0`` tokens' activations to the host; keep only the others' layer input."""
        if not self.src:
            return
        parts: dict[tuple[str, int | None], torch.Tensor] = {}  # what goes to the host
        for key, t in self.src.items():
            entry = tape.lookup(t)
            if entry is None:
                raise RuntimeError(f"MEMO: a saved tensor of shape {tuple(t.shape)} is not on the block's tape")
            self.name_of[key] = name = (entry.name, entry.tile)
            self.ledger.label(key, entry.name)
            if entry.tile is None and self.t0 > 0:  # x, kt, v: the first t0 tokens along the token axis
                parts[name] = entry.tensor.narrow(entry.token_dim, 0, self.t0)
            elif entry.tile is not None and entry.tile < self.j0:  # a tile of the first tokens: all of it
                parts[name] = entry.tensor
        self.swap.send(parts, "MEMO")
        # Free the device copies, then keep the layer input of the tokens that will be recomputed.
        x = tape.entries[("x", None)].tensor.detach()
        for key in self.src:
            if key != storage_key(x):
                self.ledger.release(key)
        if self.t0 == 0:
            self.x_keep = x
        elif self.t0 < self.s:
            self.x_keep = x[self.t0 :].clone()
        if self.x_keep is not None:
            self.ledger.acquire(storage_key(self.x_keep), storage_bytes(self.x_keep))
            self.ledger.label(storage_key(self.x_keep), "x_kept")
        self.ledger.release(storage_key(x))
        self.src = {}

    def materialize(self) -> None:
        """Fetch the first tokens' activations, recompute the others' from the kept input, assemble."""
        self.prefetch_previous()
        names = list(self.swap.pending) + list(self.swap.host)
        full = {name: self.swap.fetch(name) for name in names}
        x_prefix = full.pop(("x", None), None)
        parts = [t for t in (x_prefix, self.x_keep) if t is not None]
        # the same values as the forward input, in a storage of the same shape
        x_full = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if self.j0 < self.n_tiles:
            kv = None
            if self.j0 > 0:  # K of the first t0 tokens from K^T: (b a, d, t0) -> (b a, t0, d)
                kv = (full.pop(("kt", None)).transpose(1, 2), full.pop(("v", None)))
            tape = Tape()
            with torch.no_grad():
                self.layer.forward_tiles(x_full, first_tile=self.j0, kv_prefix=kv, tape=tape)
            full.update((name, e.tensor) for name, e in tape.entries.items())
        full[("x", None)] = x_full
        # The fetch buffers and the kept input live on (or not) as parts of ``full``: count them once. Like
        # every strategy here, the ledger counts activations, not the working buffers of one operation.
        for name in names:
            self.swap.free(name)
        self._release_kept_input()
        self.full = {name: full[name] for name in set(self.name_of.values())}
        for t in self.full.values():
            self.ledger.acquire(storage_key(t), storage_bytes(t))

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
            self.ledger.release(storage_key(t))

    def drop_all(self) -> None:
        self.swap.free_all()
        self._release_kept_input()
        for t in (self.full or {}).values():
            self.ledger.release(storage_key(t))
        self.full = {} if self.full is not None else None

    def _release_kept_input(self) -> None:
        if self.x_keep is not None:
            self.ledger.release(storage_key(self.x_keep))
            self.x_keep = None


class MemoTokenwise(Strategy):
    """MEMO's token-wise swapping and recomputation (Zhao et al. 2024) with swap fraction ``alpha``.

    ``alpha``: fraction of each layer's tokens whose activations are offloaded to the host, in ``[0, 1]``; rounded
    down to whole tiles of the block (the effective value is ``t0 / s``).
    """

    name = "MEMO"

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.alpha = check_float("alpha", alpha, min_value=0.0, max_value=1.0)

    def make_state(self, layer: nn.Module, x: torch.Tensor, ledger: Ledger) -> LayerState:
        if not isinstance(layer, TransformerBlock):
            raise TypeError(
                f"MemoTokenwise needs refimpl.memo.TransformerBlock layers (their tape names the token axis), "
                f"got {type(layer).__name__}"
            )
        return _MemoState(layer, x, ledger, HostLink(x.device), self.alpha)

    def __repr__(self) -> str:
        return f"MemoTokenwise(alpha={self.alpha})"


# ----------------------------------------------------------------------------------------------------------
# Running a stack


def forward_stack(
    layers: nn.ModuleList | list[nn.Module], x: torch.Tensor, strategy: Strategy, ledger: Ledger | None = None
) -> torch.Tensor:
    """Run ``x`` through ``layers`` in order, each under ``strategy``'s hooks; bytes go to ``ledger``.

    ``layers``: at least one module mapping a tensor to a tensor of the same kind (e.g. ``(s, b, h)``). ``x``: the
    input of the first layer. ``strategy``: a :class:`Strategy` instance. ``ledger``: where bytes are counted (a
    fresh unlimited one if ``None``).
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
