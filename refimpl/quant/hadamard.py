"""Hadamard rotations: the fast Walsh-Hadamard transform and randomized block-Hadamard rotations.

The Sylvester Hadamard matrix ``H_1 = [1]``, ``H_2n = [[H_n, H_n], [H_n, -H_n]]``, scaled by ``1/sqrt(n)``,
is orthogonal and symmetric. Multiplying a vector by it spreads every coordinate over all others: an outlier
channel of magnitude ``a`` becomes ``n`` entries of magnitude ``a / sqrt(n)``. That is why QuaRot
(Ashkboos et al. 2024) and Quamba (Chiang et al. 2025) rotate activations before quantizing them. The fast
Walsh-Hadamard transform computes ``x H_n`` in ``n log2 n`` additions instead of ``n^2`` multiply-adds.

SmolLM2's widths (576 = 9 x 64, 1536 = 3 x 512) are not powers of two, so the book rotates with a
*block* Hadamard ``I_{n/b} (x) H_b`` (``b`` the largest power of two dividing ``n``) after random sign flips
``D`` (QuaRot sec. 3's randomized Hadamard): ``Q = D (I (x) H_b)``, orthogonal, applied in ``O(n log b)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from refimpl._checks import check_int, check_positive_int, check_tensor

__all__ = ["RandomizedHadamard", "fwht", "hadamard_matrix"]


def _check_power_of_two(name: str, n: int) -> int:
    n = check_positive_int(name, n)
    if n & (n - 1):
        raise ValueError(f"{name} must be a power of two, got {n}")
    return n


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The explicit Sylvester Hadamard matrix ``H_n / sqrt(n)``, ``(n, n)``; ``n`` a power of two."""
    n = _check_power_of_two("n", n)
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)  # H_2n = [[H, H], [H, -H]]
    return (h / h.shape[0] ** 0.5).to(dtype)


def fwht(x: Tensor) -> Tensor:
    """Fast Walsh-Hadamard transform along the last dimension: ``x H_n / sqrt(n)`` for ``x: (..., n)``.

    ``log2 n`` butterfly stages, each ``(a, b) -> (a + b, a - b)`` on pairs ``h`` apart. Raises ``ValueError``
    if ``n`` is not a power of two.
    """
    check_tensor("x", x, floating=True)
    n = _check_power_of_two("x.shape[-1]", x.shape[-1] if x.dim() else 0)
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        pairs = y.view(-1, n // (2 * h), 2, h)  # (rows, blocks, 2, h): a = [:, :, 0], b = [:, :, 1]
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        y = torch.stack([a + b, a - b], dim=2).view(-1, n)
        h *= 2
    return (y / n**0.5).reshape(*lead, n)


class RandomizedHadamard:
    """The rotation ``Q = D (I_{n/b} (x) H_b)`` of width ``n``: random signs ``D``, then a block Hadamard.

    ``b`` (``block``) defaults to the largest power of two dividing ``n``. ``rotate(x) = x Q`` and
    ``unrotate(y) = y Q^T`` act on the last dimension; :meth:`matrix` is the explicit ``(n, n)`` ``Q``.
    """

    def __init__(self, n: int, seed: int = 0, block: int | None = None) -> None:
        self.n = check_positive_int("n", n)
        self.block = n & -n if block is None else _check_power_of_two("block", block)
        if n % self.block:
            raise ValueError(f"block must divide n = {n}, got {self.block}")
        g = torch.Generator().manual_seed(check_int("seed", seed, min_value=0))
        self.signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1  # diag(D)

    def _blocks(self, x: Tensor) -> Tensor:
        check_tensor("x", x, floating=True)
        if x.dim() == 0 or x.shape[-1] != self.n:
            raise ValueError(f"x's last dimension must be n = {self.n}, got shape {tuple(x.shape)}")
        return x.reshape(*x.shape[:-1], self.n // self.block, self.block)

    def rotate(self, x: Tensor) -> Tensor:
        """``x Q`` for ``x: (..., n)``: flip signs, then a FWHT on each block of ``b``."""
        blocks = self._blocks(x)  # checks the width first
        signed = blocks * self.signs.to(x.dtype).view(-1, self.block)
        return fwht(signed).reshape(x.shape)

    def unrotate(self, y: Tensor) -> Tensor:
        """``y Q^T`` (the inverse): a FWHT on each block (``H_b`` is symmetric), then flip signs."""
        return fwht(self._blocks(y)).reshape(y.shape) * self.signs.to(y.dtype)

    def matrix(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """The explicit ``Q = D (I (x) H_b): (n, n)``."""
        blocks = torch.block_diag(*[hadamard_matrix(self.block)] * (self.n // self.block))  # I (x) H_b
        return (self.signs[:, None] * blocks).to(dtype)
