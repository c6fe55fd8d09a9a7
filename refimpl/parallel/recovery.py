"""Recovering a lost pipeline stage without a checkpoint (CheckFree, Blagoev et al. 2025).

When the process holding an intermediate pipeline stage fails, its weights are gone. Checkpointing restores
every stage from the last checkpoint, losing the steps since. CheckFree (sec. 3) instead rebuilds the lost stage
``s`` from its two neighbours, ``W_s <- (W_{s-1} + W_{s+1}) / 2``, and keeps training: adjacent transformer layers
are similar enough that the average is a far better start than random weights. The paper weights the two
neighbours; this implementation uses the plain average. A stage is one block here.

:func:`recovery_experiment` trains :class:`~refimpl.parallel.model.TinyGPT` on a synthetic Markov-chain language,
loses one block, and continues from three starts: CheckFree's average, a random re-initialization, and the
last checkpoint (all weights and Adam state rolled back).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from refimpl._checks import check_int, check_positive_int
from refimpl.llm.config import LlamaConfig
from refimpl.parallel.model import GPTBlock, TinyGPT

__all__ = ["RecoveryResult", "average_neighbours", "markov_batches", "recovery_experiment"]


@torch.no_grad()
def average_neighbours(model: TinyGPT, lost: int) -> None:
    """CheckFree: overwrite block ``lost`` with the mean of blocks ``lost - 1`` and ``lost + 1`` (in place).

    Raises ``ValueError`` unless ``lost`` is an intermediate block (the first and last have one neighbour).
    """
    n = len(model.blocks)
    lost = check_int("lost", lost, min_value=0)
    if not 0 < lost < n - 1:
        raise ValueError(f"lost must be an intermediate block in [1, {n - 2}], got {lost}")
    before, after = model.blocks[lost - 1], model.blocks[lost + 1]
    for name, p in model.blocks[lost].named_parameters():
        p.copy_((before.get_parameter(name) + after.get_parameter(name)) / 2)


def markov_batches(vocab_size: int, steps: int, batch: int, seq_len: int, seed: int = 0) -> Tensor:
    """``(steps, batch, seq_len + 1)`` token batches from a random second-order Markov chain: the next token
    depends on the previous two, each pair having two likely successors. Predicting it needs attention to the
    token before the last, so the blocks, not only the embedding and head, carry what the model learns."""
    g = torch.Generator().manual_seed(check_int("seed", seed))
    v = check_positive_int("vocab_size", vocab_size)
    logits = torch.randn(v * v, v, generator=g)
    logits[torch.arange(v * v)[:, None], torch.randint(0, v, (v * v, 2), generator=g)] += 6.0
    probs = logits.softmax(-1)  # (V^2, V): row a V + b is P(next | previous two = a, b)
    n = check_positive_int("steps", steps) * check_positive_int("batch", batch)
    tokens = torch.empty(n, check_positive_int("seq_len", seq_len) + 1, dtype=torch.long)
    tokens[:, :2] = torch.randint(0, v, (n, 2), generator=g)
    for t in range(1, seq_len):
        tokens[:, t + 1] = torch.multinomial(probs[tokens[:, t - 1] * v + tokens[:, t]], 1, generator=g)[:, 0]
    return tokens.view(steps, batch, seq_len + 1)


@dataclass(frozen=True)
class RecoveryResult:
    """Training loss per step for each run (``"no failure"``, ``"CheckFree"``, ``"random re-init"``,
    ``"checkpoint"``); the failure happens before step ``fail_step``, the checkpoint was taken before
    ``checkpoint_step``."""

    losses: dict[str, list[float]]
    fail_step: int
    checkpoint_step: int


def _step(model: TinyGPT, opt: torch.optim.Optimizer, batch: Tensor) -> float:
    opt.zero_grad()
    logits = model(batch[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    return loss.item()


def recovery_experiment(
    config: LlamaConfig,
    tokens: Tensor,
    *,
    fail_step: int,
    checkpoint_step: int,
    lost: int,
    lr: float = 3e-3,
    seed: int = 0,
) -> RecoveryResult:
    """Train on ``tokens: (steps, B, T + 1)`` with Adam; before ``fail_step`` lose block ``lost`` and recover.

    The checkpoint run restarts from the state before ``checkpoint_step`` and redoes the batches from there; the
    others continue with the batches after ``fail_step``. Every run takes ``steps`` optimizer steps in all.
    """
    steps = tokens.shape[0]
    fail_step = check_int("fail_step", fail_step, min_value=1, max_value=steps - 1)
    checkpoint_step = check_int("checkpoint_step", checkpoint_step, min_value=0, max_value=fail_step)
    model = TinyGPT(config, seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    shared: list[float] = []
    saved = None
    for i in range(fail_step):
        if i == checkpoint_step:
            saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
        shared.append(_step(model, opt, tokens[i]))
    if saved is None:  # checkpoint_step == fail_step
        saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    state = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))

    def resume(model_state: dict, opt_state: dict, lose: str | None, start: int) -> list[float]:
        """``steps - fail_step`` more steps from batch ``start`` (the same budget for every run)."""
        m = TinyGPT(config, seed)
        m.load_state_dict(model_state)
        o = torch.optim.Adam(m.parameters(), lr=lr)
        o.load_state_dict(opt_state)
        if lose == "checkfree":
            average_neighbours(m, lost)
        elif lose == "random":
            fresh = GPTBlock(config, torch.Generator().manual_seed(seed + 1000))
            m.blocks[lost].load_state_dict(fresh.state_dict())
        if lose is not None:  # the lost stage's optimizer state is gone too
            for p in m.blocks[lost].parameters():
                o.state.pop(p, None)
        return [_step(m, o, tokens[i]) for i in range(start, start + steps - fail_step)]

    losses = {
        "no failure": shared + resume(*state, None, fail_step),
        "CheckFree": shared + resume(*state, "checkfree", fail_step),
        "random re-init": shared + resume(*state, "random", fail_step),
        "checkpoint": shared + resume(*saved, None, checkpoint_step),
    }
    return RecoveryResult(losses, fail_step, checkpoint_step)
