"""Tests of refimpl.attention: the tiled FlashAttention forward/backward against standard attention.

Contract (CS336 style): output, log-sum-exp and the three gradients equal the float64 reference; the autograd
function saves only Q, K, V, O, L; fully masked rows give O = 0, L = +inf and no NaN; low precision never
overflows; bad inputs raise errors naming the argument.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.attention import (
    flash_attention,
    flash_attention_backward,
    flash_attention_forward,
    llm_attention,
    naive_attention,
    online_softmax,
)
from refimpl.attention.common import causal_visible
from tests.strategies_attention import F64, attention_tilings, make_qkv, tiling_qkv

pytestmark = pytest.mark.usefixtures("one_thread")


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max(max |ref|, 1): relative error, absolute where the reference is below 1 (a gradient
    that is exactly zero in the reference, e.g. dQ with one key, has no relative scale). Infinite entries
    (the +inf log-sum-exp of a fully masked row) must match exactly."""
    assert x.shape == ref.shape
    if ref.numel() == 0:
        return 0.0
    x, ref = x.to(F64), ref.to(F64)
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(x), fin), "finite/infinite pattern differs"
    assert torch.equal(x[~fin], ref[~fin]), "infinite entries differ"
    if not fin.any():
        return 0.0
    return ((x - ref)[fin].abs().max() / ref[fin].abs().max().clamp_min(1.0)).item()


def reference(q, k, v, causal, do=None, scale=None):
    """Float64 standard attention: (O, L) and, given dO, (dQ, dK, dV) by autograd."""
    q64, k64, v64 = (t.detach().to(F64).requires_grad_() for t in (q, k, v))
    o, lse = naive_attention(q64, k64, v64, causal, scale, return_lse=True)
    if do is None:
        return o.detach(), lse.detach()
    grads = torch.autograd.grad(o, (q64, k64, v64), do.to(F64))
    return o.detach(), lse.detach(), grads


def flash_grads(q, k, v, causal, do, block_q, block_k, scale=None):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = flash_attention(q, k, v, causal, scale, block_q, block_k)
    return o.detach(), torch.autograd.grad(o, (q, k, v), do)


seeds = st.integers(0, 2**16)  # of the random inputs


# ------------------------------------------------------------------ exactness against the reference


@settings(max_examples=40, deadline=None)
@given(t=attention_tilings(min_len=1), seed=seeds, loop_order=st.sampled_from(["fa2", "fa1"]))
def test_forward_float64_matches_reference(t, seed, loop_order):
    q, k, v = tiling_qkv(t, seed=seed)
    o, lse = flash_attention_forward(q, k, v, t.causal, None, t.block_q, t.block_k, loop_order=loop_order)
    o_ref, lse_ref = reference(q, k, v, t.causal)
    assert o.dtype == F64 and lse.dtype == F64
    assert rel_err(o, o_ref) < 1e-10
    assert rel_err(lse, lse_ref) < 1e-10


@settings(max_examples=30, deadline=None)
@given(t=attention_tilings(min_len=1), seed=seeds, block_q=st.integers(2, 50), block_k=st.integers(2, 50))
def test_gradients_float64_match_reference(t, seed, block_q, block_k):
    q, k, v = tiling_qkv(t, seed=seed)
    do = torch.randn(q.shape, dtype=F64, generator=torch.Generator().manual_seed(seed + 1))
    o_ref, _, g_ref = reference(q, k, v, t.causal, do)
    # Blocks of at least two rows here (t's may have one): blocks of one row are covered by the forward test.
    o, grads = flash_grads(q, k, v, t.causal, do, block_q, block_k)
    assert rel_err(o, o_ref) < 1e-10
    for name, g, r in zip("qkv", grads, g_ref):
        assert g.shape == r.shape and g.dtype == F64
        assert rel_err(g, r) < 1e-10, f"d{name}"


@settings(max_examples=25, deadline=None)
@given(t=attention_tilings(min_len=1), seed=seeds)
def test_float32_matches_reference_to_1e5_relative(t, seed):
    q, k, v = tiling_qkv(t, dtype=torch.float32, seed=seed)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1))
    o_ref, lse_ref, g_ref = reference(q, k, v, t.causal, do)
    _, lse = flash_attention_forward(q, k, v, t.causal, None, t.block_q, t.block_k)
    o, grads = flash_grads(q, k, v, t.causal, do, t.block_q, t.block_k)
    assert o.dtype == torch.float32 and lse.dtype == torch.float32
    assert rel_err(o, o_ref) < 1e-5
    assert rel_err(lse, lse_ref) < 1e-5
    for name, g, r in zip("qkv", grads, g_ref):
        assert rel_err(g, r) < 1e-5, f"d{name}"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("group", [1, 3])
def test_gradcheck_float64(causal, group):
    q, k, v = make_qkv(1, 2 * group, 2, 6, 7, 3)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: flash_attention(a, b, c, causal, 0.7, 4, 3), (q, k, v))


def test_block_sizes_do_not_change_the_result_beyond_rounding():
    q, k, v = make_qkv(1, 2, 1, 33, 29, 8)
    outs = [flash_attention_forward(q, k, v, True, None, bq, bk)[0] for bq, bk in [(1, 1), (5, 7), (64, 64)]]
    for o in outs[1:]:
        assert rel_err(o, outs[0]) < 1e-13


def test_explicit_scale_and_backward_function_agree_with_autograd():
    q, k, v = make_qkv(2, 4, 2, 9, 12, 5)
    do = torch.randn(q.shape, dtype=F64)
    o_ref, lse_ref, g_ref = reference(q, k, v, True, do, scale=0.3)
    o, lse = flash_attention_forward(q, k, v, True, 0.3, 4, 5)
    dq, dk, dv = flash_attention_backward(q, k, v, o, lse, do, True, 0.3, 4, 5)
    assert rel_err(o, o_ref) < 1e-10 and rel_err(lse, lse_ref) < 1e-10
    for g, r in zip((dq, dk, dv), g_ref):
        assert rel_err(g, r) < 1e-10


def test_llm_attention_is_causal_flash_attention():
    q, k, v = make_qkv(2, 9, 3, 11, 11, 8, dtype=torch.float32)
    o_ref, _ = reference(q, k, v, True)
    assert rel_err(llm_attention(q, k, v), o_ref) < 1e-5
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert rel_err(llm_attention(q, k, v), sdpa) < 1e-5


@pytest.mark.model
def test_smollm2_logits_with_flash_attention_equal_the_default():
    from refimpl.llm import load_model

    model, tokenizer = load_model()
    ids = torch.tensor([tokenizer.encode("FlashAttention computes exact attention, one tile at a time, in SRAM.")])
    reference_logits = model(ids)  # default attention: torch SDPA
    for attn_fn in (llm_attention, lambda q, k, v: flash_attention(q, k, v, True, None, 4, 8)):
        logits = model(ids, attn_fn=attn_fn)
        assert logits.shape == reference_logits.shape
        assert rel_err(logits, reference_logits) < 1e-5
        assert torch.equal(logits[0].argmax(-1), reference_logits[0].argmax(-1))


# ------------------------------------------------------------------ the saved-tensor contract


def test_autograd_saves_only_inputs_output_and_logsumexp():
    q, k, v = make_qkv(1, 4, 2, 50, 60, 8, dtype=torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    o = flash_attention(q, k, v, True, None, 16, 16)
    saved = o.grad_fn.saved_tensors
    assert [tuple(t.shape) for t in saved] == [(1, 4, 50, 8), (1, 2, 60, 8), (1, 2, 60, 8), (1, 4, 50, 8), (1, 4, 50)]
    assert max(t.numel() for t in saved) < 50 * 60, "nothing as large as one head's N_q x N_k scores is kept"
    _, lse_ref = reference(q, k, v, True)
    assert rel_err(saved[4], lse_ref) < 1e-5, "the fifth saved tensor is the log-sum-exp"


def test_inference_mode_and_no_grad_work():
    q, k, v = make_qkv(1, 2, 2, 8, 8, 4)
    with torch.inference_mode():
        o = flash_attention(q, k, v, True)
    assert rel_err(o, reference(q, k, v, True)[0]) < 1e-10


# ------------------------------------------------------------------ numerical edge cases


@pytest.mark.parametrize("loop_order", ["fa2", "fa1"])
def test_fully_masked_rows_zero_output_infinite_lse_no_nan(loop_order):
    # Causal with N_q > N_k: the first N_q - N_k queries see no key (bottom-right alignment).
    n_q, n_k = 13, 5
    q, k, v = make_qkv(2, 4, 2, n_q, n_k, 8, dtype=torch.float32)
    o, lse = flash_attention_forward(q, k, v, True, None, 4, 3, loop_order=loop_order)
    dead = n_q - n_k
    assert torch.equal(o[:, :, :dead], torch.zeros_like(o[:, :, :dead]))
    assert torch.isposinf(lse[:, :, :dead]).all()
    assert torch.isfinite(lse[:, :, dead:]).all() and torch.isfinite(o).all()
    o_ref, lse_ref = reference(q, k, v, True)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(lse, lse_ref) < 1e-5  # the reference uses the same convention
    do = torch.randn(q.shape)
    _, grads = flash_grads(q, k, v, True, do, 4, 3)
    _, _, g_ref = reference(q, k, v, True, do)
    for g, r in zip(grads, g_ref):
        assert torch.isfinite(g).all() and torch.isfinite(r).all()
        assert rel_err(g, r) < 1e-5
    assert torch.equal(grads[0][:, :, :dead], torch.zeros_like(grads[0][:, :, :dead]))


def test_no_keys_at_all():
    q, k, v = make_qkv(1, 2, 1, 4, 0, 8)
    o, lse = flash_attention_forward(q, k, v, False, None, 2, 2)
    assert torch.equal(o, torch.zeros_like(o)) and torch.isposinf(lse).all()
    o_ref, lse_ref = reference(q, k, v, False)
    assert torch.equal(o_ref, o) and torch.equal(lse_ref, lse)
    _, (dq, dk, dv) = flash_grads(q, k, v, False, torch.ones_like(q), 2, 2)
    assert torch.equal(dq, torch.zeros_like(q)) and dk.shape == k.shape and dv.shape == v.shape


def test_no_queries():
    q, k, v = make_qkv(1, 2, 1, 0, 5, 8)
    o, lse = flash_attention_forward(q, k, v, True)
    assert o.shape == (1, 2, 0, 8) and lse.shape == (1, 2, 0)
    _, (dq, dk, dv) = flash_grads(q, k, v, True, torch.ones_like(q), 2, 2)
    assert torch.equal(dk, torch.zeros_like(k)) and torch.equal(dv, torch.zeros_like(v))


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 2**-10), (torch.bfloat16, 2**-7)])
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision_large_logits_do_not_overflow(dtype, tol, causal):
    # Logits far beyond float16's range (max 65504): exp(S) would overflow without the running max, and
    # S = Q K^T would already overflow if it were computed in float16.
    q, k, v = make_qkv(1, 2, 1, 40, 40, 64, dtype=dtype, seed=3, scale=60.0)
    o_ref, lse_ref = reference(q, k, v, causal)
    assert lse_ref.abs().max() > 65504 / 8, "the test must reach logits beyond float16's range"
    o, lse = flash_attention_forward(q, k, v, causal, None, 16, 16)
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
    assert rel_err(o, o_ref) < tol
    assert rel_err(lse, lse_ref) < 1e-6
    do = torch.randn(q.shape, dtype=F64).to(dtype)
    _, grads = flash_grads(q, k, v, causal, do, 16, 16)
    for g in grads:
        assert g.dtype == dtype and torch.isfinite(g).all()


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_low_precision_gradients_close_to_reference(dtype, tol):
    q, k, v = make_qkv(2, 4, 2, 30, 37, 16, dtype=dtype, seed=5)
    do = torch.randn(q.shape, dtype=F64).to(dtype)
    o_ref, _, g_ref = reference(q, k, v, True, do)
    o, grads = flash_grads(q, k, v, True, do, 8, 16)
    assert rel_err(o, o_ref) < tol
    for name, g, r in zip("qkv", grads, g_ref):
        assert g.dtype == dtype
        assert rel_err(g, r) < tol, f"d{name}"


def test_float16_naive_overflows_where_tiled_does_not():
    # Why accumulation precision matters: standard attention in float16 forms Q K^T in float16.
    q, k, v = make_qkv(1, 1, 1, 32, 32, 64, dtype=torch.float16, seed=3, scale=60.0)
    assert not torch.isfinite(naive_attention(q, k, v)).all()
    assert torch.isfinite(flash_attention(q, k, v)).all()


# ------------------------------------------------------------------ causal convention and online softmax


def test_causal_is_bottom_right_aligned():
    vis = causal_visible(torch.arange(2), torch.arange(4), 4 - 2)
    assert vis.tolist() == [[True, True, True, False], [True, True, True, True]]
    q, k, v = make_qkv(1, 1, 1, 2, 4, 4)
    o = flash_attention(q, k, v, causal=True, block_q=1, block_k=1)
    # Query 0 sees keys 0..2 only: the same as non-causal attention over the first three keys.
    o0 = naive_attention(q[:, :, :1], k[:, :, :3], v[:, :, :3])
    assert rel_err(o[:, :, :1], o0) < 1e-12


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 50), block=st.integers(1, 60), rows=st.integers(1, 4), seed=st.integers(0, 999))
def test_online_softmax_equals_softmax(n, block, rows, seed):
    x = 10 * torch.randn(rows, n, dtype=F64, generator=torch.Generator().manual_seed(seed))
    p, m, ell = online_softmax(x, block)
    assert torch.allclose(p, torch.softmax(x, -1), rtol=0, atol=1e-14)
    assert torch.equal(m, x.amax(-1))
    assert torch.allclose(m + torch.log(ell), torch.logsumexp(x, -1), rtol=0, atol=1e-12)


def test_online_softmax_all_masked_row():
    x = torch.tensor([[float("-inf")] * 3, [0.0, 1.0, float("-inf")]])
    p, m, ell = online_softmax(x, 2)
    assert torch.equal(p[0], torch.zeros(3)) and ell[0] == 0 and m[0] == float("-inf")
    assert torch.allclose(p[1], torch.softmax(x[1], -1))


# ------------------------------------------------------------------ bad inputs


def test_bad_inputs_raise_clear_errors():
    q, k, v = make_qkv(1, 4, 2, 5, 5, 8, dtype=torch.float32)
    for fn in (flash_attention, naive_attention, lambda *a, **kw: flash_attention_forward(*a, **kw)[0]):
        with pytest.raises(ValueError, match="head dim"):
            fn(q, k[..., :4], v[..., :4])
        with pytest.raises(ValueError, match="KV heads must divide query heads"):
            fn(q, k[:, :1].expand(1, 3, 5, 8), v[:, :1].expand(1, 3, 5, 8))
        with pytest.raises(ValueError, match="q must have 4 dimensions"):
            fn(q[0], k, v)
        with pytest.raises(ValueError, match="k must have 4 dimensions"):
            fn(q, k[None], v)
        with pytest.raises(ValueError, match="one device"):
            fn(q, k.to("meta"), v)
        with pytest.raises(TypeError, match="one dtype"):
            fn(q, k.double(), v.double())
        with pytest.raises(TypeError, match="dtype"):
            fn(q.int(), k.int(), v.int())
        with pytest.raises(TypeError, match="torch.Tensor"):
            fn(q.numpy(), k, v)
        with pytest.raises(ValueError, match="same shape"):
            fn(q, k, v[:, :, :4])
        with pytest.raises(ValueError, match="batch size"):
            fn(q, torch.cat([k, k]), torch.cat([v, v]))
        with pytest.raises(ValueError, match="scale must be >"):
            fn(q, k, v, scale=0.0)
        with pytest.raises(ValueError, match="scale must be finite"):
            fn(q, k, v, scale=math.inf)
    with pytest.raises(ValueError, match="block_q must be >= 1"):
        flash_attention(q, k, v, block_q=0)
    with pytest.raises(TypeError, match="block_k must be an int"):
        flash_attention(q, k, v, block_k=2.5)
    with pytest.raises(ValueError, match="loop_order must be one of"):
        flash_attention_forward(q, k, v, loop_order="fa3")
    o, lse = flash_attention_forward(q, k, v)
    with pytest.raises(ValueError, match="lse must have shape"):
        flash_attention_backward(q, k, v, o, lse[..., :3], o)
    with pytest.raises(ValueError, match="do must have the shape of q"):
        flash_attention_backward(q, k, v, o, lse, o[:, :2])
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        online_softmax(q, 0)
