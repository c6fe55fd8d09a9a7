"""CheckFree recovery: the neighbour average, the Markov-chain data, and the experiment's bookkeeping."""

from __future__ import annotations

import pytest
import torch

from refimpl.parallel import TinyGPT, average_neighbours, markov_batches, recovery_experiment, tiny_config

CONFIG = tiny_config(n_layers=3, d_model=16, n_heads=2, ffn_dim=16, vocab_size=8, max_seq_len=8)


def test_average_neighbours_is_the_mean_of_the_two_neighbours() -> None:
    model = TinyGPT(CONFIG, seed=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    average_neighbours(model, 1)
    for name, p in model.blocks[1].named_parameters():
        expected = (before[f"blocks.0.{name}"] + before[f"blocks.2.{name}"]) / 2
        assert torch.equal(p, expected)
    for name, p in model.named_parameters():
        if not name.startswith("blocks.1."):
            assert torch.equal(p, before[name])
    with pytest.raises(ValueError, match=r"lost must be an intermediate block in \[1, 1\], got 2"):
        average_neighbours(model, 2)
    with pytest.raises(ValueError, match="lost must be an intermediate block"):
        average_neighbours(model, 0)


def test_markov_batches_shape_range_and_determinism() -> None:
    a, b = markov_batches(8, 3, 4, 6, seed=2), markov_batches(8, 3, 4, 6, seed=2)
    assert a.shape == (3, 4, 7) and a.dtype == torch.long and torch.equal(a, b)
    assert int(a.min()) >= 0 and int(a.max()) < 8
    with pytest.raises(ValueError, match="seq_len must be >= 1, got 0"):
        markov_batches(8, 3, 4, 0)


def test_recovery_runs_share_the_prefix_and_the_step_budget() -> None:
    tokens = markov_batches(8, 6, 4, 8)
    res = recovery_experiment(CONFIG, tokens, fail_step=4, checkpoint_step=2, lost=1)
    runs = res.losses
    assert all(len(v) == 6 for v in runs.values())
    assert all(v[:4] == runs["no failure"][:4] for v in runs.values())
    assert runs["CheckFree"][4] != runs["no failure"][4]  # the failure changed the model
    # a checkpoint taken at the failure loses nothing: it continues exactly as if nothing had failed
    same = recovery_experiment(CONFIG, tokens, fail_step=4, checkpoint_step=4, lost=1)
    assert same.losses["checkpoint"] == same.losses["no failure"]
    with pytest.raises(ValueError, match="checkpoint_step must be <= 4, got 5"):
        recovery_experiment(CONFIG, tokens, fail_step=4, checkpoint_step=5, lost=1)
