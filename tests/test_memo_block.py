"""Tests of refimpl.memo.block: the tiled GPT block against an untiled float64 reference, counter-based
dropout, the exactness of recomputing a suffix of tiles, and bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.memo.block import (
    ACTIVATION_NAMES,
    MaskedScale,
    Tape,
    TransformerBlock,
    dropout_keep_mask,
    make_stack,
    splitmix64,
    tile_seed,
)
from tests.strategies import block_shapes

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference_block(blk: TransformerBlock, x: torch.Tensor) -> torch.Tensor:
    """Untiled pre-LN GPT layer with torch's own layer_norm, masked_fill causal mask and softmax; the dropout
    masks are the block's per-tile masks concatenated along the query/token axis."""
    s, b, h = x.shape
    a, d = blk.heads, blk.head_dim
    keep = 1.0 - blk.dropout

    def masks(site: int, shape_of_tile) -> torch.Tensor:  # noqa: ANN001
        parts = [
            dropout_keep_mask(blk.seed, site, j, shape_of_tile(hi - lo), keep)
            for j, (lo, hi) in enumerate(blk.tiles(s))
        ]
        return parts

    y = F.layer_norm(x, (h,), blk.ln1.weight, blk.ln1.bias, blk.eps)
    q, k, v = (y @ blk.qkv.weight.T + blk.qkv.bias).split(h, dim=-1)  # (s, b, h) each
    q, k, v = (t.reshape(s, b, a, d).permute(1, 2, 0, 3) for t in (q, k, v))  # (b, a, s, d)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    p = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)  # (b, a, s, s)
    if blk.dropout > 0:
        pm = torch.cat(masks(1, lambda c: (b * a, c, s)), dim=1).view(b, a, s, s)
        p = p * pm / keep
    ctx = (p @ v).permute(2, 0, 1, 3).reshape(s, b, h)
    o = ctx @ blk.proj.weight.T + blk.proj.bias
    if blk.dropout > 0:
        o = o * torch.cat(masks(2, lambda c: (c, b, h)), dim=0) / keep
    r = x + o
    z = F.layer_norm(r, (h,), blk.ln2.weight, blk.ln2.bias, blk.eps)
    m = F.gelu(z @ blk.fc1.weight.T + blk.fc1.bias) @ blk.fc2.weight.T + blk.fc2.bias
    if blk.dropout > 0:
        m = m * torch.cat(masks(3, lambda c: (c, b, h)), dim=0) / keep
    return r + m


@settings(max_examples=25, deadline=None)
@given(shape=block_shapes(), dropout=st.sampled_from([0.0, 0.1, 0.5]), seed=st.integers(0, 2**40))
def test_block_matches_untiled_reference_float64(shape, dropout, seed):
    s, b, a, d, tile = shape
    torch.manual_seed(seed % 1000)
    blk = TransformerBlock(a * d, a, dropout=dropout, tile=tile, seed=seed, dtype=torch.float64)
    x = torch.randn(s, b, a * d, dtype=torch.float64)
    torch.testing.assert_close(blk(x), _reference_block(blk, x), rtol=1e-10, atol=1e-10)


def test_block_output_does_not_depend_on_tile_without_dropout():
    torch.manual_seed(0)
    x = torch.randn(13, 2, 12, dtype=torch.float64)
    outs = []
    for tile in (1, 4, 13, 64):
        torch.manual_seed(1)
        outs.append(TransformerBlock(12, 3, dropout=0.0, tile=tile, dtype=torch.float64)(x))
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(shape=block_shapes(min_s=2), frac=st.floats(0.0, 1.0), dropout=st.sampled_from([0.0, 0.2]))
def test_recomputing_a_suffix_of_tiles_is_bit_exact(shape, frac, dropout):
    """forward_tiles(first_tile=j0, kv_prefix=...) gives the same bits as the full forward for tokens t0:, and
    the same saved tensors (this is what makes MEMO's gradients equal the baseline's)."""
    s, b, a, h, tile = shape.s, shape.b, shape.a, shape.h, shape.tile
    torch.manual_seed(0)
    blk = TransformerBlock(h, a, dropout=dropout, tile=tile)
    x = torch.randn(s, b, h)
    full = Tape()
    out = blk(x, tape=full)
    tiles = blk.tiles(s)
    j0 = int(frac * len(tiles))
    t0 = tiles[j0][0] if j0 < len(tiles) else s
    kv = None
    if j0 > 0:
        kt, v = full.entries[("kt", None)].tensor, full.entries[("v", None)].tensor
        kv = (kt[:, :, :t0].clone().transpose(1, 2), v[:, :t0].clone())
    part = Tape()
    with torch.no_grad():
        out2 = blk.forward_tiles(x.clone(), first_tile=j0, kv_prefix=kv, tape=part)
    assert torch.equal(out2, out[t0:].detach())
    for (name, tile_idx), entry in part.entries.items():
        assert torch.equal(entry.tensor, full.entries[(name, tile_idx)].tensor), (name, tile_idx)
        assert tile_idx is None or tile_idx >= j0


def test_tape_names_every_activation_once_per_tile():
    blk = TransformerBlock(8, 2, dropout=0.1, tile=3)
    tape = Tape()
    blk(torch.randn(7, 2, 8), tape=tape)
    names = {name for name, _ in tape.entries}
    assert names == set(ACTIVATION_NAMES)
    shared = {name for name, tile in tape.entries if tile is None}
    assert shared == {"x", "kt", "v"}
    assert {tile for _, tile in tape.entries if tile is not None} == {0, 1, 2}


def test_tape_rejects_a_view_that_does_not_own_its_storage():
    tape = Tape()
    big = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="storage"):
        tape.record("x", big[1:])
    with pytest.raises(ValueError, match="own its whole storage"):
        tape.record("x", big.view(-1)[:4])


def test_block_clones_an_input_view_when_taping():
    blk = TransformerBlock(8, 2, dropout=0.0, tile=4)
    base = torch.randn(10, 1, 8)
    tape = Tape()
    out = blk(base[2:], tape=tape)
    torch.testing.assert_close(out, blk(base[2:].clone()))
    assert tape.entries[("x", None)].tensor.untyped_storage().data_ptr() != base.untyped_storage().data_ptr()


# ----------------------------------------------------------------------------------------------------------
# Counter-based dropout


def test_splitmix64_matches_the_published_first_output():
    # SplitMix64 seeded with 0 first returns 0xE220A8397B1DCDAF (Vigna's reference implementation).
    assert splitmix64(0) == 0xE220A8397B1DCDAF


def test_dropout_mask_is_a_function_of_its_coordinates():
    m1 = dropout_keep_mask(3, 1, 5, (4, 7), 0.8)
    assert m1.dtype == torch.bool and m1.element_size() == 1
    torch.rand(100)  # the global generator does not matter
    assert torch.equal(m1, dropout_keep_mask(3, 1, 5, (4, 7), 0.8))
    others = [dropout_keep_mask(*args, (4, 7), 0.8) for args in ((4, 1, 5), (3, 2, 5), (3, 1, 6))]
    assert all(not torch.equal(m1, o) for o in others)
    assert len({tile_seed(3, 1, j) for j in range(1000)}) == 1000


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 1.0])
def test_dropout_mask_keeps_the_right_fraction(keep):
    n = 200_000
    frac = dropout_keep_mask(0, 0, 0, (n,), keep).float().mean().item()
    assert abs(frac - keep) <= 5 * math.sqrt(keep * (1 - keep) / n) + 1e-12


def test_masked_scale_gradient_and_saved_tensors():
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(5, 6) < 0.7
    assert torch.autograd.gradcheck(lambda t: MaskedScale.apply(t, mask, 1 / 0.7), (x,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        MaskedScale.apply(x, mask, 2.0)
    assert len(saved) == 1 and saved[0].dtype == torch.bool


# ----------------------------------------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        ({"hidden": 10, "heads": 3}, ValueError, "heads must divide hidden"),
        ({"hidden": 8, "heads": 0}, ValueError, "heads"),
        ({"hidden": 8, "heads": 2, "dropout": 1.0}, ValueError, "dropout"),
        ({"hidden": 8, "heads": 2, "tile": 0}, ValueError, "tile"),
        ({"hidden": 8, "heads": 2, "seed": -1}, ValueError, "seed"),
        ({"hidden": 8.0, "heads": 2}, TypeError, "hidden"),
    ],
)
def test_block_rejects_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        TransformerBlock(**kwargs)


def test_block_rejects_bad_input():
    blk = TransformerBlock(8, 2)
    with pytest.raises(ValueError, match="hidden size 8"):
        blk(torch.randn(4, 1, 6))
    with pytest.raises(ValueError, match="3 dimensions"):
        blk(torch.randn(4, 8))
    with pytest.raises(TypeError, match="floating"):
        blk(torch.ones(4, 1, 8, dtype=torch.int64))


def test_dropout_mask_rejects_bad_arguments():
    with pytest.raises(ValueError, match="keep_prob"):
        dropout_keep_mask(0, 0, 0, (3,), 0.0)
    with pytest.raises(ValueError, match="tile"):
        dropout_keep_mask(0, 0, -1, (3,), 0.5)


def test_make_stack_is_reproducible_and_rejects_empty():
    a, b = make_stack(2, 8, 2, seed=3), make_stack(2, 8, 2, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert [blk.seed for blk in a] == [3, 4]
    with pytest.raises(ValueError, match="n_layers"):
        make_stack(0, 8, 2)
