"""Text generation: prefill the prompt through the KV cache, then decode one token per step.

Decoding picks the next token as a :class:`Sampling` says: greedily (``temperature=0``, the default) or by a
draw from the softmax at a temperature, restricted to the nucleus: the smallest set of most likely tokens whose
probability reaches ``top_p`` (Holtzman et al. 2020, sec. 3.1, eq. 2-3), from a generator seeded by ``seed``.
Generation stops at an end-of-sequence token or after ``max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from refimpl._checks import check_float, check_int, check_positive_int, check_tensor
from refimpl.llm.cache import CacheFactory, FullCache, KVCache, make_caches
from refimpl.llm.model import Llama
from refimpl.llm.tokenizer import Tokenizer

__all__ = ["Sampling", "generate", "generate_ids", "top_p_filter"]


def top_p_filter(probs: Tensor, top_p: float) -> Tensor:
    """Nucleus filter (Holtzman et al. 2020, eq. 2-3): zero every token outside the smallest set of most
    probable tokens whose total probability is ``>= top_p``, and renormalize.

    ``probs: (..., V)`` (rows sum to 1) -> same shape. ``top_p = 1`` keeps every token; the most likely token
    is always kept. Ties at the boundary are broken by index order (stable sort).
    """
    check_tensor("probs", probs, floating=True)
    top_p = check_float("top_p", top_p, min_value=0.0, max_value=1.0, min_inclusive=False)
    if top_p >= 1.0:
        return probs
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    mass_before = sorted_p.cumsum(-1) - sorted_p  # probability of the more likely tokens
    keep_sorted = mass_before < top_p  # a token is needed while the mass before it is short of top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    kept = probs * keep
    return kept / kept.sum(-1, keepdim=True)


@dataclass(frozen=True)
class Sampling:
    """How each next token is picked: greedily (``temperature = 0``, the default) or by a draw from
    ``top_p_filter(softmax(logits / temperature), top_p)`` with a generator seeded by ``seed``.

    Frozen and validated on construction: raises ``ValueError`` naming the field for a negative or non-finite
    ``temperature`` or a ``top_p`` outside ``(0, 1]``, ``TypeError`` for a ``seed`` that is not an int.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        top_p = check_float("top_p", self.top_p, min_value=0.0, max_value=1.0, min_inclusive=False)
        object.__setattr__(self, "temperature", check_float("temperature", self.temperature, min_value=0.0))
        object.__setattr__(self, "top_p", top_p)  # frozen: normalize once, here
        object.__setattr__(self, "seed", check_int("seed", self.seed))

    def next_token(self, logits: Tensor, generator: torch.Generator) -> int:
        """Next token from ``logits: (V,)``: the argmax if ``temperature == 0``, else a draw by ``generator``."""
        if self.temperature == 0.0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.double() / self.temperature, dim=-1)
        probs = top_p_filter(probs, self.top_p)
        return int(torch.multinomial(probs, 1, generator=generator))


def _fresh_caches(model: Llama, cache: CacheFactory | Sequence[KVCache]) -> list[KVCache]:
    """One cache per layer from ``cache``: a factory of one layer's cache, or the objects themselves (empty)."""
    if callable(cache):
        return make_caches(cache, model.config.n_layers)
    caches = list(cache)
    if len(caches) != model.config.n_layers or not all(isinstance(c, KVCache) for c in caches):
        raise ValueError(f"cache must be a cache factory or {model.config.n_layers} KVCache objects, got {cache!r}")
    if any(len(c) for c in caches):
        raise ValueError("cache objects must be empty (fresh) at the start")
    return caches


def generate_ids(
    model: Llama,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    sampling: Sampling = Sampling(),
    cache: CacheFactory | Sequence[KVCache] = FullCache,
    stop_ids: Sequence[int] = (),
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """Generate up to ``max_new_tokens`` token ids after ``prompt_ids``; returns the new ids.

    ``sampling``: how each token is picked (:class:`Sampling`; default greedy).
    ``cache``: a factory of one layer's cache (``FullCache``, ``lambda: KIVICache(bits=2)``) or one fresh cache
    object per layer. Generation stops after emitting any id in ``stop_ids`` (that id included).
    ``on_token(id)`` is called for every new id as it is produced.

    Raises ``ValueError`` for an empty prompt, ids outside the vocabulary, a prompt plus ``max_new_tokens``
    longer than ``max_seq_len``, or cache objects that are not one fresh cache per layer; ``TypeError`` for a
    ``sampling`` that is not a :class:`Sampling`.
    """
    prompt = [int(i) for i in prompt_ids]
    if not prompt:
        raise ValueError("prompt must hold at least one token, got an empty prompt")
    max_new_tokens = check_positive_int("max_new_tokens", max_new_tokens)
    if not isinstance(sampling, Sampling):
        raise TypeError(f"sampling must be a Sampling, got {type(sampling).__name__} {sampling!r}")
    if len(prompt) + max_new_tokens > model.config.max_seq_len:
        raise ValueError(
            f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"max_seq_len={model.config.max_seq_len}"
        )
    caches = _fresh_caches(model, cache)
    generator = torch.Generator().manual_seed(sampling.seed)
    stop = set(stop_ids)

    ids = torch.tensor([prompt])  # (1, T_prompt)
    logits = model(ids, caches, start_pos=0)[0, -1]  # prefill; (V,) predicts the first new token
    out: list[int] = []
    pos = len(prompt)
    while True:
        nxt = sampling.next_token(logits, generator)
        out.append(nxt)
        if on_token is not None:
            on_token(nxt)
        if nxt in stop or len(out) == max_new_tokens:
            return out
        logits = model(torch.tensor([[nxt]]), caches, start_pos=pos)[0, -1]  # one decode step
        pos += 1


def generate(
    model: Llama,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    *,
    sampling: Sampling = Sampling(),
    cache: CacheFactory | Sequence[KVCache] = FullCache,
    stream: Callable[[str], None] | None = None,
    chat: bool = False,
) -> str:
    """Continue ``prompt`` by up to ``max_new_tokens`` tokens; returns the new text (without the prompt).

    ``chat=True`` wraps the prompt in the model's ChatML template (:meth:`Tokenizer.chat_prompt`) so the
    instruct model answers it. ``stream(piece)`` receives the new text as it is produced (pieces that end
    inside a multi-byte character are held back until it completes). Stops at an end-of-sequence token (not
    included in the returned text). Errors: see :func:`generate_ids`; an empty ``prompt`` raises
    ``ValueError``.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if not prompt:
        raise ValueError("prompt must be a non-empty string, got ''")
    prompt_ids = tokenizer.encode(tokenizer.chat_prompt(prompt) if chat else prompt)
    new_ids: list[int] = []
    shown = 0

    def on_token(i: int) -> None:
        nonlocal shown
        if i in tokenizer.stop_ids:
            return
        new_ids.append(i)
        if stream is not None:
            text = tokenizer.decode(new_ids)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte UTF-8 character
                stream(text[shown:])
                shown = len(text)

    generate_ids(
        model,
        prompt_ids,
        max_new_tokens,
        sampling=sampling,
        cache=cache,
        stop_ids=tokenizer.stop_ids,
        on_token=on_token,
    )
    text = tokenizer.decode(new_ids)
    if stream is not None and len(text) > shown:
        stream(text[shown:])
    return text
