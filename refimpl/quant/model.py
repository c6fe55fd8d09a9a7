"""Quantizing the book's LLM: weight transforms, activation-quantized linears, calibration, rotation folding.

Every decoder block of :class:`refimpl.llm.Llama` multiplies four activations by four weights stored
``(in, out)``: ``h @ wqkv``, ``o @ wo``, ``h @ w_gate_up`` and ``a @ w_down`` (:data:`LINEARS`). This module
builds *new* models from an existing one (the original is never modified):

* :func:`map_weights` replaces each of those weights, e.g. by its fake-quantized copy (weight-only W4/W8);
* :func:`quantize_activations` makes every linear quantize its *input* first (W8A8): the weight becomes a
  :class:`QuantLinear`, whose ``x @ layer`` applies an optional online rotation, then the activation quantizer;
* :func:`collect_inputs` records what each linear reads on calibration text (for GPTQ's Hessian and
  SmoothQuant's statistics); :func:`smooth` migrates activation scale into the weights (SmoothQuant, eq. 4);
* :func:`rotate` folds a Hadamard rotation of the residual stream into the adjacent weights (QuaRot sec. 4):
  the float model computes the same function, but every linear now reads rotated activations.

The rotated model needs an embedding apart from the output head (the final norm and the rotation are folded
into the head, not into the embedding): :class:`UntiedLlama`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from refimpl._checks import check_float, check_int, check_tensor
from refimpl.llm.config import LlamaConfig
from refimpl.llm.matvec import matvec
from refimpl.llm.model import Llama
from refimpl.quant.hadamard import RandomizedHadamard
from refimpl.quant.outliers import smoothquant_scales

__all__ = [
    "LINEARS",
    "QuantLinear",
    "UntiedLlama",
    "collect_inputs",
    "linear_weight",
    "map_weights",
    "quantize_activations",
    "rotate",
    "smooth",
]

#: The four matrix products of a block, by buffer name (:class:`refimpl.llm.model.Block`).
LINEARS = ("wqkv", "wo", "w_gate_up", "w_down")
_NORMS = ("attn_norm", "ffn_norm")

ActQuant = Callable[[Tensor], Tensor]


@dataclass
class QuantLinear:
    """A linear layer ``W: (in, out)`` that transforms its input before the product: ``x @ layer`` is
    ``act_quant(input_rotation(x)) @ weight`` (either step optional). Used in place of a block's weight buffer;
    with ``record=True``, ``inputs`` keeps what it reads (``(tokens, in)`` rows, for :func:`collect_inputs`)."""

    weight: Tensor
    act_quant: ActQuant | None = None
    input_rotation: Callable[[Tensor], Tensor] | None = None
    record: bool = False
    inputs: list[Tensor] = field(default_factory=list)

    def __rmatmul__(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])  # (tokens, in)
        if self.input_rotation is not None:
            x2 = self.input_rotation(x2)
        if self.record:
            self.inputs.append(x2.detach().clone())
        if self.act_quant is not None:
            x2 = self.act_quant(x2)
        return matvec(x2, self.weight).reshape(*lead, self.weight.shape[1])  # x2 @ W, as the model's products


class UntiedLlama(Llama):
    """:class:`~refimpl.llm.model.Llama` with the token embedding ``E: (V, d)`` stored apart from the head."""

    def __init__(
        self, config: LlamaConfig, embedding: Tensor, head: Tensor, norm: Tensor, blocks: Sequence[dict[str, Tensor]]
    ) -> None:
        super().__init__(config, head, norm, blocks)
        self.register_buffer("embedding", embedding)  # (V, d)

    @property
    def embed(self) -> Tensor:
        return self.embedding


def _weight_of(w: Tensor | QuantLinear) -> Tensor:
    return w.weight if isinstance(w, QuantLinear) else w


def linear_weight(model: Llama, layer: int, name: str) -> Tensor:
    """The ``(in, out)`` weight of linear ``name`` (:data:`LINEARS`) in block ``layer``."""
    return _weight_of(getattr(model.blocks[layer], name))


def _parts(model: Llama) -> list[dict[str, Tensor | QuantLinear]]:
    return [{n: getattr(b, n) for n in (*_NORMS, *LINEARS)} for b in model.blocks]


def _build(
    model: Llama,
    blocks: list[dict[str, Tensor | QuantLinear]],
    head: Tensor | None = None,
    norm: Tensor | None = None,
    embedding: Tensor | None = None,
) -> UntiedLlama:
    """A new model with the given block parts (tensors or :class:`QuantLinear`), other parts from ``model``."""
    plain = [{n: _weight_of(v) for n, v in b.items()} for b in blocks]
    new = UntiedLlama(
        model.config,
        model.embed if embedding is None else embedding,
        model.head if head is None else head,
        model.norm if norm is None else norm,
        plain,
    )
    for block, parts in zip(new.blocks, blocks):
        for n, v in parts.items():
            if isinstance(v, QuantLinear):
                del block._buffers[n]  # a QuantLinear is not a tensor: a plain attribute instead of a buffer
                object.__setattr__(block, n, v)
    return new.eval()


def map_weights(model: Llama, fn: Callable[[int, str, Tensor], Tensor]) -> UntiedLlama:
    """A new model whose block linears are ``fn(layer, name, W)`` (``W: (in, out)``, same shape returned)."""
    blocks = _parts(model)
    for i, parts in enumerate(blocks):
        for n in LINEARS:
            w = parts[n]
            new_w = fn(i, n, _weight_of(w))
            check_tensor(f"fn({i}, {n!r}, W)", new_w, ndim=2, floating=True)
            if new_w.shape != _weight_of(w).shape:
                raise ValueError(f"fn must keep the shape of {n} in layer {i}, got {tuple(new_w.shape)}")
            parts[n] = QuantLinear(new_w, w.act_quant, w.input_rotation) if isinstance(w, QuantLinear) else new_w
    return _build(model, blocks)


def quantize_activations(model: Llama, act_quant: ActQuant, names: Iterable[str] = LINEARS) -> UntiedLlama:
    """A new model whose linears ``names`` quantize their input with ``act_quant((tokens, in))`` (W?A8)."""
    names = tuple(names)
    for n in names:
        if n not in LINEARS:
            raise ValueError(f"names must be among {LINEARS}, got {n!r}")
    blocks = _parts(model)
    for parts in blocks:
        for n in names:
            w = parts[n]
            rot = w.input_rotation if isinstance(w, QuantLinear) else None
            parts[n] = QuantLinear(_weight_of(w), act_quant, rot)
    return _build(model, blocks)


@torch.inference_mode()
def collect_inputs(model: Llama, ids: Tensor) -> list[dict[str, Tensor]]:
    """The input each linear reads on ``ids: (B, T)``: per block, ``name -> (B T, in)`` (after any online
    rotation, before any activation quantization). One forward pass without a cache."""
    check_tensor("ids", ids, ndim=2, dtypes=[torch.int64, torch.int32])
    blocks = _parts(model)
    for parts in blocks:
        for n in LINEARS:
            w = parts[n]
            rot = w.input_rotation if isinstance(w, QuantLinear) else None
            parts[n] = QuantLinear(_weight_of(w), None, rot, record=True)
    recorder = _build(model, blocks)
    recorder.hidden(ids)
    return [{n: torch.cat(parts[n].inputs) for n in LINEARS} for parts in blocks]


def _fold_norms(model: Llama) -> tuple[list[dict], Tensor]:
    """Fold each RMSNorm weight into the linear that reads it: ``RMSNorm(x; g) W = RMSNorm(x; 1) diag(g) W``."""
    blocks = _parts(model)
    for parts in blocks:
        for norm, lin in (("attn_norm", "wqkv"), ("ffn_norm", "w_gate_up")):
            g = parts[norm]
            parts[lin] = g[:, None] * _weight_of(parts[lin])  # diag(g) W
            parts[norm] = torch.ones_like(g)
    head = model.norm[:, None] * model.head  # diag(g) E^T
    return blocks, head


@torch.inference_mode()
def smooth(model: Llama, inputs: list[dict[str, Tensor]], alpha: float = 0.5) -> UntiedLlama:
    """SmoothQuant (Xiao et al. 2023, eq. 4) on the two normed inputs of each block (QKV and gate/up): channel
    ``j`` of the input is divided by ``s_j`` (folded into the RMSNorm weight) and row ``j`` of the weight
    multiplied by it. ``inputs``: :func:`collect_inputs` of the same model (calibration activations)."""
    alpha = check_float("alpha", alpha, min_value=0.0, max_value=1.0)
    if len(inputs) != model.config.n_layers:
        raise ValueError(f"inputs must hold one entry per layer ({model.config.n_layers}), got {len(inputs)}")
    blocks = _parts(model)
    for parts, seen in zip(blocks, inputs):
        for norm, lin in (("attn_norm", "wqkv"), ("ffn_norm", "w_gate_up")):
            w = _weight_of(parts[lin])
            s = smoothquant_scales(seen[lin].abs().amax(0), w.abs().amax(1), alpha)  # (d,)
            parts[norm] = parts[norm] / s  # X diag(s)^-1, folded into RMSNorm's weight
            parts[lin] = s[:, None] * w  # diag(s) W
    return _build(model, blocks)


@torch.inference_mode()
def rotate(model: Llama, seed: int = 0, online_down: bool = True) -> UntiedLlama:
    """Fold Hadamard rotations into the weights (QuaRot, Ashkboos et al. 2024, sec. 4); same function.

    * the residual stream is rotated by ``Q = D (I (x) H_b)`` (:class:`RandomizedHadamard`, width ``d``):
      norms folded first (RMSNorm commutes with an orthogonal ``Q`` once its weight is 1), then
      ``E <- E Q``, ``W_in <- Q^T W_in`` for QKV and gate/up and the head, ``W_out <- W_out Q`` for ``wo`` and
      ``w_down``;
    * each value head is rotated by ``H_D`` (``W_v <- W_v H_D`` per head, ``W_o <- H_D^T W_o`` per head):
      attention mixes value rows linearly, so its output is rotated the same way;
    * ``online_down``: the input of ``w_down`` (width ``F``) is rotated at run time by ``Q_F``
      (:class:`QuantLinear` ``input_rotation``) and ``W_down <- Q_F^T W_down``.
    """
    seed = check_int("seed", seed, min_value=0)
    c = model.config
    dt = model.head.dtype
    # Folding multiplies by the explicit matrices (one BLAS product beats the butterflies for whole weights);
    # the online rotation, applied to activations at run time, is the fast transform.
    q = RandomizedHadamard(c.d_model, seed).matrix(dt)  # (d, d)
    hv = RandomizedHadamard(c.head_dim, seed + 1, block=c.head_dim).matrix(dt)  # (D, D)
    qd = RandomizedHadamard(c.ffn_dim, seed + 2)
    qd_t = qd.matrix(dt).t()  # Q_F^T
    blocks, head = _fold_norms(model)
    for parts in blocks:
        wqkv = q.t() @ _weight_of(parts["wqkv"])  # Q^T W
        v = wqkv[:, c.q_dim + c.kv_dim :].reshape(c.d_model, c.n_kv_heads, c.head_dim)
        wqkv[:, c.q_dim + c.kv_dim :] = (v @ hv).reshape(c.d_model, c.kv_dim)  # W_v H per head
        parts["wqkv"] = wqkv
        wo = _weight_of(parts["wo"]).reshape(c.n_heads, c.head_dim, c.d_model)  # (H, D, d): rows per head
        parts["wo"] = (hv.t() @ wo).reshape(c.q_dim, c.d_model) @ q  # H^T W_o per head, then W Q
        parts["w_gate_up"] = q.t() @ _weight_of(parts["w_gate_up"])
        w_down = _weight_of(parts["w_down"]) @ q
        if online_down:
            parts["w_down"] = QuantLinear(qd_t @ w_down, None, qd.rotate)  # Q_F^T W_down
        else:
            parts["w_down"] = w_down
    embedding = model.embed @ q  # E Q
    return _build(model, blocks, head=q.t() @ head, norm=torch.ones_like(model.norm), embedding=embedding)
