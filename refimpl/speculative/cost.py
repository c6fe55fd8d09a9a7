"""What speculation buys: the expected speed-up (Leviathan et al. 2023, sec. 3.3-3.5) and its roofline.

With acceptance rate ``alpha`` (each draft accepted independently with probability ``alpha``), ``gamma`` drafts
and a draft that costs ``c`` target forwards per token, one step emits ``E = (1 - alpha^(gamma+1)) / (1 - alpha)``
tokens (eq. 1) for the time of ``gamma`` draft forwards and one target forward over ``gamma + 1`` tokens. If
that forward costs ``v`` single-token forwards, the wall-clock speed-up over plain decoding is

    speedup = E / (gamma * c + v)            (Theorem 3.8 is the case v = 1)

Decode is memory-bound, so on a GPU ``v`` stays near 1 until the ``gamma + 1`` tokens per sequence (times the
batch) reach the ridge point; then verification costs as much as ``gamma + 1`` decode steps and speculation stops
paying. Long contexts delay that point: attention reads each sequence's KV cache once however many tokens
verify against it. :func:`roofline_speedup` computes ``c`` and ``v`` from the roofline analyzer (model arithmetic).
"""

from __future__ import annotations

from dataclasses import replace

from refimpl._checks import check_float, check_int
from refimpl.roofline import ModelConfig, Workload, analyze, get_model
from refimpl.speculative.verify import expected_tokens_per_step

__all__ = ["TINYLLAMA_1B", "best_gamma", "expected_speedup", "predicted_cache_ttft", "roofline_speedup", "verify_time"]

#: A 1B-class draft for Llama-2-7B with the same tokenizer (TinyLlama-1.1B, Zhang et al. 2024): the
#: ``tinyllama-1.1b`` entry of :func:`refimpl.roofline.get_model`.
TINYLLAMA_1B = get_model("tinyllama-1.1b")


def expected_speedup(alpha: float, gamma: int, c: float, v: float = 1.0) -> float:
    """``E(alpha, gamma) / (gamma * c + v)``: speed-up of speculative over plain decoding (see module docstring).

    ``c``: a draft token's cost in target forwards (0 for prompt lookup); ``v``: cost of verifying ``gamma + 1``
    tokens in single-token forwards. Raises ``ValueError`` for ``alpha`` outside [0, 1], ``c < 0`` or ``v <= 0``.
    """
    c = check_float("c", c, min_value=0.0)
    v = check_float("v", v, min_value=0.0, min_inclusive=False)
    return expected_tokens_per_step(alpha, gamma) / (check_int("gamma", gamma, min_value=0) * c + v)


def best_gamma(alpha: float, c: float, v_of: list[float]) -> int:
    """The draft length ``gamma`` in ``0 .. len(v_of) - 1`` that maximizes :func:`expected_speedup`, with
    ``v_of[gamma]`` the measured (or modelled) cost of verifying ``gamma + 1`` tokens."""
    if not v_of:
        raise ValueError("v_of must hold the verification cost of at least gamma = 0")
    return max(range(len(v_of)), key=lambda g: expected_speedup(alpha, g, c, v_of[g]))


def _decode_workload(workload: Workload) -> Workload:
    """``workload`` if it is a decode :class:`~refimpl.roofline.Workload`; else ``TypeError``/``ValueError``."""
    if not isinstance(workload, Workload):
        raise TypeError(f"workload must be a refimpl.roofline.Workload, got {type(workload).__name__}")
    if workload.stage != "decode":
        raise ValueError(f"workload must be a decode workload (stage='decode'), got stage={workload.stage!r}")
    return workload


def verify_time(target: ModelConfig | str, hardware: str, k: int, workload: Workload = Workload()) -> float:
    """Roofline seconds of one target forward over ``k`` new tokens per sequence of a decode ``workload``
    (:class:`refimpl.roofline.Workload`, default: one sequence at context 1024 in fp16; its dtype, weight and KV
    bits apply as in :func:`refimpl.roofline.analyze`).

    Every operator but attention is costed as a decode step of ``workload.batch * k`` rows; attention reads each
    sequence's KV cache once, as in a decode step at ``workload.batch`` (its FLOPs grow ``k``-fold but stay far
    below the ridge point at these sizes). ``k = 1`` is a decode step. Model arithmetic, not a measurement.
    Raises ``ValueError`` for ``k < 1`` or a workload whose stage is not ``"decode"``.
    """
    k = check_int("k", k, min_value=1)
    one = analyze(target, hardware, _decode_workload(workload))
    if k == 1:
        return one.time
    wide = analyze(target, hardware, replace(workload, batch=workload.batch * k))
    return wide.time - wide.time_by_operator()["attention"] + one.time_by_operator()["attention"]


def roofline_speedup(
    target: ModelConfig | str,
    draft: ModelConfig | str,
    hardware: str,
    alpha: float,
    gamma: int,
    workload: Workload = Workload(),
) -> float:
    """Predicted speed-up of ``draft`` + ``target`` over plain decoding of ``target`` on ``hardware``:
    :func:`expected_speedup` with ``c`` a draft decode step and ``v`` a :func:`verify_time` of ``gamma + 1``
    tokens, both relative to a target decode step of the same decode ``workload`` (batch, context, precisions;
    default: one sequence at context 1024 in fp16). Model arithmetic."""
    gamma = check_int("gamma", gamma, min_value=0)
    t1 = verify_time(target, hardware, 1, workload)
    td = verify_time(draft, hardware, 1, workload)
    return expected_speedup(alpha, gamma, td / t1, verify_time(target, hardware, gamma + 1, workload) / t1)


def predicted_cache_ttft(
    base: ModelConfig | str, auxiliary: ModelConfig | str, hardware: str, seq: int
) -> dict[str, float]:
    """Time to first token with the base model's prefill, and with its KV cache predicted from a smaller model
    (KV Prediction, Horton et al. 2024): roofline seconds, fp16, one sequence of ``seq`` prompt tokens.

    ``prefill``: the base model's prefill. ``predicted``: the auxiliary model's prefill, plus the predictor (per
    base layer one linear map from an auxiliary layer's keys and values to the base layer's, ``2 * 2 *
    kv_aux * kv_base`` FLOPs per token and layer, at the compute peak), plus one base decode step over the
    predicted cache for the first token. Returns ``{"prefill", "predicted", "predictor"}``. Model arithmetic;
    the quality cost of a predicted cache is not modelled.
    """
    seq = check_int("seq", seq, min_value=1)
    b = get_model(base) if isinstance(base, str) else base
    a = get_model(auxiliary) if isinstance(auxiliary, str) else auxiliary
    prefill = analyze(b, hardware, Workload(stage="prefill", seq=seq))
    kv_base, kv_aux = b.n_kv_heads * b.head_dim, a.n_kv_heads * a.head_dim
    predictor = seq * b.n_layers * 2 * 2 * kv_aux * kv_base / prefill.peak_flops
    first = analyze(b, hardware, Workload(stage="decode", seq=seq)).time
    aux = analyze(a, hardware, Workload(stage="prefill", seq=seq)).time
    return {"prefill": prefill.time, "predicted": aux + predictor + first, "predictor": predictor}
