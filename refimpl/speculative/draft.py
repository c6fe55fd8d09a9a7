"""Drafts: where the proposed tokens come from.

* :class:`PromptLookupDraft`: copy what followed an earlier occurrence of the context's last n-gram (prompt
  lookup decoding, Saxena 2023): free to compute, and good wherever the output repeats its input.
* :class:`LayerSkipDraft`: the target itself with some layers skipped (self-speculative decoding, Zhang et al.
  2024, "Draft & Verify"): the kept blocks, the final norm and the LM head, with its own KV caches.

A draft has ``propose(context, gamma, temperature, generator) -> (tokens, q)`` (``q: (len(tokens), V)`` the
draft's distributions, or ``None`` for a deterministic draft) and ``propose_tree(context, gamma) -> TokenTree``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from refimpl._checks import check_int
from refimpl.llm.cache import FullCache
from refimpl.speculative.tree import TokenTree
from refimpl.speculative.verify import probs_from_logits

__all__ = ["LayerSkipDraft", "PromptLookupDraft", "prompt_lookup"]


def prompt_lookup(context: Sequence[int], gamma: int, ngram: int = 3, n_candidates: int = 1) -> list[list[int]]:
    """Up to ``n_candidates`` distinct continuations of up to ``gamma`` tokens, each the tokens that followed an
    earlier occurrence of the context's last ``n`` tokens, for the longest ``n <= ngram`` that occurs (the most
    recent occurrences first). Returns ``[]`` if no suffix of the context occurred before."""
    gamma = check_int("gamma", gamma, min_value=1)
    ngram = check_int("ngram", ngram, min_value=1)
    n_candidates = check_int("n_candidates", n_candidates, min_value=1)
    ctx = torch.as_tensor(list(context), dtype=torch.long)  # (L,)
    for n in range(min(ngram, len(ctx) - 1), 0, -1):
        windows = ctx[:-1].unfold(0, n, 1)  # (L - n, n): every n-gram that has a next token
        hits = (windows == ctx[-n:]).all(1).nonzero().flatten().tolist()
        out: list[list[int]] = []
        for j in reversed(hits):
            cand = ctx[j + n : j + n + gamma].tolist()
            if cand and cand not in out:
                out.append(cand)
                if len(out) == n_candidates:
                    break
        if out:
            return out
    return []


class PromptLookupDraft:
    """Prompt lookup as a draft (deterministic: ``q = None``); a tree of ``n_candidates`` continuations."""

    def __init__(self, ngram: int = 3, n_candidates: int = 4) -> None:
        self.ngram = check_int("ngram", ngram, min_value=1)
        self.n_candidates = check_int("n_candidates", n_candidates, min_value=1)

    def propose(
        self, context: Sequence[int], gamma: int, temperature: float = 0.0, generator: torch.Generator | None = None
    ) -> tuple[list[int], Tensor | None]:
        found = prompt_lookup(context, gamma, self.ngram)
        return (found[0] if found else []), None

    def propose_tree(self, context: Sequence[int], gamma: int) -> TokenTree:
        return TokenTree.from_paths(prompt_lookup(context, gamma, self.ngram, self.n_candidates))


class LayerSkipDraft:
    """Self-speculative draft: the target's blocks ``layers`` (others skipped), its final norm and LM head.

    Keeps its own KV caches (one per kept layer) and the ids they hold; each :meth:`propose` rolls them back
    (``truncate``) to the longest prefix still in the context, feeds the new context tokens in one forward and
    then drafts ``gamma`` tokens one forward each. The tree (:meth:`propose_tree`) is the greedy chain plus, at
    each depth, the ``width - 1`` next most likely tokens as leaves (no extra draft forward).
    """

    def __init__(self, model: torch.nn.Module, layers: Sequence[int], width: int = 2) -> None:
        n = model.config.n_layers
        layers = [check_int("layers[i]", i, min_value=0, max_value=n - 1) for i in layers]
        if not layers or len(set(layers)) != len(layers):
            raise ValueError(f"layers must be distinct layer indices in [0, {n}), got {layers}")
        self.layers = sorted(layers)
        self.width = check_int("width", width, min_value=1)
        blocks = [{k: b for k, b in model.blocks[i].named_buffers()} for i in self.layers]
        # a Llama over the kept blocks' weights (shared, not copied) and the target's head and final norm
        self.model = type(model)(replace(model.config, n_layers=len(self.layers)), model.head, model.norm, blocks)
        self.model.eval()
        self.caches = [FullCache() for _ in self.layers]
        self.ids: list[int] = []  # the tokens the draft caches hold

    def _logits_after(self, context: Sequence[int]) -> Tensor:
        """Sync the caches with ``context`` and return the draft's logits ``(V,)`` for the next token."""
        m = 0
        limit = min(len(self.ids), len(context) - 1)  # feed at least the context's last token
        while m < limit and self.ids[m] == context[m]:
            m += 1
        for c in self.caches:
            c.truncate(m)
        new = list(context[m:])
        self.ids = self.ids[:m] + new
        return self.model(torch.tensor([new]), self.caches, start_pos=m)[0, -1]

    def propose(
        self, context: Sequence[int], gamma: int, temperature: float = 0.0, generator: torch.Generator | None = None
    ) -> tuple[list[int], Tensor | None]:
        logits = self._logits_after(context)
        tokens: list[int] = []
        qs: list[Tensor] = []
        for i in range(gamma):
            if temperature == 0.0:
                tokens.append(int(logits.argmax()))
            else:
                q = probs_from_logits(logits, temperature)
                qs.append(q)
                tokens.append(int(torch.multinomial(q, 1, generator=generator)))
            if i + 1 < gamma:
                logits = self._logits_after([*context, *tokens])
        return tokens, (torch.stack(qs) if qs else None)

    def propose_tree(self, context: Sequence[int], gamma: int) -> TokenTree:
        logits = self._logits_after(context)
        tokens: list[int] = []
        parents: list[int] = []
        chain_parent = -1
        for i in range(gamma):
            top = logits.topk(self.width).indices.tolist()  # the chain's token first
            for t in top:
                tokens.append(t)
                parents.append(chain_parent)
            chain_parent = len(tokens) - len(top)
            if i + 1 < gamma:
                chain = [tokens[j] for j in TokenTree(tokens, parents).path_to(chain_parent)]
                logits = self._logits_after([*context, *chain])
        return TokenTree(tokens, parents)
