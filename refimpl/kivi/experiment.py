"""Looking inside the book's LLM for KIVI: the keys and values of every layer, and their channel statistics.

Perplexity under KIVI caches is measured by the book's one evaluation path,
:func:`refimpl.llm.perplexity.evaluate_many`, with KIVI cache factories (``lambda: KIVICache(bits=2)``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from refimpl._checks import check_tensor
from refimpl.llm.cache import FullCache
from refimpl.llm.model import Llama
from refimpl.llm.perplexity import token_ids

__all__ = ["channel_magnitude", "collect_kv"]


def collect_kv(model: Llama, ids: Tensor | Sequence[int]) -> list[tuple[Tensor, Tensor]]:
    """Keys (after RoPE) and values of every layer for ``ids: (N,)``: a list of ``(K, V)``, each
    ``(1, H_kv, N, D)``, from one prefill into full-precision caches. Raises ``ValueError`` for ids as
    :func:`refimpl.llm.perplexity.token_ids` (at least one token)."""
    ids = token_ids(model, ids, min_tokens=1)
    caches = [FullCache() for _ in range(model.config.n_layers)]
    model.hidden(ids[None, :], caches, 0)
    return [c.keys_values() for c in caches]


def channel_magnitude(x: Tensor) -> Tensor:
    """Mean absolute value of each channel of ``x: (B, H, T, D)`` over batch and tokens: ``(H * D,)``.

    The statistic behind KIVI's Figure 2: a few key channels are large in every token (outlier channels),
    while value magnitudes show no such channel structure.
    """
    check_tensor("x", x, ndim=4, floating=True)
    return x.abs().mean(dim=(0, 2)).reshape(-1)  # (H, D) -> (H * D,)
