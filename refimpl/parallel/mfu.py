"""Model FLOPs utilization (MFU) and a step-time model of 3D-parallel training, as labelled model arithmetic.

MFU (Chowdhery et al. 2023, appendix B; the metric of MegaScale, Jiang et al. 2024) is the model's FLOPs per
second over the hardware's peak: with ``N`` parameters, ``L`` layers, width ``d`` and sequence length ``s``,
one training token costs ``6 N + 12 L d s`` FLOPs (forward and backward of every weight, plus the attention
scores ``Q K^T`` and ``P V``); recomputation does not count.

The step-time model adds, per GPU and iteration of a ``t x p x d`` (tensor x pipeline x data) layout with ``m``
micro-batches of ``b`` sequences:

* compute: the model FLOPs at ``compute_efficiency`` times the roofline's peak (:mod:`refimpl.roofline`);
* bubble: ``(p - 1)`` micro-batch slots (Narayanan et al. 2021, sec. 2.2.1);
* tensor parallel: 4 all-reduces of ``b s d`` activations per layer and micro-batch (2 forward, 2 backward,
  Shoeybi et al. 2019), ring cost ``2 (t - 1) / t`` bytes over NVLink;
* pipeline parallel: one ``b s d / t`` activation and one gradient per micro-batch over the network
  (Megatron's scatter/gather across the ``t`` ranks);
* data parallel: a ring all-reduce of the ``N / (t p)`` gradients over the network.

Each communication term can be marked hidden (overlapped with compute, MegaScale sec. 3.2) or exposed.
Bandwidths: ``nvlink_gbps``/``network_gbps`` of ``data/hardware.yaml``. Everything here is arithmetic on
published shapes and datasheets, not a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from refimpl._checks import check_float, check_positive_int
from refimpl.roofline.hardware import HARDWARE_YAML, load_hardware
from refimpl.roofline.models import ModelConfig, get_model, resolve_model

__all__ = [
    "GPT3_175B",
    "ParallelLayout",
    "StepTime",
    "network_bandwidths",
    "step_time",
    "training_flops_per_token",
]

#: GPT-3 175B (Brown et al. 2020, Table 2.1), its GeLU MLP written as a SwiGLU with the same parameters: the
#: ``gpt3-175b`` entry of :func:`refimpl.roofline.get_model`.
GPT3_175B = get_model("gpt3-175b")


def training_flops_per_token(model: ModelConfig | str, seq_len: int) -> float:
    """``6 N + 12 L d s``: model FLOPs of one training token (Chowdhery et al. 2023, appendix B)."""
    cfg = resolve_model(model)
    s = check_positive_int("seq_len", seq_len)
    return 6.0 * cfg.n_params() + 12.0 * cfg.n_layers * cfg.q_dim * s


def network_bandwidths(hardware: str) -> tuple[float, float]:
    """``(nvlink, network)`` bytes/s per GPU, one direction, from ``data/hardware.yaml``."""
    with open(HARDWARE_YAML, encoding="utf-8") as f:
        entry = yaml.safe_load(f).get(hardware, {})
    if "nvlink_gbps" not in entry or "network_gbps" not in entry:
        raise ValueError(f"hardware must have nvlink_gbps and network_gbps in data/hardware.yaml, got {hardware!r}")
    return float(entry["nvlink_gbps"]) * 1e9, float(entry["network_gbps"]) * 1e9


@dataclass(frozen=True)
class ParallelLayout:
    """``tensor x pipeline x data`` GPUs; ``global_batch`` sequences of ``seq_len`` per step in micro-batches of
    ``micro_batch``; ``m = global_batch / (data * micro_batch)`` micro-batches per pipeline."""

    tensor: int
    pipeline: int
    data: int
    global_batch: int
    micro_batch: int
    seq_len: int

    def __post_init__(self) -> None:
        for name in ("tensor", "pipeline", "data", "global_batch", "micro_batch", "seq_len"):
            check_positive_int(name, getattr(self, name))
        if self.global_batch % (self.data * self.micro_batch):
            raise ValueError(
                f"global_batch must be a multiple of data x micro_batch = {self.data * self.micro_batch}, "
                f"got {self.global_batch}"
            )

    @property
    def gpus(self) -> int:
        return self.tensor * self.pipeline * self.data

    @property
    def microbatches(self) -> int:
        return self.global_batch // (self.data * self.micro_batch)


@dataclass(frozen=True)
class StepTime:
    """Seconds per iteration and GPU, by term; ``mfu`` = compute at peak / ``total``."""

    compute: float
    bubble: float
    tensor: float
    pipeline: float
    data: float
    ideal: float  # the model FLOPs at 100 % of peak

    @property
    def total(self) -> float:
        return self.compute + self.bubble + self.tensor + self.pipeline + self.data

    @property
    def mfu(self) -> float:
        return self.ideal / self.total


def step_time(
    model: ModelConfig | str,
    layout: ParallelLayout,
    hardware: str = "a100-80gb",
    *,
    compute_efficiency: float = 1.0,
    hidden: tuple[str, ...] = (),
    dtype: str = "bf16",
    bytes_per_value: int = 2,
) -> StepTime:
    """The step-time model of the module docstring; communication terms named in ``hidden`` cost nothing.

    Raises ``ValueError`` if ``layout.tensor`` does not divide the heads, ``layout.pipeline`` the layers, or
    ``hidden`` names a term other than ``"tensor"``, ``"pipeline"``, ``"data"``.
    """
    cfg = resolve_model(model)
    eff = check_float("compute_efficiency", compute_efficiency, min_value=0.0, max_value=1.0, min_inclusive=False)
    for term in hidden:
        if term not in ("tensor", "pipeline", "data"):
            raise ValueError(f"hidden must name 'tensor', 'pipeline' or 'data', got {term!r}")
    t, p, d = layout.tensor, layout.pipeline, layout.data
    if cfg.n_heads % t:
        raise ValueError(f"layout.tensor must divide n_heads={cfg.n_heads}, got {t}")
    if cfg.n_layers % p:
        raise ValueError(f"layout.pipeline must divide n_layers={cfg.n_layers}, got {p}")
    peak = load_hardware(hardware).peak(dtype)
    nvlink, network = network_bandwidths(hardware)
    m, b, s = layout.microbatches, layout.micro_batch, layout.seq_len
    tokens_per_gpu = layout.global_batch * s / layout.gpus
    ideal = training_flops_per_token(cfg, s) * tokens_per_gpu / peak
    compute = ideal / eff
    bubble = (p - 1) * compute / m  # (p - 1) slots of one micro-batch's forward + backward
    act = b * s * cfg.d_model * bytes_per_value  # one micro-batch's activations at a layer boundary
    tensor = m * (cfg.n_layers // p) * 4 * (2 * (t - 1) / t * act / nvlink) if t > 1 else 0.0
    pipeline = m * 2 * (act / t) / network if p > 1 else 0.0
    grads = cfg.n_params() / (t * p) * bytes_per_value
    data = 2 * (d - 1) / d * grads / network if d > 1 else 0.0
    return StepTime(
        compute=compute,
        bubble=bubble,
        tensor=0.0 if "tensor" in hidden else tensor,
        pipeline=0.0 if "pipeline" in hidden else pipeline,
        data=0.0 if "data" in hidden else data,
        ideal=ideal,
    )
