"""Tests of the Triton FlashAttention kernels (refimpl.attention.triton_kernels).

Triton reads ``TRITON_INTERPRET`` once, when it is imported, so the kernel tests cannot share a process with
modules that may have imported Triton without it. On a machine without a GPU, ``test_kernels_pass_in_the_
interpreter`` runs this very file again in a fresh Python process with ``TRITON_INTERPRET=1``; there the
``test_kernel_*`` cases run on CPU tensors (small sizes: the interpreter is slow) while in the parent process
they are skipped with that reason. On a CUDA machine the cases run directly on the GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from refimpl.attention import naive_attention

ROOT = Path(__file__).resolve().parent.parent
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
CAN_RUN_KERNELS = INTERPRETED or torch.cuda.is_available()
DEVICE = "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"
kernel_case = pytest.mark.skipif(
    not CAN_RUN_KERNELS, reason="no GPU: run by test_kernels_pass_in_the_interpreter in a TRITON_INTERPRET=1 process"
)


def test_importing_refimpl_attention_does_not_import_triton():
    code = "import sys, refimpl.attention; assert 'triton' not in sys.modules, 'triton was imported'"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow  # ~20-30 s: a fresh process, and the interpreter runs every program instance in NumPy
def test_kernels_pass_in_the_interpreter():
    if CAN_RUN_KERNELS:
        pytest.skip("kernel cases run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(Path(__file__)),
        "-q",
        "-x",
        "-p",
        "no:cacheprovider",
        "-k",
        "test_kernel_",
    ]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]


# ---------------------------------------------------------------------------------- the cases themselves


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double().cpu(), ref.double().cpu()
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(x), fin) and torch.equal(x[~fin], ref[~fin])
    return ((x - ref)[fin].abs().max() / ref[fin].abs().max().clamp_min(1.0)).item() if fin.any() else 0.0


def _qkv(h_q, h_kv, n_q, n_k, d, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = scale * torch.randn(1, h_q, n_q, d, generator=g, dtype=torch.float64)
    k = scale * torch.randn(1, h_kv, n_k, d, generator=g, dtype=torch.float64)
    v = torch.randn(1, h_kv, n_k, d, generator=g, dtype=torch.float64)
    do = torch.randn(1, h_q, n_q, d, generator=g, dtype=torch.float64)
    return [t.to(dtype).to(DEVICE) for t in (q, k, v, do)]


def _reference(q, k, v, do, causal):
    q64, k64, v64 = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    o, lse = naive_attention(q64, k64, v64, causal, return_lse=True)
    return o.detach(), lse.detach(), torch.autograd.grad(o, (q64, k64, v64), do.double().cpu())


@kernel_case
@pytest.mark.parametrize(
    ("causal", "h_q", "h_kv", "n_q", "n_k", "d", "block"),
    [
        (False, 2, 2, 37, 37, 16, 16),  # ragged: 37 is not a multiple of the tile
        (True, 4, 2, 37, 37, 16, 16),  # causal + grouped-query attention
        (True, 3, 1, 20, 45, 8, 16),  # N_k > N_q (a KV cache), head dim padded 8 -> 16
        (True, 2, 1, 45, 20, 16, 32),  # N_q > N_k: the first 25 rows see no key
        (False, 1, 1, 1, 33, 16, 16),  # one query
    ],
)
def test_kernel_forward_and_backward_match_reference_float32(causal, h_q, h_kv, n_q, n_k, d, block):
    from refimpl.attention.triton_kernels import triton_flash_attention, triton_flash_attention_forward

    q, k, v, do = _qkv(h_q, h_kv, n_q, n_k, d)
    o_ref, lse_ref, g_ref = _reference(q, k, v, do, causal)
    o, lse = triton_flash_attention_forward(q, k, v, causal, None, block, block)
    assert o.dtype == torch.float32 and lse.dtype == torch.float32
    assert _rel_err(o, o_ref) < 1e-5 and _rel_err(lse, lse_ref) < 1e-5
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = triton_flash_attention(q, k, v, causal, None, block, block)
    grads = torch.autograd.grad(out, (q, k, v), do)
    for name, g, r in zip("qkv", grads, g_ref):
        assert g.shape == r.shape and torch.isfinite(g).all(), f"d{name}"
        assert _rel_err(g, r) < 1e-5, f"d{name}"
    if n_q > n_k and causal:  # fully masked rows: zero output, +inf log-sum-exp, zero gradient
        dead = n_q - n_k
        assert (o[:, :, :dead] == 0).all() and torch.isposinf(lse[:, :, :dead]).all()
        assert (grads[0][:, :, :dead] == 0).all()


@kernel_case
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 2**-10), (torch.bfloat16, 2**-7)])
def test_kernel_low_precision_large_logits(dtype, tol):
    from refimpl.attention.triton_kernels import triton_flash_attention

    q, k, v, do = _qkv(2, 1, 24, 24, 64, dtype=dtype, scale=60.0)  # logits far beyond float16's range
    o_ref, lse_ref, g_ref = _reference(q, k, v, do, True)
    assert lse_ref.abs().max() > 65504 / 8
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    o = triton_flash_attention(q, k, v, True)
    assert o.dtype == dtype and _rel_err(o, o_ref) < tol
    grads = torch.autograd.grad(o, (q, k, v), do)
    for g in grads:
        assert g.dtype == dtype and torch.isfinite(g).all()


@kernel_case
def test_kernel_batches_and_strided_inputs():
    """Batch > 1 with GQA (the kernels find each head from the sizes alone) and inputs in the (B, N, H, d) layout of
    a model's projections, viewed as (B, H, N, d) (not contiguous), with a non-contiguous incoming gradient."""
    from refimpl.attention.triton_kernels import triton_flash_attention

    g = torch.Generator().manual_seed(3)
    q, do = (torch.randn(3, 21, 4, 16, generator=g, dtype=torch.float64) for _ in range(2))  # (B, N, H_q, d)
    k, v = (torch.randn(3, 26, 2, 16, generator=g, dtype=torch.float64) for _ in range(2))  # (B, N_k, H_kv, d)
    q, k, v, do = (t.float().to(DEVICE).transpose(1, 2) for t in (q, k, v, do))
    assert not q.is_contiguous() and not do.is_contiguous()
    o_ref, _, g_ref = _reference(q, k, v, do, True)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    o = triton_flash_attention(q, k, v, True, None, 16, 16)
    assert _rel_err(o, o_ref) < 1e-5
    for name, grad, r in zip("qkv", torch.autograd.grad(o, (q, k, v), do), g_ref):
        assert grad.shape == r.shape and _rel_err(grad, r) < 1e-5, f"d{name}"


@kernel_case
def test_kernel_matches_the_pytorch_tiled_loop():
    from refimpl.attention import flash_attention_forward
    from refimpl.attention.triton_kernels import triton_flash_attention_forward

    q, k, v, _ = _qkv(4, 2, 29, 29, 16)
    o_t, lse_t = triton_flash_attention_forward(q, k, v, True)
    o_p, lse_p = flash_attention_forward(q.cpu(), k.cpu(), v.cpu(), True, None, 16, 16)
    assert _rel_err(o_t, o_p) < 1e-5 and _rel_err(lse_t, lse_p) < 1e-5


@kernel_case
def test_kernel_bad_inputs(monkeypatch):
    from refimpl.attention.triton_kernels import triton_flash_attention

    q, k, v, _ = _qkv(2, 1, 8, 8, 16)
    with pytest.raises(TypeError, match="dtype in"):
        triton_flash_attention(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="block_m must be a power of two >= 16"):
        triton_flash_attention(q, k, v, block_m=24)
    with pytest.raises(ValueError, match="KV heads must divide"):
        triton_flash_attention(q, torch.cat([k] * 3, 1)[:, :3], torch.cat([v] * 3, 1)[:, :3])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        triton_flash_attention(q.cpu(), k.cpu(), v.cpu())
