"""Asynchronous snapshots: the file holds the state as it was when the snapshot was taken."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from refimpl.parallel import TinyGPT, async_snapshot, host_copy, tiny_config


def test_snapshot_is_the_state_at_snapshot_time(tmp_path: Path) -> None:
    model = TinyGPT(tiny_config(n_layers=1), seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model.loss(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long)).backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 1}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    snap = async_snapshot(state, tmp_path / "ckpt.pt")
    with torch.no_grad():  # the next update runs while the writer works
        for p in model.parameters():
            p.add_(1.0)
    assert snap.wait() >= 0 and snap.copy_s >= 0
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert loaded["step"] == 1
    for name, value in before.items():
        assert torch.equal(loaded["model"][name], value)
    exp_avg = opt.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], exp_avg)


def test_host_copy_copies_nested_containers() -> None:
    t = torch.ones(3)
    out = host_copy({"a": [t, (t, 2)], "b": "x"})
    t.add_(1)
    assert torch.equal(out["a"][0], torch.ones(3)) and isinstance(out["a"][1], tuple) and out["b"] == "x"


def test_snapshot_errors_surface(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="path must be in an existing directory"):
        async_snapshot({"x": torch.ones(1)}, tmp_path / "missing" / "ckpt.pt")
    snap = async_snapshot({"f": lambda: 0}, tmp_path / "bad.pt")  # a lambda cannot be pickled
    with pytest.raises(Exception, match="pickle|lambda"):
        snap.wait()
