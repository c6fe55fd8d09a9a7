"""Tests of refimpl.memo.ledger: the saved_tensors_hooks ledger of one block against the exact closed form and
Korthikanti et al.'s formula, and the Ledger's reference counting, peaks and capacities."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.memo.block import ACTIVATION_NAMES, TransformerBlock
from refimpl.memo.ledger import (
    KORTHIKANTI_TERMS,
    Account,
    Ledger,
    OutOfMemoryError,
    block_activation_bytes,
    korthikanti_activation_bytes,
)
from refimpl.memo.strategies import KeepAll, forward_stack
from tests.strategies import block_shapes

pytestmark = pytest.mark.usefixtures("one_thread")

STATS = ("ln1_mean", "ln1_rstd", "ln2_mean", "ln2_rstd")


def _ledger_of_one_block(s, b, h, a, *, dtype, dropout, tile, ffn=None):  # noqa: ANN001, ANN202
    torch.manual_seed(0)
    blk = TransformerBlock(h, a, ffn_hidden=ffn, dropout=dropout, tile=tile, dtype=dtype)
    x = torch.randn(s, b, h, dtype=dtype, requires_grad=True)
    ledger = Ledger()
    out = forward_stack([blk], x, KeepAll(), ledger)
    return ledger, out


@settings(max_examples=25, deadline=None)
@given(
    shape=block_shapes(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    dropout=st.sampled_from([0.0, 0.1]),
    ffn=st.sampled_from([None, 5]),
)
def test_ledger_equals_exact_formula_by_tensor(shape, dtype, dropout, ffn):
    s, b, a, h, tile = shape.s, shape.b, shape.a, shape.h, shape.tile
    ledger, out = _ledger_of_one_block(s, b, h, a, dtype=dtype, dropout=dropout, tile=tile, ffn=ffn)
    e = torch.finfo(dtype).bits // 8
    want = block_activation_bytes(s, b, h, a, ffn_hidden=ffn, dropout=dropout > 0, act_bytes=e)
    assert "unnamed" not in ledger.by_name  # every saved tensor is one the block announced
    assert ledger.by_name == want
    assert ledger.device.live == ledger.device.peak == sum(want.values())
    del out
    assert ledger.device.live == 0  # freeing the graph frees the activations


def test_bf16_ledger_is_korthikanti_formula_plus_layernorm_statistics():
    s, b, h, a = 32, 2, 16, 4
    ledger, _ = _ledger_of_one_block(s, b, h, a, dtype=torch.bfloat16, dropout=0.1, tile=8)
    paper = korthikanti_activation_bytes(s, b, h, a)
    assert paper == s * b * h * (34 + 5 * a * s / h)
    stats = sum(ledger.by_name[n] for n in STATS)
    assert stats == 4 * s * b * 2  # four (s, b, 1) tensors, bf16 on the CPU
    assert ledger.device.peak - stats == paper


@settings(max_examples=50, deadline=None)
@given(s=st.integers(1, 10**6), b=st.integers(1, 64), a=st.integers(1, 128), d=st.integers(1, 256))
def test_exact_formula_reduces_to_the_paper_at_its_assumptions(s, b, a, d):
    h = a * d
    exact = block_activation_bytes(s, b, h, a, act_bytes=2, mask_bytes=1)
    assert sum(v for k, v in exact.items() if k not in STATS) == korthikanti_activation_bytes(s, b, h, a)
    assert korthikanti_activation_bytes(s, b, h, a, flash_attention=True) == 34 * s * b * h
    # The five s^2 terms are exactly the softmax output, its mask and the dropout output.
    assert exact["p"] + exact["p_mask"] + exact["p_drop"] == 5 * a * s * s * b


def test_every_activation_has_a_paper_term():
    assert set(KORTHIKANTI_TERMS) == set(ACTIVATION_NAMES)


def test_formula_rejects_bad_arguments():
    with pytest.raises(ValueError, match="s must be >= 1"):
        korthikanti_activation_bytes(0, 1, 8, 2)
    with pytest.raises(TypeError, match="act_bytes"):
        block_activation_bytes(4, 1, 8, 2, act_bytes=2.5)


# ----------------------------------------------------------------------------------------------------------
# The Ledger itself


def test_ledger_reference_counts_keys_and_tracks_peaks():
    led = Ledger()
    led.acquire("a", 100)
    led.acquire("a", 100)  # a second holder of the same storage: counted once
    led.acquire("b", 50)
    assert led.device.live == 150 and led.device.peak == 150
    led.release("a")
    assert led.device.live == 150  # one holder left
    led.release("a")
    assert led.device.live == 50
    led.release("a")  # not held: no-op
    led.acquire("h", 70, "host")
    assert (led.device.live, led.host.live, led.host.peak) == (50, 70, 70)
    assert led.timeline[-1] == (50, 70)
    led.reset_peaks()
    assert led.device.peak == 50 and led.timeline == [(50, 70)]


def test_ledger_capacities_raise_out_of_memory():
    led = Ledger(device_capacity=100, host_capacity=10)
    led.acquire("a", 60)
    with pytest.raises(OutOfMemoryError, match="device capacity exceeded"):
        led.acquire("b", 50)
    with pytest.raises(OutOfMemoryError, match="host_capacity=10"):
        led.acquire("h", 11, "host")
    assert led.device.live == 60 and led.host.live == 0
    # an account is a snapshot: it does not change with the ledger afterwards
    before = led.device
    led.release("a")
    assert before == Account(live=60, peak=60, capacity=100) == led.account("device")._replace(live=60)
    assert led.device == Account(live=0, peak=60, capacity=100) and led.host == Account(0, 0, 10)


def test_ledger_rejects_bad_arguments():
    with pytest.raises(ValueError, match="where"):
        Ledger().acquire("a", 1, "disk")
    with pytest.raises(ValueError, match="where"):
        Ledger().account("disk")
    with pytest.raises(ValueError, match="nbytes"):
        Ledger().acquire("a", -1)
    with pytest.raises(ValueError, match="device_capacity"):
        Ledger(device_capacity=-5)
