"""The book's fixed evaluation corpus: CPython's reference-documentation topics (``pydoc_data.topics``).

Every chapter that reports a perplexity uses the same tokens, so numbers compare across chapters. The text is
the documentation that ``help("assert")`` and friends print; it ships inside every CPython installation
under the PSF licence (redistributable), and is English prose mixed with grammar rules and code, a realistic
input for a small instruct model. It was extracted once (:func:`extract_pydoc_topics`) and ships inside the
package as ``refimpl/data/corpus/pydoc_topics.txt`` (read with :mod:`importlib.resources`, so an installed wheel
has it); ``refimpl/data/corpus/README.md`` records the source and the slices.

Slices are defined in tokens of the whole tokenized text, so they do not depend on where a character slice
would cut a word: :data:`SLICES` maps a name to its first token.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources
from typing import TYPE_CHECKING

from refimpl._checks import check_choice, check_positive_int

if TYPE_CHECKING:
    from torch import Tensor

    from refimpl.llm.tokenizer import Tokenizer

__all__ = [
    "CORPUS_PATH",
    "CORPUS_SHA256",
    "SLICES",
    "eval_ids",
    "extract_pydoc_topics",
    "load_text",
    "n_tokens",
    "slice_rows",
]

#: The corpus file, shipped inside the package (a :class:`~importlib.resources.abc.Traversable`).
CORPUS_PATH = resources.files("refimpl") / "data" / "corpus" / "pydoc_topics.txt"
#: sha256 of the corpus file, checked by :func:`load_text`.
CORPUS_SHA256 = "71f2ff5d99bdc1f9c48c5c2353ad138201c5ca1c377e0226857ef8fa89b8bcee"
SOURCE_PYTHON = "3.11.7"  # the CPython whose pydoc_data.topics was extracted
TOPIC_SEPARATOR = "\n\n\n"

#: Named slices: first token of each, in the SmolLM2 tokenization of the whole corpus (112,955 tokens).
#: ``eval`` is what chapters report; ``heldout`` is a disjoint region for calibration or tuning.
SLICES: dict[str, int] = {"eval": 0, "heldout": 65_536}


def extract_pydoc_topics() -> str:
    """The corpus text from the running CPython: every topic of ``pydoc_data.topics.topics``, in sorted key
    order, stripped, joined by two blank lines, with a final newline. Equals the committed file when run on
    CPython :data:`SOURCE_PYTHON`."""
    from pydoc_data.topics import topics

    return TOPIC_SEPARATOR.join(topics[k].strip() for k in sorted(topics)) + "\n"


@functools.lru_cache(maxsize=1)
def load_text() -> str:
    """The committed corpus text (465,126 characters), verified against :data:`CORPUS_SHA256`.

    Raises ``FileNotFoundError`` if :data:`CORPUS_PATH` is missing (an installation without the package data)
    and ``ValueError`` if it was modified.
    """
    if not CORPUS_PATH.is_file():
        raise FileNotFoundError(f"the evaluation corpus {CORPUS_PATH} is missing; it ships inside the package")
    data = CORPUS_PATH.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != CORPUS_SHA256:
        raise ValueError(f"{CORPUS_PATH} has sha256 {digest}, expected {CORPUS_SHA256} (modified)")
    return data.decode("utf-8")


_TOKENS: dict[int, list[int]] = {}


def _all_ids(tokenizer: Tokenizer) -> list[int]:
    key = id(tokenizer)
    if key not in _TOKENS:
        _TOKENS[key] = tokenizer.encode(load_text())
    return _TOKENS[key]


def n_tokens(tokenizer: Tokenizer) -> int:
    """Number of tokens of the whole corpus under ``tokenizer``."""
    return len(_all_ids(tokenizer))


def eval_ids(n_tokens: int, tokenizer: Tokenizer, slice: str = "eval") -> Tensor:
    """The fixed evaluation tokens: ``n_tokens`` ids starting at token ``SLICES[slice]`` of the corpus.

    Returns a LongTensor ``(n_tokens,)``. Raises ``ValueError`` for an unknown slice name or a slice that runs
    past the end of the corpus.
    """
    import torch

    n_tokens = check_positive_int("n_tokens", n_tokens)
    check_choice("slice", slice, SLICES)
    ids = _all_ids(tokenizer)
    start = SLICES[slice]
    if start + n_tokens > len(ids):
        raise ValueError(f"n_tokens must be <= {len(ids) - start} for slice {slice!r}, got {n_tokens}")
    return torch.tensor(ids[start : start + n_tokens], dtype=torch.long)


def slice_rows(n_slices: int, n_tokens: int, tokenizer: Tokenizer, slice: str = "eval") -> Tensor:
    """``n_slices`` disjoint, consecutive windows of ``n_tokens`` ids from the start of ``slice``, as the rows
    of ``(n_slices, n_tokens)``: the texts of a batched evaluation whose spread gives a standard error. Errors
    as :func:`eval_ids` for the whole ``n_slices * n_tokens`` span."""
    n_slices = check_positive_int("n_slices", n_slices)
    n_tokens = check_positive_int("n_tokens", n_tokens)
    return eval_ids(n_slices * n_tokens, tokenizer, slice).view(n_slices, n_tokens)
