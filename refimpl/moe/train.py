"""A synthetic task on which routing matters, and a short training loop that records what the routers do.

The task is a mixture of regression problems ("skills"): an input comes from one of ``K`` Gaussian clusters and
its target is that cluster's own random two-layer teacher network applied to it. A model that sends each
cluster to an expert of its own can fit every teacher; one that sends several clusters to one expert must
share that expert among them, and tokens dropped for capacity keep only the residual path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from refimpl._checks import check_float, check_int, check_positive_int
from refimpl.moe.layer import MoEStack
from refimpl.moe.losses import router_z_loss

__all__ = ["ClusterTask", "TrainConfig", "TrainHistory", "train_moe"]


@dataclass(frozen=True)
class ClusterTask:
    """``K`` clusters in ``R^d_in``, each with its own teacher: ``y = tanh(x A_c) B_c`` for an input of cluster ``c``.

    Build with :meth:`make`; draw batches with :meth:`sample`.
    """

    centers: Tensor  # (K, d_in)
    teacher_a: Tensor  # (K, d_in, d_t)  A_c
    teacher_b: Tensor  # (K, d_t, d_out)  B_c
    noise: float

    @classmethod
    def make(
        cls, n_clusters: int, d_in: int, d_out: int, *, d_teacher: int = 32, noise: float = 0.5, seed: int = 0
    ) -> ClusterTask:
        """A task with ``n_clusters`` clusters (standard-normal centers, spread ``noise``)."""
        n_clusters = check_positive_int("n_clusters", n_clusters)
        d_in, d_out = check_positive_int("d_in", d_in), check_positive_int("d_out", d_out)
        d_teacher = check_positive_int("d_teacher", d_teacher)
        noise = check_float("noise", noise, min_value=0.0)
        g = torch.Generator().manual_seed(check_int("seed", seed))
        centers = torch.randn(n_clusters, d_in, generator=g)
        a = torch.randn(n_clusters, d_in, d_teacher, generator=g) / d_in**0.5
        b = torch.randn(n_clusters, d_teacher, d_out, generator=g) / d_teacher**0.5
        return cls(centers, a, b, noise)

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """``n`` examples: ``(x (n, d_in), y (n, d_out), cluster (n,))``, clusters uniform."""
        k, d_in = self.centers.shape
        cluster = torch.randint(0, k, (n,), generator=generator)
        x = self.centers[cluster] + self.noise * torch.randn(n, d_in, generator=generator)
        hidden = torch.tanh(torch.einsum("nd,ndt->nt", x, self.teacher_a[cluster]))
        return x, torch.einsum("nt,nto->no", hidden, self.teacher_b[cluster]), cluster


@dataclass
class TrainConfig:
    """Sizes and router options of one training run (``layer`` options go to every MoE layer)."""

    steps: int = 200
    batch: int = 512
    lr: float = 3e-3
    n_layers: int = 2
    seed: int = 0
    layer: dict = field(default_factory=dict)


@dataclass
class TrainHistory:
    """Per-step records of a run.

    Attributes:
        loss: ``(steps,)`` task loss (MSE) per step.
        aux: ``(steps,)`` auxiliary loss (balance + z) summed over layers.
        tokens_per_expert: ``(steps, E)`` assignments each expert of the first layer computed.
        requested_per_expert: ``(steps, E)`` assignments the first layer's router sent to each expert, before
            capacity drops.
        dropped_fraction: ``(steps,)`` fraction of requested assignments dropped, over all layers.
        real_per_token: ``(steps,)`` mean real experts per token, over all layers.
        router_z: ``(steps,)`` mean squared log-sum-exp of the first layer's router logits (what z-loss
            penalizes, recorded whether or not it is trained against).
        eval_loss: task loss on a fixed held-out batch after training.
        model: the trained :class:`~refimpl.moe.layer.MoEStack`.
    """

    loss: Tensor
    aux: Tensor
    tokens_per_expert: Tensor
    requested_per_expert: Tensor
    dropped_fraction: Tensor
    real_per_token: Tensor
    router_z: Tensor
    eval_loss: float
    model: MoEStack


def train_moe(task: ClusterTask, config: TrainConfig) -> TrainHistory:
    """Train an :class:`~refimpl.moe.layer.MoEStack` on ``task`` with Adam and record routing statistics.

    Deterministic for a given ``config.seed`` on the CPU.
    """
    steps = check_positive_int("steps", config.steps)
    torch.manual_seed(config.seed)
    d_in, d_out = task.centers.shape[1], task.teacher_b.shape[2]
    model = MoEStack(d_in, d_out, config.n_layers, **config.layer)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    data = torch.Generator().manual_seed(config.seed + 1)
    loss_t, aux_t, drop_t, real_t, z_t, tpe, rpe = [], [], [], [], [], [], []
    for _ in range(steps):
        x, y, _ = task.sample(config.batch, data)
        pred, auxes = model(x)
        loss = torch.mean((pred - y) ** 2)
        aux = sum(a.aux_loss for a in auxes)
        opt.zero_grad(set_to_none=True)
        (loss + aux).backward()
        opt.step()
        loss_t.append(loss.item())
        aux_t.append(float(aux.detach()) if torch.is_tensor(aux) else float(aux))
        drop_t.append(sum(a.dropped for a in auxes) / max(sum(a.requested for a in auxes), 1))
        real_t.append(sum(a.real_per_token for a in auxes) / len(auxes))
        tpe.append(auxes[0].tokens_per_expert)
        rpe.append(auxes[0].requested_per_expert)
        z_t.append(float(router_z_loss(auxes[0].router_logits.detach(), 1.0)))
    with torch.no_grad():
        x, y, _ = task.sample(4096, torch.Generator().manual_seed(10_000 + config.seed))
        eval_loss = float(torch.mean((model(x)[0] - y) ** 2))
    return TrainHistory(
        loss=torch.tensor(loss_t),
        aux=torch.tensor(aux_t),
        tokens_per_expert=torch.stack(tpe),
        requested_per_expert=torch.stack(rpe),
        dropped_fraction=torch.tensor(drop_t),
        real_per_token=torch.tensor(real_t),
        router_z=torch.tensor(z_t),
        eval_loss=eval_loss,
        model=model,
    )
