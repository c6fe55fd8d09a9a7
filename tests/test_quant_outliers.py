"""Tests of refimpl.quant's outlier handling: the FWHT against the explicit Hadamard matrix, LLM.int8()'s
decomposition against a naive float64 reference, SmoothQuant's scales and invariance, and rotations and
smoothing folded into a model (same logits)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.llm import Llama, LlamaConfig
from refimpl.quant import (
    RandomizedHadamard,
    fwht,
    hadamard_matrix,
    int8_matmul,
    llm_int8_matmul,
    outlier_channels,
    smoothquant_scales,
)
from refimpl.quant.model import (
    LINEARS,
    QuantLinear,
    collect_inputs,
    linear_weight,
    map_weights,
    quantize_activations,
    rotate,
    smooth,
)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float64) -> Llama:
    """A 2-layer random Llama (d = 48 = 3 x 16, F = 96 = 3 x 32, GQA 3/1): widths that are not powers of two,
    like SmolLM2's."""
    c = LlamaConfig(
        n_layers=2, d_model=48, n_heads=3, n_kv_heads=1, head_dim=16, ffn_dim=96, vocab_size=50,
        rope_base=10000.0, norm_eps=1e-5, max_seq_len=64,
    )  # fmt: skip
    g = torch.Generator().manual_seed(seed)

    def r(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g, dtype=dtype) * 0.3

    blocks = [
        {
            "attn_norm": 1 + r(48),
            "wqkv": r(48, 80),
            "wo": r(48, 48),
            "ffn_norm": 1 + r(48),
            "w_gate_up": r(48, 192),
            "w_down": r(96, 48),
        }
        for _ in range(2)
    ]
    return Llama(c, r(48, 50), 1 + r(48), blocks).eval()


# ----------------------------------------------------------------------------------------------------------
# Hadamard


def test_hadamard_matrix_sylvester_orthogonal() -> None:
    h = hadamard_matrix(8)
    assert torch.equal(
        h * 8**0.5,
        torch.tensor([[(-1) ** bin(i & j).count("1") for j in range(8)] for i in range(8)], dtype=torch.float64),
    )
    torch.testing.assert_close(h @ h.t(), torch.eye(8, dtype=torch.float64))


@settings(max_examples=30, deadline=None)
@given(log_n=st.integers(0, 9), lead=st.lists(st.integers(1, 3), max_size=2), seed=st.integers(0, 2**16))
def test_fwht_equals_explicit_matrix(log_n: int, lead: list[int], seed: int) -> None:
    n = 2**log_n
    x = _randn(*lead, n, seed=seed)
    torch.testing.assert_close(fwht(x), x @ hadamard_matrix(n), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("n", "block"), [(48, None), (576, None), (1536, None), (64, 8)])
def test_randomized_hadamard_is_the_orthogonal_matrix(n: int, block: int | None) -> None:
    r = RandomizedHadamard(n, seed=3, block=block)
    q = r.matrix()
    assert r.block == (block or n & -n)
    torch.testing.assert_close(q @ q.t(), torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    x = _randn(5, n)
    torch.testing.assert_close(r.rotate(x), x @ q, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r.unrotate(r.rotate(x)), x, rtol=1e-12, atol=1e-12)


def test_rotation_spreads_an_outlier() -> None:
    x = torch.zeros(1, 64, dtype=torch.float64)
    x[0, 5] = 8.0
    y = fwht(x)
    torch.testing.assert_close(y.abs(), torch.full_like(y, 1.0)), "8 / sqrt(64) everywhere"


def test_hadamard_bad_inputs() -> None:
    with pytest.raises(ValueError, match="power of two"):
        hadamard_matrix(12)
    with pytest.raises(ValueError, match="power of two"):
        fwht(torch.randn(3, 6))
    with pytest.raises(ValueError, match="block must divide n = 48"):
        RandomizedHadamard(48, block=32)
    with pytest.raises(ValueError, match="last dimension must be n = 48"):
        RandomizedHadamard(48).rotate(torch.randn(2, 40))


# ----------------------------------------------------------------------------------------------------------
# LLM.int8() and SmoothQuant


def _naive_int8_matmul(x: list[list[float]], w: list[list[float]]) -> list[list[float]]:
    """Row absmax for x, column absmax for w, integer product, rescale; Python floats."""
    sx = [max(abs(v) for v in row) / 127 for row in x]
    cols = list(zip(*w))
    sw = [max(abs(v) for v in col) / 127 for col in cols]
    cx = [[round(v / s) for v in row] for row, s in zip(x, sx)]
    cw = [[round(v / s) for v in col] for col, s in zip(cols, sw)]
    return [[sum(a * b for a, b in zip(rx, cc)) * s1 * s2 for cc, s2 in zip(cw, sw)] for rx, s1 in zip(cx, sx)]


def test_int8_matmul_matches_naive() -> None:
    x, w = _randn(6, 16, seed=1), _randn(16, 5, seed=2)
    want = torch.tensor(_naive_int8_matmul(x.tolist(), w.tolist()), dtype=torch.float64)
    torch.testing.assert_close(int8_matmul(x, w), want, rtol=1e-12, atol=1e-12)


def test_llm_int8_decomposition() -> None:
    x, w = _randn(32, 64, seed=3), _randn(64, 16, seed=4)
    x[:, [3, 40]] *= 30  # two outlier feature dimensions, in every token
    mask = outlier_channels(x, 6.0)
    assert mask.nonzero().flatten().tolist() == [3, 40]
    got = llm_int8_matmul(x, w, 6.0)
    want = x[:, mask] @ w[mask] + torch.tensor(
        _naive_int8_matmul(x[:, ~mask].tolist(), w[~mask].tolist()), dtype=torch.float64
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    exact = x @ w
    err_mixed = (got - exact).norm() / exact.norm()
    err_int8 = (int8_matmul(x, w) - exact).norm() / exact.norm()
    assert err_mixed < err_int8 / 3, "keeping the outlier dimensions in full precision removes most of the error"
    assert torch.equal(llm_int8_matmul(x, w, 1e9), int8_matmul(x, w) + x[:, :0] @ w[:0])


def test_smoothquant_scales_and_invariance() -> None:
    a = torch.tensor([1.0, 16.0, 4.0, 0.0])
    wmax = torch.tensor([1.0, 1.0, 4.0, 2.0])
    s = smoothquant_scales(a, wmax, 0.5)
    torch.testing.assert_close(s, torch.tensor([1.0, 4.0, 1.0, 1.0]))
    torch.testing.assert_close(smoothquant_scales(a, wmax, 1.0), torch.tensor([1.0, 16.0, 4.0, 1.0]))
    x, w = _randn(8, 4, seed=5), _randn(4, 3, seed=6)
    s64 = smoothquant_scales(x.abs().amax(0), w.abs().amax(1), 0.5)
    torch.testing.assert_close((x / s64) @ (s64[:, None] * w), x @ w)
    # after smoothing, the channel maxima of X and W are balanced: max|X_j / s_j| == max|s_j W_j|
    torch.testing.assert_close((x / s64).abs().amax(0), (s64[:, None] * w).abs().amax(1))
    with pytest.raises(ValueError, match="alpha"):
        smoothquant_scales(a, wmax, 1.5)
    with pytest.raises(ValueError, match="act_absmax"):
        smoothquant_scales(torch.tensor([float("nan")]), torch.ones(1))
    with pytest.raises(ValueError, match="threshold"):
        outlier_channels(x, 0.0)


# ----------------------------------------------------------------------------------------------------------
# Folding into a model: the float function is unchanged


def test_rotate_and_smooth_keep_the_logits() -> None:
    m = tiny_llama()
    ids = torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(0))
    base = m(ids)
    for online in (False, True):
        r = rotate(m, seed=1, online_down=online)
        torch.testing.assert_close(r(ids), base, rtol=1e-10, atol=1e-10)
        assert isinstance(r.blocks[0].w_down, QuantLinear) == online
    s = smooth(m, collect_inputs(m, ids), alpha=0.5)
    torch.testing.assert_close(s(ids), base, rtol=1e-10, atol=1e-10)
    assert torch.equal(m(ids), base), "the original model is untouched"


def test_rotation_shrinks_activation_outliers() -> None:
    m = tiny_llama()
    # plant an outlier channel of the residual stream: a large embedding column
    m.head[7] *= 40
    ids = torch.randint(0, 50, (1, 32), generator=torch.Generator().manual_seed(1))
    before = collect_inputs(m, ids)[0]["wqkv"]
    after = collect_inputs(rotate(m), ids)[0]["wqkv"]

    def peak(x: torch.Tensor) -> float:
        return float((x.abs().amax(1) / x.abs().median(1).values).median())

    assert peak(after) < peak(before) / 2


def test_map_weights_and_activation_quant() -> None:
    m = tiny_llama()
    ids = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(2))
    seen: list[tuple[int, str]] = []

    def double(i: int, name: str, w: torch.Tensor) -> torch.Tensor:
        seen.append((i, name))
        return 2 * w

    d = map_weights(m, double)
    assert seen == [(i, n) for i in range(2) for n in LINEARS]
    assert torch.equal(linear_weight(d, 1, "wo"), 2 * m.blocks[1].wo)
    inputs: list[torch.Tensor] = []

    def spy(x: torch.Tensor) -> torch.Tensor:
        inputs.append(x)
        return x

    torch.testing.assert_close(quantize_activations(m, spy)(ids), m(ids), rtol=0, atol=0)
    assert [t.shape[1] for t in inputs[:4]] == [48, 48, 48, 96], "one call per linear, (tokens, in)"
    r = rotate(m)
    rq = quantize_activations(map_weights(r, lambda i, n, w: w), spy)
    assert rq.blocks[0].w_down.input_rotation is not None, "the online rotation survives both transforms"
    torch.testing.assert_close(rq(ids), m(ids), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="keep the shape"):
        map_weights(m, lambda i, n, w: w[:1])
    with pytest.raises(ValueError, match="names"):
        quantize_activations(m, spy, names=["wq"])
    with pytest.raises(ValueError, match="alpha"):
        smooth(m, collect_inputs(m, ids), alpha=2.0)
