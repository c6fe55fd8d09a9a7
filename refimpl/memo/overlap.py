"""The overlap model: how large a fraction ``alpha`` of each layer's tokens can be swapped without a stall.

Per layer, in the style of MEMO (Zhao et al. 2024) and on the roofline of :mod:`refimpl.roofline`:

* the layer saves ``A = 34 s b h`` bytes with FlashAttention (Korthikanti et al. 2022; 16-bit activations),
  of which ``X = 2 s b h`` is its input;
* its forward pass takes ``T_f`` (sum of the roofline times of its operators), its backward pass
  ``T_b = 2 T_f`` (the usual estimate: two matmuls per forward matmul);
* swapping ``alpha A`` bytes over the host link of bandwidth ``B`` takes ``T_s = alpha A / B``; the offload of a
  layer overlaps the next layer's forward pass, the fetch overlaps the backward pass of the layer after it;
* recomputing the other tokens costs ``T_r(alpha) = (1 - alpha) T_other + (1 - alpha^2) T_attn``: the token-wise
  operators scale with the number of tokens, causal attention for queries ``alpha s .. s`` with the number of
  (query, key) pairs, a fraction ``1 - alpha^2`` of them.

A step of ``L`` layers then takes ``L [max(T_f, T_s) + max(T_b + T_r, T_s)]``. The swap stays hidden while
``alpha A / B <= T_f`` (the forward window is the shorter); the host must hold ``alpha A L`` bytes. Hence

    alpha* = min(1, T_f B / A, C_host / (A L)).

Peak device memory for activations: the kept inputs of the other layers, ``(L - 1)(1 - alpha) X``, plus one layer
fully materialized, ``A``, plus the next layer's fetched part, ``alpha A`` (double buffering). ``alpha = 0`` is
full recomputation (``(L - 1) X + A``); keep-everything is ``L A``.

Sequence parallelism over ``p`` devices (each holds ``s / p`` tokens and computes ``1 / p`` of the attention
pairs) divides ``A``, ``X`` and the times by ``p``: ``alpha*`` from the link is unchanged, while the memory per
device and the host memory per device shrink ``p``-fold. Communication is not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from refimpl._checks import check_float, check_int, check_positive_int
from refimpl.memo.ledger import korthikanti_activation_bytes

__all__ = [
    "LayerShape",
    "LayerTimes",
    "MemoPrediction",
    "choose_alpha",
    "gpt_layer_operators",
    "host_link_bandwidth",
    "layer_times",
    "predict_memo",
]

LN_FLOPS = 8  # mean, variance, normalize, scale and shift per element (a convention; memory-bound anyway)
GELU_FLOPS = 8
SOFTMAX_FLOPS = 5  # the roofline analyzer's convention for the fused attention's softmax


def host_link_bandwidth(hardware: Any) -> float:
    """Bytes/s one way between device and host: the datasheet link, or for the CPU (device = host) a copy in
    memory, half the streaming bandwidth (``refimpl.roofline`` counts a copy's read and write)."""
    link = hardware.host_link_bandwidth
    return float(link) if link is not None else hardware.memory_bandwidth / 2


@dataclass(frozen=True)
class LayerShape:
    """One GPT layer as the overlap model sees it: ``s`` tokens (``s / p`` per device under ``sequence_parallel = p``
    ways of sequence parallelism), ``b`` sequences, width ``h``, ``a`` heads of ``d = h / a``, MLP width
    ``ffn_hidden`` (``None``: ``4h``) and activations of ``dtype``. Raises ``ValueError`` unless ``p`` divides
    ``s`` and ``a`` divides ``h``."""

    s: int
    b: int
    h: int
    a: int
    ffn_hidden: int | None = None
    dtype: str = "bf16"
    sequence_parallel: int = 1

    def __post_init__(self) -> None:
        for name in ("s", "b", "h", "a", "sequence_parallel"):
            check_positive_int(name, getattr(self, name))
        if self.ffn_hidden is not None:
            check_positive_int("ffn_hidden", self.ffn_hidden)
        if self.s % self.sequence_parallel:
            raise ValueError(
                f"sequence_parallel must divide s, got s={self.s}, sequence_parallel={self.sequence_parallel}"
            )
        if self.h % self.a:
            raise ValueError(f"heads must divide hidden, got h={self.h}, a={self.a}")

    @property
    def f(self) -> int:
        """MLP width: ``ffn_hidden``, default ``4h``."""
        return 4 * self.h if self.ffn_hidden is None else self.ffn_hidden

    @property
    def local_tokens(self) -> int:
        """``s / p``: the tokens of each sequence on one device."""
        return self.s // self.sequence_parallel

    @property
    def bytes_per_value(self) -> float:
        """Bytes of one activation value of ``dtype``."""
        from refimpl.roofline.hardware import dtype_bits

        return dtype_bits(self.dtype) / 8


def gpt_layer_operators(shape: LayerShape) -> list[Any]:
    """Forward operators of one GPT layer (the book's block with FlashAttention, causal) as roofline
    :class:`~refimpl.roofline.ops.Operator` s, per device under ``sequence_parallel`` ways of sequence parallelism.

    Shapes (:class:`LayerShape`): ``s`` tokens (``s / p`` per device), ``b`` sequences, width ``h``, ``a`` heads of
    ``d = h / a``, MLP width ``f``. Attention: ``s (s + 1) / 2`` causal pairs in all, ``1 / p`` of them per device,
    each costing ``4 d`` FLOPs (``QK^T`` and ``PV``) plus the softmax; it reads Q and writes O of the local tokens
    and reads K and V of all ``s`` tokens.
    """
    from refimpl.roofline.ops import Operator, elementwise, matmul

    s, b, h, a, f, p = shape.s, shape.b, shape.h, shape.a, shape.f, shape.sequence_parallel
    e = shape.bytes_per_value
    m = shape.local_tokens * b  # tokens on this device
    d = h // a
    pairs = b * a * (s * (s + 1) // 2) / p
    return [
        elementwise("ln1", m * h, flops_per_element=LN_FLOPS, n_inputs=1, act_bytes=e),
        matmul("qkv", m, h, 3 * h, act_bytes=e, weight_bytes=e),
        Operator(
            "attention",
            flops=pairs * (4 * d + SOFTMAX_FLOPS),
            bytes_read=(m * h + 2 * s * b * h) * e,
            bytes_written=m * h * e,
            kind="attention",
        ),
        matmul("proj", m, h, h, act_bytes=e, weight_bytes=e),
        elementwise("dropout_residual1", m * h, flops_per_element=2, n_inputs=2, act_bytes=e),
        elementwise("ln2", m * h, flops_per_element=LN_FLOPS, n_inputs=1, act_bytes=e),
        matmul("fc1", m, h, f, act_bytes=e, weight_bytes=e),
        elementwise("gelu", m * f, flops_per_element=GELU_FLOPS, n_inputs=1, act_bytes=e),
        matmul("fc2", m, f, h, act_bytes=e, weight_bytes=e),
        elementwise("dropout_residual2", m * h, flops_per_element=2, n_inputs=2, act_bytes=e),
    ]


@dataclass(frozen=True)
class LayerTimes:
    """Roofline seconds of one layer's forward pass, split into the attention core and the rest."""

    attention: float
    other: float

    @property
    def forward(self) -> float:
        """``T_f``."""
        return self.attention + self.other

    @property
    def backward(self) -> float:
        """``T_b = 2 T_f``."""
        return 2.0 * self.forward

    def recompute(self, alpha: float) -> float:
        """``T_r(alpha) = (1 - alpha) T_other + (1 - alpha^2) T_attn``: the forward pass of tokens ``alpha s ..``."""
        alpha = check_float("alpha", alpha, min_value=0.0, max_value=1.0)
        return (1.0 - alpha) * self.other + (1.0 - alpha * alpha) * self.attention


def layer_times(shape: LayerShape, hardware: Any) -> LayerTimes:
    """Roofline times (``max(FLOPs / peak, bytes / bandwidth)`` per operator) of :func:`gpt_layer_operators` on
    ``hardware`` (a :class:`~refimpl.roofline.Hardware` or a name for ``refimpl.roofline.load_hardware``)."""
    from refimpl.roofline.hardware import resolve_hardware
    from refimpl.roofline.ops import operator_cost

    hw = resolve_hardware(hardware)
    peak = hw.peak(shape.dtype)
    times = {op.name: operator_cost(op, peak, hw.memory_bandwidth).time for op in gpt_layer_operators(shape)}
    attention = times.pop("attention")
    return LayerTimes(attention=attention, other=sum(times.values()))


@dataclass(frozen=True)
class MemoPrediction:
    """The overlap model's prediction for one ``alpha`` (seconds and bytes per device).

    ``step_time`` and ``keep_all_step_time`` are for all ``n_layers`` layers, forward and backward;
    ``swap_time`` is one layer's ``alpha A / B``; ``hidden`` is ``swap_time <= times.forward``.
    """

    alpha: float
    times: LayerTimes
    activation_bytes: int
    input_bytes: int
    swap_time: float
    step_time: float
    keep_all_step_time: float
    hidden: bool
    peak_device_bytes: float
    keep_all_peak_bytes: float
    host_bytes: float


def predict_memo(alpha: float, shape: LayerShape, hardware: Any, *, n_layers: int) -> MemoPrediction:
    """Step time, peak device memory and host memory of MEMO with swap fraction ``alpha`` (see module doc)."""
    from refimpl.roofline.hardware import resolve_hardware

    alpha = check_float("alpha", alpha, min_value=0.0, max_value=1.0)
    n_layers = check_positive_int("n_layers", n_layers)
    hw = resolve_hardware(hardware)
    times = layer_times(shape, hw)
    e, s_local = shape.bytes_per_value, shape.local_tokens
    # Korthikanti's 34 sbh is for 16-bit activations; scale by e / 2 for other dtypes.
    act = int(korthikanti_activation_bytes(s_local, shape.b, shape.h, shape.a, flash_attention=True) * e / 2)
    x_bytes = int(e * s_local * shape.b * shape.h)
    swap = alpha * act / host_link_bandwidth(hw)
    fwd = max(times.forward, swap)
    bwd = max(times.backward + times.recompute(alpha), swap)
    return MemoPrediction(
        alpha=alpha,
        times=times,
        activation_bytes=act,
        input_bytes=x_bytes,
        swap_time=swap,
        step_time=n_layers * (fwd + bwd),
        keep_all_step_time=n_layers * (times.forward + times.backward),
        hidden=swap <= times.forward,
        peak_device_bytes=(n_layers - 1) * (1 - alpha) * x_bytes + (1 + alpha) * act,
        keep_all_peak_bytes=float(n_layers * act),
        host_bytes=alpha * act * n_layers,
    )


def choose_alpha(shape: LayerShape, hardware: Any, *, n_layers: int, host_capacity: float | None) -> float:
    """The largest ``alpha`` whose swap hides behind the forward pass and fits the host:
    ``min(1, T_f B / A, host_capacity / (A L))`` (``host_capacity`` in bytes per device; ``None``: unlimited)."""
    from refimpl.roofline.hardware import resolve_hardware

    hw = resolve_hardware(hardware)
    if host_capacity is not None:
        host_capacity = check_float("host_capacity", host_capacity, min_value=0.0)
    n_layers = check_int("n_layers", n_layers, min_value=1)
    pred = predict_memo(1.0, shape, hw, n_layers=n_layers)
    alpha = min(1.0, pred.times.forward * host_link_bandwidth(hw) / pred.activation_bytes)
    if host_capacity is not None:
        alpha = min(alpha, host_capacity / (pred.activation_bytes * n_layers))
    return alpha
