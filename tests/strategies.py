"""Hypothesis strategies that several test modules draw from."""

from __future__ import annotations

from typing import NamedTuple

from hypothesis import strategies as st


class BlockShape(NamedTuple):
    """A small GPT block: ``s`` tokens, ``b`` sequences, ``a`` heads of width ``d`` (``h = a d``), ``tile`` tokens
    per tile."""

    s: int
    b: int
    a: int
    d: int
    tile: int

    @property
    def h(self) -> int:
        return self.a * self.d


def block_shapes(min_s: int = 1) -> st.SearchStrategy[BlockShape]:
    """Shapes of :class:`refimpl.memo.block.TransformerBlock` small enough for float64 references and ledgers:
    ``min_s <= s <= 24``, ``b, a <= 3``, ``d <= 5``, ``tile <= 9`` (tiles that split ``s`` unevenly included)."""
    return st.builds(
        BlockShape,
        s=st.integers(min_s, 24),
        b=st.integers(1, 3),
        a=st.integers(1, 3),
        d=st.integers(1, 5),
        tile=st.integers(1, 9),
    )
