"""A roofline analyzer for Llama-style decoders: per-operator FLOPs, bytes, bound and time, per stage.

Two stages of inference (Yuan et al. 2024, "LLM Inference Unveiled: Survey and Roofline Model Insights", sec. 2):

* **prefill** of ``s`` prompt tokens per sequence: every operator sees ``B * s`` tokens; its GEMMs are
  compute-bound on a GPU once ``B * s`` passes the ridge point;
* **decode** one token per sequence at context ``s``: every weight matrix is read for ``B`` tokens (a GEMV at
  ``B = 1``) and attention reads the whole KV cache, so the step is memory-bound until ``B`` reaches the ridge.

Notation: ``B`` batch, ``T`` new tokens per sequence (``s`` in prefill, 1 in decode), ``S`` keys each query
attends to, ``M = B T`` tokens, ``d`` hidden size, ``H``/``H_kv`` query/KV heads of size ``D``, ``d_ff`` FFN size,
``V`` vocabulary, ``L`` layers. Element sizes: ``a`` bytes per activation (the compute ``dtype``), ``w`` bytes per
weight (``weight_bits / 8``), ``c`` bytes per KV-cache element (``kv_bits / 8``).

Byte convention (:mod:`refimpl.roofline.ops`): each operator reads its inputs and weights once and writes its
output once. KV entries are read at ``c`` bytes and GQA shares each KV head among ``H / H_kv`` query heads, so
the cache holds and attention reads ``2 H_kv D`` elements per token and layer, not ``2 H D``. With
``flash_attention=True`` scores, softmax and the weighted sum are one fused operator whose ``(T, S)`` score
matrix never reaches memory and whose causal prefill skips the masked half (``s (s + 1) / 2`` query-key pairs);
with ``flash_attention=False`` they are three operators, the full ``(T, S)`` rectangle is computed (masked) and
the scores are written and read back. The SwiGLU MLP has three ``d x d_ff`` matrices and its activation is
``M x d_ff`` (LLM-Viewer sized it by ``d``, one of its reported bugs). Not counted: RoPE's cos/sin tables,
the cost of (de)quantizing weights or KV entries, the router's top-k, kernel launch overheads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from refimpl._checks import check_choice, check_float, check_int, check_positive_int
from refimpl.roofline.hardware import Hardware, dtype_bits, normalize_dtype, resolve_hardware
from refimpl.roofline.models import ModelConfig, resolve_model
from refimpl.roofline.ops import Operator, OperatorCost, elementwise, matmul, operator_cost
from refimpl.roofline.ops import bound as roofline_bound

__all__ = [
    "STAGES",
    "Analysis",
    "MemoryFootprint",
    "Workload",
    "analyze",
    "expected_experts_touched",
    "kv_cache_bytes",
    "layer_operators",
    "max_batch",
    "memory_footprint",
    "weight_bytes",
]

STAGES = ("prefill", "decode")

# FLOPs per element of the non-matmul operators (a convention; they are memory-bound anyway).
RMSNORM_FLOPS = 4  # square, accumulate, scale by 1/rms, scale by the weight
ROPE_FLOPS = 3  # x * cos + rotate(x) * sin
SOFTMAX_FLOPS = 5  # max, subtract, exp, accumulate, divide
SILU_MUL_FLOPS = 5  # silu(g) = g / (1 + exp(-g)) is 4, times u is 1
ADD_FLOPS = 1


@dataclass(frozen=True)
class MemoryFootprint:
    """Bytes resident in device memory during one stage.

    Attributes:
        weights: all weights (every expert, the embedding, the LM head unless tied), at ``weight_bits``.
        kv_cache: the KV cache of ``B`` sequences: after prefill of ``s`` tokens, or at decode context
            ``min(s, kv_budget)``.
        activations: the largest working set of activations of any one operator (its activation inputs plus
            outputs; the ``(T, S)`` scores without FlashAttention, the logits with ``logits="all"``).
    """

    weights: float
    kv_cache: float
    activations: float

    @property
    def total(self) -> float:
        """``weights + kv_cache + activations`` in bytes."""
        return self.weights + self.kv_cache + self.activations


@dataclass(frozen=True)
class Workload:
    """One inference stage to analyze: what runs, for how many sequences, how long, at what precision.

    Frozen and validated on construction, so a bad value fails where it is written; vary one field with
    :func:`dataclasses.replace` (``replace(w, batch=64)``), which validates again.

    Attributes:
        stage: ``"prefill"`` (``seq`` prompt tokens per sequence) or ``"decode"`` (one token per sequence at
            context ``seq``: attention reads ``seq`` cached tokens, including the new one).
        batch: sequences ``B``.
        seq: prompt length (prefill) or context length (decode) ``s``.
        dtype: compute and activation dtype (a name or ``torch.dtype``, stored as its canonical name); selects
            the compute ceiling ``hardware.peak(dtype)``.
        weight_bits: bits per stored weight (``None``: the dtype's; 4 for a 4-bit weight-only quantization).
        kv_bits: bits per stored KV element including any scales (``None``: the dtype's; KIVI-2 is about 2-3).
        kv_budget: tokens kept per sequence by KV eviction during decode (``None``: keep all).
        active_experts: experts each token runs in an MoE model (``None``: the model's top-k).
        flash_attention: fused IO-aware attention (scores stay on chip) vs three materializing operators.
        logits: ``"last"`` (only each sequence's last token, as in generation) or ``"all"`` positions.

    Raises ``ValueError`` or ``TypeError`` naming the field for an unknown stage, dtype or logits choice, a
    non-positive ``batch``, ``seq`` or ``kv_budget``, bits outside ``(0, 64]``, ``active_experts < 1`` or a
    non-bool ``flash_attention``; ``active_experts`` above the model's expert count is caught by :func:`analyze`.
    """

    stage: str = "decode"
    batch: int = 1
    seq: int = 1024
    dtype: Any = "fp16"
    weight_bits: float | None = None
    kv_bits: float | None = None
    kv_budget: int | None = None
    active_experts: int | None = None
    flash_attention: bool = True
    logits: str = "last"

    def __post_init__(self) -> None:
        def set_(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)  # frozen: normalize once, here

        check_choice("stage", self.stage, STAGES)
        set_("batch", check_positive_int("batch", self.batch))
        set_("seq", check_positive_int("seq", self.seq))
        set_("dtype", normalize_dtype(self.dtype))
        for name in ("weight_bits", "kv_bits"):
            bits = getattr(self, name)
            if bits is not None:
                bits = check_float(name, bits)
                if not 0 < bits <= 64:
                    raise ValueError(f"{name} must be in (0, 64], got {bits}")
                set_(name, bits)
        if self.kv_budget is not None:
            set_("kv_budget", check_positive_int("kv_budget", self.kv_budget))
        if self.active_experts is not None:
            set_("active_experts", check_positive_int("active_experts", self.active_experts))
        if not isinstance(self.flash_attention, bool):
            raise TypeError(f"flash_attention must be a bool, got {type(self.flash_attention).__name__}")
        check_choice("logits", self.logits, ("last", "all"))

    @property
    def new_tokens(self) -> int:
        """``T``: tokens per sequence this stage computes."""
        return self.seq if self.stage == "prefill" else 1

    @property
    def tokens(self) -> int:
        """``M = B T``: tokens every operator of a layer sees."""
        return self.batch * self.new_tokens

    @property
    def keys(self) -> int:
        """``S``: keys each query attends to, and tokens per sequence held in the KV cache (eviction keeps
        ``kv_budget`` of them during decode)."""
        if self.stage == "decode" and self.kv_budget is not None:
            return min(self.seq, self.kv_budget)
        return self.seq

    @property
    def bits_per_weight(self) -> float:
        """``weight_bits``, or the dtype's bits when it is ``None``."""
        return dtype_bits(self.dtype) if self.weight_bits is None else self.weight_bits

    @property
    def bits_per_kv(self) -> float:
        """``kv_bits``, or the dtype's bits when it is ``None``."""
        return dtype_bits(self.dtype) if self.kv_bits is None else self.kv_bits


def _for_model(cfg: ModelConfig, workload: Workload) -> Workload:
    """``workload`` with ``active_experts`` resolved against ``cfg`` (its top-k by default) and checked."""
    if not isinstance(workload, Workload):
        raise TypeError(f"workload must be a Workload, got {type(workload).__name__}")
    k = cfg.experts_per_token if workload.active_experts is None else workload.active_experts
    return replace(workload, active_experts=check_int("active_experts", k, min_value=1, max_value=cfg.n_experts))


def expected_experts_touched(n_experts: int, experts_per_token: int, tokens: int) -> float:
    """Expected number of distinct experts a batch of ``tokens`` routes to, under uniform top-k routing.

    Each token picks ``k`` of ``E`` experts; an expert is missed by one token with probability ``1 - k / E``,
    so ``E (1 - (1 - k/E)^tokens)`` experts are touched on average: ``k`` for one token, ``E`` for many.
    Their weights are what an MoE layer reads from memory.
    """
    n_experts = check_positive_int("n_experts", n_experts)
    k = check_int("experts_per_token", experts_per_token, min_value=1, max_value=n_experts)
    tokens = check_positive_int("tokens", tokens)
    return n_experts * (1.0 - (1.0 - k / n_experts) ** tokens)


def _attention_ops(cfg: ModelConfig, wl: Workload, a: float, c: float) -> list[Operator]:
    B, T, S, L = wl.batch, wl.new_tokens, wl.keys, cfg.n_layers
    H, D, Hkv = cfg.n_heads, cfg.head_dim, cfg.n_kv_heads
    M = B * T
    q_bytes = M * H * D * a  # Q: (B, H, T, D)
    o_bytes = M * H * D * a  # O: (B, H, T, D)
    kv_read = B * S * Hkv * D * c  # K or V: (B, H_kv, S, D); GQA: each KV head read once for its group
    causal = wl.stage == "prefill"
    if wl.flash_attention:
        # Fused kernel; causal prefill skips the masked query-key pairs (T = S = s there).
        pairs = S * (S + 1) // 2 if causal else T * S
        flops = B * H * (4 * pairs * D + SOFTMAX_FLOPS * pairs)  # QK^T and PV: 2 D each per pair
        return [
            Operator(
                "attention",
                flops=flops,
                bytes_read=q_bytes + 2 * kv_read,
                bytes_written=o_bytes,
                kv_bytes=2 * kv_read,
                count=L,
                kind="attention",
            )
        ]
    scores = B * H * T * S  # (B, H, T, S): the full rectangle, masked where causal
    return [
        Operator(
            "qk_matmul",
            flops=2 * scores * D,
            bytes_read=q_bytes + kv_read,
            bytes_written=scores * a,
            kv_bytes=kv_read,
            count=L,
            kind="attention",
        ),
        elementwise("softmax", scores, flops_per_element=SOFTMAX_FLOPS, n_inputs=1, act_bytes=a, count=L),
        Operator(
            "sv_matmul",
            flops=2 * scores * D,
            bytes_read=scores * a + kv_read,
            bytes_written=o_bytes,
            kv_bytes=kv_read,
            count=L,
            kind="attention",
        ),
    ]


def _mlp_ops(cfg: ModelConfig, wl: Workload, a: float, w: float) -> list[Operator]:
    L, M, d, F = cfg.n_layers, wl.tokens, cfg.d_model, cfg.ffn_dim
    if not cfg.is_moe:
        # SwiGLU (Shazeer 2020): down( silu(x W_gate) * (x W_up) ), three d x d_ff matrices.
        return [
            matmul("gate_proj", M, d, F, act_bytes=a, weight_bytes=w, count=L),
            matmul("up_proj", M, d, F, act_bytes=a, weight_bytes=w, count=L),
            elementwise("silu_mul", M * F, flops_per_element=SILU_MUL_FLOPS, n_inputs=2, act_bytes=a, count=L),
            matmul("down_proj", M, F, d, act_bytes=a, weight_bytes=w, count=L),
        ]
    # Mixture of Experts: each token runs k of E experts. FLOPs follow the M k token-expert assignments;
    # weight bytes follow the experts actually touched (k at one token, all E for a large batch).
    k, E = wl.active_experts, cfg.n_experts
    touched = expected_experts_touched(E, k, M)
    Mk = M * k

    def expert_matmul(name: str, d_in: int, d_out: int) -> Operator:
        weights = touched * d_in * d_out * w
        return Operator(
            name,
            flops=2.0 * Mk * d_in * d_out,
            bytes_read=Mk * d_in * a + weights,
            bytes_written=Mk * d_out * a,
            weight_bytes=weights,
            count=L,
        )

    return [
        matmul("router", M, d, E, act_bytes=a, weight_bytes=w, count=L),
        expert_matmul("expert_gate_proj", d, F),
        expert_matmul("expert_up_proj", d, F),
        elementwise("expert_silu_mul", Mk * F, flops_per_element=SILU_MUL_FLOPS, n_inputs=2, act_bytes=a, count=L),
        expert_matmul("expert_down_proj", F, d),
        # y = sum_i g_i * expert_i(x): k inputs per output element, a multiply and an add each.
        Operator(
            "expert_combine",
            flops=2.0 * Mk * d,
            bytes_read=Mk * d * a,
            bytes_written=M * d * a,
            count=L,
            kind="elementwise",
        ),
    ]


def _layer_ops(cfg: ModelConfig, wl: Workload) -> list[Operator]:
    a, w, c = dtype_bits(wl.dtype) / 8, wl.bits_per_weight / 8, wl.bits_per_kv / 8
    L, M, d = cfg.n_layers, wl.tokens, cfg.d_model

    def norm(name: str) -> Operator:
        return elementwise(
            name, M * d, flops_per_element=RMSNORM_FLOPS, n_inputs=1, act_bytes=a, extra_read_bytes=d * a, count=L
        )

    def residual(name: str) -> Operator:
        return elementwise(name, M * d, flops_per_element=ADD_FLOPS, n_inputs=2, act_bytes=a, count=L)

    new_kv = M * 2 * cfg.kv_dim  # this step's K and V elements: (B, H_kv, T, D) each
    return [
        norm("attn_norm"),
        matmul("q_proj", M, d, cfg.q_dim, act_bytes=a, weight_bytes=w, count=L),
        matmul("k_proj", M, d, cfg.kv_dim, act_bytes=a, weight_bytes=w, count=L),
        matmul("v_proj", M, d, cfg.kv_dim, act_bytes=a, weight_bytes=w, count=L),
        Operator(
            "rope",
            flops=ROPE_FLOPS * M * (cfg.q_dim + cfg.kv_dim),
            bytes_read=M * (cfg.q_dim + cfg.kv_dim) * a,
            bytes_written=M * (cfg.q_dim + cfg.kv_dim) * a,
            count=L,
            kind="elementwise",
        ),
        # Append this step's K, V to the cache at c bytes per element (KIVI: c = 2/8 plus its scales).
        Operator(
            "kv_cache_write",
            flops=0.0,
            bytes_read=new_kv * a,
            bytes_written=new_kv * c,
            kv_bytes=new_kv * c,
            count=L,
            kind="memory",
        ),
        *_attention_ops(cfg, wl, a, c),
        matmul("o_proj", M, cfg.q_dim, d, act_bytes=a, weight_bytes=w, count=L),
        residual("attn_residual"),
        norm("mlp_norm"),
        *_mlp_ops(cfg, wl, a, w),
        residual("mlp_residual"),
    ]


def _model_ops(cfg: ModelConfig, wl: Workload) -> tuple[list[Operator], list[Operator]]:
    """(ops before the layers, ops after them), each executed once per forward."""
    a, w = dtype_bits(wl.dtype) / 8, wl.bits_per_weight / 8
    M, d = wl.tokens, cfg.d_model
    n_logits = M if wl.logits == "all" else wl.batch  # "last": only each sequence's last token needs logits
    embed = Operator(
        "embedding",  # gather M rows of the (V, d) table
        flops=0.0,
        bytes_read=M * d * w,
        bytes_written=M * d * a,
        weight_bytes=M * d * w,
        kind="memory",
    )
    final_norm = elementwise(
        "final_norm", n_logits * d, flops_per_element=RMSNORM_FLOPS, n_inputs=1, act_bytes=a, extra_read_bytes=d * a
    )
    lm_head = matmul("lm_head", n_logits, d, cfg.vocab_size, act_bytes=a, weight_bytes=w)
    return [embed], [final_norm, lm_head]


def weight_bytes(model: ModelConfig | str, workload: Workload = Workload()) -> float:
    """Bytes of all weights: matrices (all experts, embedding, untied LM head) at ``workload.bits_per_weight``,
    norm vectors at the workload's dtype."""
    cfg = resolve_model(model)
    wl = _for_model(cfg, workload)
    n_norm = (2 * cfg.n_layers + 1) * cfg.d_model
    return (cfg.n_params() - n_norm) * wl.bits_per_weight / 8 + n_norm * dtype_bits(wl.dtype) / 8


def kv_cache_bytes(model: ModelConfig | str, workload: Workload = Workload()) -> float:
    """Bytes of the KV cache of ``workload.batch`` sequences holding ``workload.keys`` tokens each (``seq``, or
    ``min(seq, kv_budget)`` during decode).

    ``2 L B S H_kv D c``: keys and values, every layer, ``H_kv`` heads (GQA), ``c = bits_per_kv / 8`` bytes each.
    """
    cfg = resolve_model(model)
    wl = _for_model(cfg, workload)
    return 2 * cfg.n_layers * wl.batch * wl.keys * cfg.n_kv_heads * cfg.head_dim * wl.bits_per_kv / 8


def _footprint(cfg: ModelConfig, wl: Workload, ops: list[Operator]) -> MemoryFootprint:
    return MemoryFootprint(
        weights=weight_bytes(cfg, wl),
        kv_cache=kv_cache_bytes(cfg, wl),
        activations=max(op.activation_bytes for op in ops),
    )


@dataclass(frozen=True)
class Analysis:
    """Result of :func:`analyze`: per-operator roofline rows and stage totals (SI units: s, FLOP, bytes).

    ``rows`` lists each operator once with its per-execution cost and its ``count`` (``n_layers`` for a
    decoder-layer operator, 1 for ``embedding``, ``final_norm``, ``lm_head``); totals multiply by ``count``.
    ``workload`` is the one analyzed, its ``active_experts`` resolved against the model.
    """

    model: ModelConfig
    hardware: Hardware
    workload: Workload
    rows: list[OperatorCost]
    memory: MemoryFootprint
    layer_op_names: tuple[str, ...] = field(default=())

    # The workload's fields, read through (``active_experts`` resolved against the model, bits against the dtype).
    stage = property(lambda self: self.workload.stage, doc="``workload.stage``.")
    batch = property(lambda self: self.workload.batch, doc="``workload.batch``.")
    seq = property(lambda self: self.workload.seq, doc="``workload.seq``.")
    dtype = property(lambda self: self.workload.dtype, doc="``workload.dtype`` (canonical name).")
    weight_bits = property(lambda self: self.workload.bits_per_weight, doc="Bits per stored weight.")
    kv_bits = property(lambda self: self.workload.bits_per_kv, doc="Bits per stored KV element.")
    kv_budget = property(lambda self: self.workload.kv_budget, doc="``workload.kv_budget``.")
    active_experts = property(lambda self: self.workload.active_experts, doc="Experts each token runs.")
    flash_attention = property(lambda self: self.workload.flash_attention, doc="``workload.flash_attention``.")
    logits = property(lambda self: self.workload.logits, doc="``workload.logits``.")

    @property
    def peak_flops(self) -> float:
        """The compute ceiling used, FLOP/s (``hardware.peak(dtype)``)."""
        return self.hardware.peak(self.dtype)

    @property
    def ridge_point(self) -> float:
        """``pi / beta`` in FLOP/byte for this dtype."""
        return self.hardware.ridge_point(self.dtype)

    @property
    def time(self) -> float:
        """Seconds for the stage: the sum of operator times (operators run one after another)."""
        return sum(r.total_time for r in self.rows)

    @property
    def flops(self) -> float:
        """Total FLOPs of the stage."""
        return sum(r.op.flops * r.op.count for r in self.rows)

    @property
    def bytes(self) -> float:
        """Total memory traffic of the stage, bytes."""
        return sum(r.op.bytes * r.op.count for r in self.rows)

    @property
    def intensity(self) -> float:
        """Arithmetic intensity of the whole stage, FLOP/byte."""
        return self.flops / self.bytes

    @property
    def bound(self) -> str:
        """``"compute"`` or ``"memory"`` for the stage taken as one operator (its intensity vs the ridge)."""
        return roofline_bound(self.flops, self.bytes, self.peak_flops, self.hardware.memory_bandwidth)

    @property
    def layer_time(self) -> float:
        """Seconds for one decoder layer (all layers are identical)."""
        return sum(r.time for r in self.rows if r.op.name in self.layer_op_names)

    @property
    def layer_flops(self) -> float:
        """FLOPs of one decoder layer."""
        return sum(r.op.flops for r in self.rows if r.op.name in self.layer_op_names)

    def row(self, name: str) -> OperatorCost:
        """The row of operator ``name``; raises ``ValueError`` listing the operator names."""
        names = [r.op.name for r in self.rows]
        check_choice("name", name, names)
        return self.rows[names.index(name)]

    def time_by_operator(self) -> dict[str, float]:
        """Seconds per operator over the whole stage (``count`` executions each)."""
        return {r.op.name: r.total_time for r in self.rows}

    def time_by_bound(self) -> dict[str, float]:
        """Seconds spent in memory-bound and in compute-bound operators."""
        out = {"memory": 0.0, "compute": 0.0}
        for r in self.rows:
            out[r.bound] += r.total_time
        return out

    def to_rows(self) -> list[dict[str, Any]]:
        """The per-operator rows as dicts (see :meth:`OperatorCost.as_dict`), for tables and plots."""
        return [r.as_dict() for r in self.rows]

    def table(self) -> str:
        """A plain-text per-operator table with totals, for printing."""
        head = (
            f"{'operator':<18}{'count':>6}{'GFLOP':>11}{'MB read':>11}{'MB written':>12}"
            f"{'FLOP/B':>9}{'bound':>9}{'total ms':>11}"
        )
        lines = [
            f"{self.model.name} on {self.hardware.name}, {self.stage}, batch {self.batch}, seq {self.seq}, "
            f"{self.dtype}, weights {self.weight_bits:g} bit, KV {self.kv_bits:g} bit",
            head,
            "-" * len(head),
        ]
        for r in self.rows:
            op = r.op
            lines.append(
                f"{op.name:<18}{op.count:>6}{op.flops / 1e9:>11.4g}{op.bytes_read / 1e6:>11.4g}"
                f"{op.bytes_written / 1e6:>12.4g}{op.intensity:>9.3g}{r.bound:>9}{r.total_time * 1e3:>11.4g}"
            )
        lines.append("-" * len(head))
        lines.append(
            f"total: {self.time * 1e3:.4g} ms, {self.flops / 1e9:.4g} GFLOP, {self.bytes / 1e9:.4g} GB, "
            f"intensity {self.intensity:.3g} FLOP/B (ridge {self.ridge_point:.3g}), {self.bound}-bound"
        )
        m = self.memory
        lines.append(
            f"memory: weights {m.weights / 1e9:.4g} GB, KV cache {m.kv_cache / 1e9:.4g} GB, "
            f"activations {m.activations / 1e9:.4g} GB, total {m.total / 1e9:.4g} GB "
            f"(capacity {self.hardware.memory_capacity / 1e9:.4g} GB)"
        )
        return "\n".join(lines)


def layer_operators(model: ModelConfig | str, workload: Workload = Workload()) -> list[Operator]:
    """All operators of one forward of ``workload`` (embedding, one decoder layer's operators with
    ``count = n_layers``, final norm, LM head), independent of any hardware."""
    cfg = resolve_model(model)
    wl = _for_model(cfg, workload)
    head, tail = _model_ops(cfg, wl)
    return [*head, *_layer_ops(cfg, wl), *tail]


def analyze(model: ModelConfig | str, hardware: Hardware | str, workload: Workload = Workload()) -> Analysis:
    """Roofline analysis of one inference stage of ``model`` on ``hardware``.

    ``model``: a :class:`ModelConfig` or a name from :func:`list_models`. ``hardware``: a :class:`Hardware` or a
    name from :func:`list_hardware`. ``workload``: the stage, batch, sequence length and precisions
    (:class:`Workload`; default: decode of one sequence at context 1024 in fp16).

    Returns :class:`Analysis` with per-operator rows and totals. Raises ``ValueError`` or ``TypeError`` naming
    the argument for an unknown model or hardware, a dtype the hardware has no peak for, or more
    ``active_experts`` than the model has (the workload validates its own fields).
    """
    hw = resolve_hardware(hardware)
    cfg = resolve_model(model)
    wl = _for_model(cfg, workload)
    peak, bandwidth = hw.peak(wl.dtype), hw.memory_bandwidth
    head, tail = _model_ops(cfg, wl)
    layer = _layer_ops(cfg, wl)
    ops = [*head, *layer, *tail]
    return Analysis(
        model=cfg,
        hardware=hw,
        workload=wl,
        rows=[operator_cost(op, peak, bandwidth) for op in ops],
        memory=_footprint(cfg, wl, ops),
        layer_op_names=tuple(op.name for op in layer),
    )


def memory_footprint(model: ModelConfig | str, workload: Workload = Workload()) -> MemoryFootprint:
    """Bytes resident during one stage of ``workload`` (weights, KV cache, activations)."""
    cfg = resolve_model(model)
    wl = _for_model(cfg, workload)
    head, tail = _model_ops(cfg, wl)
    return _footprint(cfg, wl, [*head, *_layer_ops(cfg, wl), *tail])


def max_batch(
    model: ModelConfig | str,
    hardware: Hardware | str,
    workload: Workload = Workload(),
    *,
    memory_fraction: float = 1.0,
) -> int:
    """Largest batch whose :func:`memory_footprint` fits in ``memory_fraction * hardware.memory_capacity``.

    Every field of ``workload`` but ``batch`` (which this searches) applies. Returns 0 when not even the weights
    plus one sequence fit. The footprint is ``weights + B * (KV cache + activations of one sequence)`` (every
    term is linear in ``B``), so the answer is that line solved for ``B``, then checked against the exact
    footprint.
    """
    hw = resolve_hardware(hardware)
    memory_fraction = check_float("memory_fraction", memory_fraction, min_value=0.0, max_value=1.0)
    budget = memory_fraction * hw.memory_capacity

    def footprint(b: int) -> MemoryFootprint:
        return memory_footprint(model, replace(workload, batch=b))

    one = footprint(1)
    if one.total > budget:
        return 0
    per_sequence = one.kv_cache + one.activations
    b = max(1, int(math.floor((budget - one.weights) / per_sequence)))
    while footprint(b).total > budget:  # float rounding can put the line one step too far
        b -= 1
    while footprint(b + 1).total <= budget:
        b += 1
    return b
