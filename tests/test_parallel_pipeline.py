"""Pipeline parallelism: GPipe and 1F1B schedules (as data) against their closed forms, and executed across
processes (gloo, CPU) with gradients equal to one process on the whole batch."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.parallel import (
    Action,
    bubble_fraction,
    check_schedule,
    gpipe_schedule,
    make_schedule,
    measured_bubble,
    one_f_one_b_schedule,
    pipeline_step,
    run_tasks,
    simulate,
    stage_layers,
    tiny_config,
    train_single,
)

CONFIG = tiny_config(n_layers=4, d_model=16, n_heads=2, ffn_dim=32, vocab_size=32, max_seq_len=16)


@settings(deadline=None, max_examples=40)
@given(st.integers(1, 6), st.integers(1, 10), st.sampled_from(["gpipe", "1f1b"]), st.floats(0.1, 3.0))
def test_simulated_bubble_is_the_closed_form(p: int, m: int, name: str, t_f: float) -> None:
    schedule = make_schedule(name, p, m)
    check_schedule(schedule, m)
    timeline = simulate(schedule, t_f, 2 * t_f)
    assert timeline.makespan == pytest.approx((m + p - 1) * 3 * t_f)
    assert timeline.bubble == pytest.approx(bubble_fraction(p, m), abs=1e-9)
    expected_peak = [m] * p if name == "gpipe" else [min(p - s, m) for s in range(p)]
    assert timeline.peak_in_flight == expected_peak  # 1F1B bounds activations by p - s, GPipe keeps all m


def test_schedules_written_out() -> None:
    f, b = (lambda i: Action("F", i)), (lambda i: Action("B", i))
    assert one_f_one_b_schedule(2, 3) == [[f(0), f(1), b(0), f(2), b(1), b(2)], [f(0), b(0), f(1), b(1), f(2), b(2)]]
    assert gpipe_schedule(2, 2) == [[f(0), f(1), b(0), b(1)]] * 2


def test_invalid_schedules_and_sizes_raise() -> None:
    with pytest.raises(ValueError, match="schedule deadlocks"):
        f, b = (lambda i: Action("F", i)), (lambda i: Action("B", i))
        simulate([[f(0), b(0), f(1), b(1)], [f(1), b(1), f(0), b(0)]])  # stage 1 waits for F1, stage 0 for B0
    with pytest.raises(ValueError, match=r"schedule\[0\] runs B0 before F0"):
        check_schedule([[Action("B", 0), Action("F", 0)]], 1)
    with pytest.raises(ValueError, match="num_microbatches must be >= 1, got 0"):
        gpipe_schedule(2, 0)
    with pytest.raises(ValueError, match="num_stages must divide n_layers=4, got 3"):
        stage_layers(4, 3, 0)
    with pytest.raises(ValueError, match="schedule must be one of 'gpipe', '1f1b'; got 'zb'"):
        make_schedule("zb", 2, 2)
    assert stage_layers(4, 2, 1) == (2, 4)


def _run(world: int, m: int) -> None:
    tokens = torch.randint(0, CONFIG.vocab_size, (8, 9), generator=torch.Generator().manual_seed(world))
    gpipe, ofob = run_tasks(
        world, [(pipeline_step, (CONFIG, tokens, m, "gpipe")), (pipeline_step, (CONFIG, tokens, m, "1f1b"))]
    )
    single = train_single(CONFIG, tokens[None], torch.optim.SGD, {"lr": 0.0})
    for result, name in ((gpipe, "gpipe"), (ofob, "1f1b")):
        grads = {}
        for stage in result:
            assert not set(grads) & set(stage["grads"])  # each parameter lives on one stage
            grads.update(stage["grads"])
        assert set(grads) == set(single["grads"])
        for n, g in single["grads"].items():
            torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-6, msg=f"{name} {n}")
        assert result[-1]["loss"] == pytest.approx(single["losses"][0], rel=1e-5)
        for stage, intervals in zip(make_schedule(name, world, m), [r["intervals"] for r in result]):
            assert [a for a, _, _ in intervals] == stage  # the processes ran the schedule as written
        assert 0.0 <= measured_bubble([r["intervals"] for r in result]) < 1.0


@pytest.mark.distributed
def test_pipeline_equals_single_process_2_stages() -> None:
    _run(2, 4)


@pytest.mark.distributed
def test_pipeline_equals_single_process_4_stages() -> None:
    _run(4, 2)


def test_pipeline_step_checks_tokens_before_any_communication() -> None:
    with pytest.raises(ValueError, match=r"ids must be in \[0, 32\)"):
        pipeline_step(CONFIG, torch.full((4, 9), 40), 2, "gpipe")
    with pytest.raises(ValueError, match="num_microbatches must divide the batch size 4, got 3"):
        pipeline_step(CONFIG, torch.zeros(4, 9, dtype=torch.long), 3, "gpipe")
    with pytest.raises(ValueError, match="tokens must have 2 dimensions"):
        pipeline_step(CONFIG, torch.zeros(9, dtype=torch.long), 1, "gpipe")
