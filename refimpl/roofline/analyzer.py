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
from dataclasses import dataclass, field
from typing import Any

from refimpl._checks import check_choice, check_float, check_int, check_positive_int
from refimpl.roofline.hardware import Hardware, dtype_bits, normalize_dtype, resolve_hardware
from refimpl.roofline.models import ModelConfig, resolve_model
from refimpl.roofline.ops import Operator, OperatorCost, elementwise, evaluate, matmul
from refimpl.roofline.ops import bound as roofline_bound

__all__ = [
    "STAGES",
    "Analysis",
    "MemoryFootprint",
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
class _Setting:
    """Validated inputs of one analysis (internal)."""

    model: ModelConfig
    stage: str
    batch: int
    seq: int
    dtype: str
    weight_bits: float
    kv_bits: float
    kv_budget: int | None
    active_experts: int
    flash_attention: bool
    logits: str

    @property
    def new_tokens(self) -> int:
        """``T``: tokens per sequence this stage computes."""
        return self.seq if self.stage == "prefill" else 1

    @property
    def keys(self) -> int:
        """``S``: keys each query attends to (eviction keeps ``kv_budget`` of them during decode)."""
        if self.stage == "decode" and self.kv_budget is not None:
            return min(self.seq, self.kv_budget)
        return self.seq

    @property
    def cached_tokens(self) -> int:
        """Tokens per sequence held in the KV cache during this stage."""
        return self.keys


def _validate(
    model: ModelConfig | str,
    stage: str,
    batch: int,
    seq: int,
    dtype: Any,
    weight_bits: float | None,
    kv_bits: float | None,
    kv_budget: int | None,
    active_experts: int | None,
    flash_attention: bool,
    logits: str,
) -> _Setting:
    cfg = resolve_model(model)
    check_choice("stage", stage, STAGES)
    batch = check_positive_int("batch", batch)
    seq = check_positive_int("seq", seq)
    dtype = normalize_dtype(dtype)
    bits = dtype_bits(dtype)
    weight_bits = bits if weight_bits is None else check_float("weight_bits", weight_bits, min_value=0.0)
    kv_bits = bits if kv_bits is None else check_float("kv_bits", kv_bits, min_value=0.0)
    if weight_bits <= 0 or weight_bits > 64:
        raise ValueError(f"weight_bits must be in (0, 64], got {weight_bits}")
    if kv_bits <= 0 or kv_bits > 64:
        raise ValueError(f"kv_bits must be in (0, 64], got {kv_bits}")
    if kv_budget is not None:
        kv_budget = check_positive_int("kv_budget", kv_budget)
    k = cfg.experts_per_token if active_experts is None else active_experts
    k = check_int("active_experts", k, min_value=1, max_value=cfg.n_experts)
    if not isinstance(flash_attention, bool):
        raise TypeError(f"flash_attention must be a bool, got {type(flash_attention).__name__}")
    check_choice("logits", logits, ("last", "all"))
    return _Setting(cfg, stage, batch, seq, dtype, weight_bits, kv_bits, kv_budget, k, flash_attention, logits)


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


def _attention_ops(st: _Setting, a: float, c: float) -> list[Operator]:
    cfg, B, T, S, L = st.model, st.batch, st.new_tokens, st.keys, st.model.n_layers
    H, D, Hkv = cfg.n_heads, cfg.head_dim, cfg.n_kv_heads
    M = B * T
    q_bytes = M * H * D * a  # Q: (B, H, T, D)
    o_bytes = M * H * D * a  # O: (B, H, T, D)
    kv_read = B * S * Hkv * D * c  # K or V: (B, H_kv, S, D); GQA: each KV head read once for its group
    causal = st.stage == "prefill"
    if st.flash_attention:
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


def _mlp_ops(st: _Setting, a: float, w: float) -> list[Operator]:
    cfg, L = st.model, st.model.n_layers
    M, d, F = st.batch * st.new_tokens, cfg.d_model, cfg.ffn_dim
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
    k, E = st.active_experts, cfg.n_experts
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


def _layer_ops(st: _Setting) -> list[Operator]:
    cfg, L = st.model, st.model.n_layers
    a, w, c = dtype_bits(st.dtype) / 8, st.weight_bits / 8, st.kv_bits / 8
    M, d = st.batch * st.new_tokens, cfg.d_model

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
        *_attention_ops(st, a, c),
        matmul("o_proj", M, cfg.q_dim, d, act_bytes=a, weight_bytes=w, count=L),
        residual("attn_residual"),
        norm("mlp_norm"),
        *_mlp_ops(st, a, w),
        residual("mlp_residual"),
    ]


def _model_ops(st: _Setting) -> tuple[list[Operator], list[Operator]]:
    """(ops before the layers, ops after them), each executed once per forward."""
    cfg = st.model
    a, w = dtype_bits(st.dtype) / 8, st.weight_bits / 8
    M, d = st.batch * st.new_tokens, cfg.d_model
    n_logits = M if st.logits == "all" else st.batch  # "last": only each sequence's last token needs logits
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


def weight_bytes(model: ModelConfig | str, weight_bits: float = 16, norm_bits: float = 16) -> float:
    """Bytes of all weights: matrices (all experts, embedding, untied LM head) at ``weight_bits``, norm
    vectors at ``norm_bits``."""
    cfg = resolve_model(model)
    weight_bits = check_float("weight_bits", weight_bits, min_value=0.0, min_inclusive=False)
    norm_bits = check_float("norm_bits", norm_bits, min_value=0.0, min_inclusive=False)
    n_norm = (2 * cfg.n_layers + 1) * cfg.d_model
    return (cfg.n_params() - n_norm) * weight_bits / 8 + n_norm * norm_bits / 8


def kv_cache_bytes(
    model: ModelConfig | str, batch: int, seq: int, kv_bits: float = 16, kv_budget: int | None = None
) -> float:
    """Bytes of the KV cache of ``batch`` sequences holding ``min(seq, kv_budget)`` tokens each.

    ``2 L B S H_kv D c``: keys and values, every layer, ``H_kv`` heads (GQA), ``c = kv_bits / 8`` bytes each.
    """
    cfg = resolve_model(model)
    batch = check_positive_int("batch", batch)
    seq = check_positive_int("seq", seq)
    kv_bits = check_float("kv_bits", kv_bits, min_value=0.0, min_inclusive=False)
    tokens = seq if kv_budget is None else min(seq, check_positive_int("kv_budget", kv_budget))
    return 2 * cfg.n_layers * batch * tokens * cfg.n_kv_heads * cfg.head_dim * kv_bits / 8


def _footprint(st: _Setting, ops: list[Operator]) -> MemoryFootprint:
    return MemoryFootprint(
        weights=weight_bytes(st.model, st.weight_bits, dtype_bits(st.dtype)),
        kv_cache=kv_cache_bytes(st.model, st.batch, st.cached_tokens, st.kv_bits),
        activations=max(op.activation_bytes for op in ops),
    )


@dataclass(frozen=True)
class Analysis:
    """Result of :func:`analyze`: per-operator roofline rows and stage totals (SI units: s, FLOP, bytes).

    ``rows`` lists each operator once with its per-execution cost and its ``count`` (``n_layers`` for a
    decoder-layer operator, 1 for ``embedding``, ``final_norm``, ``lm_head``); totals multiply by ``count``.
    """

    model: ModelConfig
    hardware: Hardware
    stage: str
    batch: int
    seq: int
    dtype: str
    weight_bits: float
    kv_bits: float
    kv_budget: int | None
    active_experts: int
    flash_attention: bool
    logits: str
    rows: list[OperatorCost]
    memory: MemoryFootprint
    layer_op_names: tuple[str, ...] = field(default=())

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


def layer_operators(
    model: ModelConfig | str,
    *,
    stage: str = "decode",
    batch: int = 1,
    seq: int = 1024,
    dtype: Any = "fp16",
    weight_bits: float | None = None,
    kv_bits: float | None = None,
    kv_budget: int | None = None,
    active_experts: int | None = None,
    flash_attention: bool = True,
    logits: str = "last",
) -> list[Operator]:
    """All operators of one forward (embedding, one decoder layer's operators with ``count = n_layers``,
    final norm, LM head), independent of any hardware. Arguments as in :func:`analyze`."""
    st = _validate(
        model, stage, batch, seq, dtype, weight_bits, kv_bits, kv_budget, active_experts, flash_attention, logits
    )
    head, tail = _model_ops(st)
    return [*head, *_layer_ops(st), *tail]


def analyze(
    model: ModelConfig | str,
    hardware: Hardware | str,
    *,
    stage: str = "decode",
    batch: int = 1,
    seq: int = 1024,
    dtype: Any = "fp16",
    weight_bits: float | None = None,
    kv_bits: float | None = None,
    kv_budget: int | None = None,
    active_experts: int | None = None,
    flash_attention: bool = True,
    logits: str = "last",
) -> Analysis:
    """Roofline analysis of one inference stage of ``model`` on ``hardware``.

    Args:
        model: a :class:`ModelConfig` or a name from :func:`list_models`.
        hardware: a :class:`Hardware` or a name from :func:`list_hardware`.
        stage: ``"prefill"`` (``seq`` prompt tokens per sequence) or ``"decode"`` (one token per sequence at
            context ``seq``: attention reads ``seq`` cached tokens, including the new one).
        batch: sequences ``B``.
        seq: prompt length (prefill) or context length (decode) ``s``.
        dtype: compute and activation dtype; selects the compute ceiling ``hardware.peak(dtype)``.
        weight_bits: bits per stored weight (default: the dtype's; 4 for a 4-bit weight-only quantization).
        kv_bits: bits per stored KV element including any scales (default: the dtype's; KIVI-2 is about 2-3).
        kv_budget: tokens kept per sequence by KV eviction during decode (``None``: keep all).
        active_experts: experts each token runs in an MoE model (default: the model's top-k).
        flash_attention: fused IO-aware attention (scores stay on chip) vs three materializing operators.
        logits: ``"last"`` (only each sequence's last token, as in generation) or ``"all"`` positions.

    Returns:
        :class:`Analysis` with per-operator rows and totals.

    Raises:
        ValueError: naming the argument, for a non-positive batch or seq, an unknown model, hardware, stage
            or dtype, a dtype the hardware has no peak for, or bits outside ``(0, 64]``.
        TypeError: naming the argument, for an argument of the wrong type.
    """
    hw = resolve_hardware(hardware)
    st = _validate(
        model, stage, batch, seq, dtype, weight_bits, kv_bits, kv_budget, active_experts, flash_attention, logits
    )
    peak, bandwidth = hw.peak(st.dtype), hw.memory_bandwidth
    head, tail = _model_ops(st)
    layer = _layer_ops(st)
    ops = [*head, *layer, *tail]
    return Analysis(
        model=st.model,
        hardware=hw,
        stage=st.stage,
        batch=st.batch,
        seq=st.seq,
        dtype=st.dtype,
        weight_bits=st.weight_bits,
        kv_bits=st.kv_bits,
        kv_budget=st.kv_budget,
        active_experts=st.active_experts,
        flash_attention=st.flash_attention,
        logits=st.logits,
        rows=[evaluate(op, peak, bandwidth) for op in ops],
        memory=_footprint(st, ops),
        layer_op_names=tuple(op.name for op in layer),
    )


def memory_footprint(
    model: ModelConfig | str,
    *,
    stage: str = "decode",
    batch: int = 1,
    seq: int = 1024,
    dtype: Any = "fp16",
    weight_bits: float | None = None,
    kv_bits: float | None = None,
    kv_budget: int | None = None,
    active_experts: int | None = None,
    flash_attention: bool = True,
    logits: str = "last",
) -> MemoryFootprint:
    """Bytes resident during one stage (weights, KV cache, activations); arguments as in :func:`analyze`."""
    st = _validate(
        model, stage, batch, seq, dtype, weight_bits, kv_bits, kv_budget, active_experts, flash_attention, logits
    )
    head, tail = _model_ops(st)
    return _footprint(st, [*head, *_layer_ops(st), *tail])


def max_batch(
    model: ModelConfig | str,
    hardware: Hardware | str,
    *,
    seq: int = 1024,
    stage: str = "decode",
    dtype: Any = "fp16",
    weight_bits: float | None = None,
    kv_bits: float | None = None,
    kv_budget: int | None = None,
    active_experts: int | None = None,
    flash_attention: bool = True,
    logits: str = "last",
    memory_fraction: float = 1.0,
) -> int:
    """Largest batch whose :func:`memory_footprint` fits in ``memory_fraction * hardware.memory_capacity``.

    Returns 0 when not even the weights plus one sequence fit. The footprint is
    ``weights + B * (KV cache + activations of one sequence)`` (every term is linear in ``B``), so the answer is
    that line solved for ``B``, then checked against the exact footprint.
    """
    hw = resolve_hardware(hardware)
    memory_fraction = check_float("memory_fraction", memory_fraction, min_value=0.0, max_value=1.0)
    budget = memory_fraction * hw.memory_capacity
    kwargs = dict(
        stage=stage,
        seq=seq,
        dtype=dtype,
        weight_bits=weight_bits,
        kv_bits=kv_bits,
        kv_budget=kv_budget,
        active_experts=active_experts,
        flash_attention=flash_attention,
        logits=logits,
    )

    def fits(b: int) -> bool:
        return memory_footprint(model, batch=b, **kwargs).total <= budget

    one = memory_footprint(model, batch=1, **kwargs)
    if one.total > budget:
        return 0
    per_sequence = one.kv_cache + one.activations
    b = max(1, int(math.floor((budget - one.weights) / per_sequence)))
    while not fits(b):  # float rounding can put the line one step too far
        b -= 1
    while fits(b + 1):
        b += 1
    return b
