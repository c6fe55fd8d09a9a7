"""``refimpl.llm.matvec``: the decode step's ``x @ W`` in C, against float64 and against ``x @ w`` itself."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.llm import matvec as mv
from refimpl.llm.matvec import MAX_ROWS, blas_only, kernel_available, kernel_matvec, matvec

needs_kernel = pytest.mark.skipif(not kernel_available(), reason="no C compiler with OpenMP here")


def _float64_bound(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x @ w`` in float64 and a float32 rounding bound for any summation order: ``n eps |x| @ |w|``."""
    exact = x.double() @ w.double()
    bound = w.shape[0] * torch.finfo(torch.float32).eps * (x.double().abs() @ w.double().abs())
    return exact, bound + 1e-30


def test_the_kernel_is_built_where_there_is_a_c_compiler() -> None:
    if sys.platform != "linux" or shutil.which("cc") is None:
        pytest.skip("the kernel is built with cc -fopenmp on Linux")
    assert kernel_available(), "cc is installed, yet the matvec kernel was not built: the decoder runs on the BLAS"


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    n_in=st.integers(1, 70),
    n_out=st.integers(1, 100),
    seed=st.integers(0, 2**31 - 1),
)
def test_matvec_equals_the_float64_product_within_rounding(lead: list[int], n_in: int, n_out: int, seed: int) -> None:
    """Any leading shape with 1..MAX_ROWS rows, widths that are and are not multiples of 4 (rows of w taken four
    at a time) or 16 (columns split between threads)."""
    g = torch.Generator().manual_seed(seed)
    shape = (*lead, n_in) if lead else (1, n_in)
    x = torch.randn(shape, generator=g)
    w = torch.randn(n_in, n_out, generator=g)
    y = matvec(x, w)
    exact, bound = _float64_bound(x, w)
    assert y.shape == (*shape[:-1], n_out) and y.dtype == torch.float32
    assert ((y.double() - exact).abs() <= bound).all()


@needs_kernel
def test_a_rows_result_does_not_depend_on_the_batch_or_the_thread_count() -> None:
    """Each output sums the same terms in the same order: bit-identical alone, in a batch, on 1 to 4 threads."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(MAX_ROWS, 579, generator=g), torch.randn(579, 2085, generator=g)  # > 2 chunks of 1024
    batched = matvec(x, w)
    exact, bound = _float64_bound(x, w)
    assert ((batched.double() - exact).abs() <= bound).all()
    alone = torch.cat([matvec(x[i : i + 1], w) for i in range(MAX_ROWS)])
    assert torch.equal(batched, alone)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3, 4):  # one thread does both halves of W in turn; more share the columns of each half
            torch.set_num_threads(n)
            assert torch.equal(matvec(x, w), batched), f"{n} threads"
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_the_kernel_differs_from_the_blas_only_by_rounding() -> None:
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 576, generator=g), torch.randn(576, 1536, generator=g)
    with blas_only():
        blas = matvec(x, w)
    assert torch.equal(blas, x @ w)
    exact, bound = _float64_bound(x, w)
    assert ((matvec(x, w).double() - exact).abs() <= bound).all()
    assert ((blas.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize(
    "case",
    ["rows above MAX_ROWS", "float64", "autograd", "non-contiguous w", "empty x", "zero-width w"],
)
def test_inputs_the_kernel_does_not_cover_are_x_at_w(case: str) -> None:
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(3, 40, generator=g), torch.randn(40, 24, generator=g)
    if case == "rows above MAX_ROWS":
        x = torch.randn(MAX_ROWS + 1, 40, generator=g)
    elif case == "float64":
        x, w = x.double(), w.double()
    elif case == "autograd":
        w.requires_grad_(True)
    elif case == "non-contiguous w":
        w = torch.randn(24, 40, generator=g).t()
    elif case == "empty x":
        x = x[:0]
    elif case == "zero-width w":
        w = w[:, :0]
    y = matvec(x, w)
    assert torch.equal(y, x @ w)
    if case == "autograd":
        y.sum().backward()
        assert torch.allclose(w.grad, x.sum(0)[:, None].expand_as(w))


@needs_kernel
def test_kernel_matvec_runs_the_kernel_beyond_max_rows() -> None:
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(2 * MAX_ROWS + 3, 37, generator=g), torch.randn(37, 29, generator=g)
    exact, bound = _float64_bound(x, w)
    y = kernel_matvec(x, w)
    assert ((y.double() - exact).abs() <= bound).all()
    assert torch.equal(y[:MAX_ROWS], matvec(x[:MAX_ROWS], w))  # the same kernel that matvec runs


@needs_kernel
@pytest.mark.parametrize(
    ("x", "w", "error", "match"),
    [
        (torch.ones(2, 4, dtype=torch.float64), torch.ones(4, 3, dtype=torch.float64), TypeError, "x must have dtype"),
        (torch.ones(2, 4), torch.ones(3, 4).t(), ValueError, "w contiguous"),
        (torch.ones(2, 5), torch.ones(4, 3), ValueError, r"x must have shape \(\.\.\., 4\)"),
    ],
)
def test_kernel_matvec_rejects_what_the_kernel_does_not_take(x, w, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        kernel_matvec(x, w)


def test_kernel_matvec_without_the_kernel_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REFIMPL_MATVEC", "0")
    mv._library.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="not available"):
            kernel_matvec(torch.ones(1, 2), torch.ones(2, 2))
    finally:
        mv._library.cache_clear()


def test_non_contiguous_x_is_multiplied_as_its_values() -> None:
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(40, 4, generator=g).t(), torch.randn(40, 33, generator=g)  # x: (4, 40), strided
    exact, bound = _float64_bound(x, w)
    assert ((matvec(x, w).double() - exact).abs() <= bound).all()


@pytest.mark.parametrize(
    ("x", "w", "error", "match"),
    [
        (torch.ones(3), torch.ones(3), ValueError, "w must have 2 dimensions"),
        (torch.ones(2, 5), torch.ones(4, 3), ValueError, r"x must have shape \(\.\.\., 4\)"),
        (torch.tensor(1.0), torch.ones(1, 3), ValueError, r"x must have shape \(\.\.\., 1\)"),
        ([1.0, 2.0], torch.ones(2, 3), TypeError, "x must be a torch.Tensor"),
    ],
)
def test_bad_input_names_the_argument(x: object, w: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        matvec(x, w)  # type: ignore[arg-type]


def test_without_a_compiler_matvec_is_the_blas(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("REFIMPL_CACHE", str(tmp_path / "cache"))
    mv._library.cache_clear()
    try:
        assert not kernel_available()
        x, w = torch.randn(2, 8), torch.randn(8, 5)
        assert torch.equal(matvec(x, w), x @ w)
    finally:
        mv._library.cache_clear()


@needs_kernel
def test_the_kernel_compiles_into_the_cache_folder(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("REFIMPL_CACHE", str(tmp_path))
    mv._library.cache_clear()
    try:
        assert kernel_available()
        built = list(tmp_path.glob("matvec-*.so"))
        assert len(built) == 1 and not [p for p in tmp_path.iterdir() if p.is_dir()], list(tmp_path.iterdir())
    finally:
        mv._library.cache_clear()


def test_refimpl_matvec_0_turns_the_kernel_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REFIMPL_MATVEC", "0")
    mv._library.cache_clear()
    try:
        assert not kernel_available()
    finally:
        mv._library.cache_clear()
