"""The speculative decoding loop on the book's model (Leviathan et al. 2023, Algorithm 1, repeated).

Each step: the draft proposes ``gamma`` tokens after the context; ONE target forward over the last emitted
token (not yet cached) and the drafts gives ``p_1 .. p_{gamma+1}``; :mod:`refimpl.speculative.verify` accepts a
prefix and adds one token; the target's caches are rolled back (``KVCache.truncate``) to drop the rejected
drafts. With a tree (``tree=True``) the draft proposes a :class:`~refimpl.speculative.tree.TokenTree`, verified
in one forward by :func:`~refimpl.speculative.tree.verify_tree_greedy` (greedy only).

At temperature 0 the output is token for token the target's greedy decoding; at temperature ``T > 0`` it is
distributed as the target's sampling at ``T`` (no top-p here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from refimpl._checks import check_float, check_int
from refimpl.llm.cache import FullCache, KVCache
from refimpl.speculative.tree import verify_tree_greedy
from refimpl.speculative.verify import probs_from_logits, verify_greedy, verify_sampled

__all__ = ["SpecStats", "plain_decode", "speculative_decode"]


@dataclass
class SpecStats:
    """Counters of one decode: target forwards, drafted and accepted tokens (per draft position)."""

    new_tokens: int = 0
    target_forwards: int = 0
    drafted: int = 0
    accepted: int = 0
    drafted_at: list[int] = field(default_factory=list)  # drafted_at[i]: steps that drafted position i + 1
    accepted_at: list[int] = field(default_factory=list)  # accepted_at[i]: steps that accepted position i + 1

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Emitted tokens per target forward (the prefill not counted): the mean accepted length plus one."""
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0

    def _count(self, depth_drafted: int, n_accepted: int) -> None:
        while len(self.drafted_at) < depth_drafted:
            self.drafted_at.append(0)
            self.accepted_at.append(0)
        for i in range(depth_drafted):
            self.drafted_at[i] += 1
            self.accepted_at[i] += int(i < n_accepted)


def _prefill(model: torch.nn.Module, prompt: list[int], caches: Sequence[KVCache] | None) -> list[KVCache]:
    if not prompt:
        raise ValueError("prompt_ids must hold at least one token, got an empty prompt")
    caches = [FullCache() for _ in range(model.config.n_layers)] if caches is None else list(caches)
    if len(prompt) > 1:
        model(torch.tensor([prompt[:-1]]), caches, start_pos=0)  # the last prompt token goes with the drafts
    return caches


@torch.inference_mode()
def plain_decode(model: torch.nn.Module, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding, one target forward per token: the baseline, written as the speculative loop is."""
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, min_value=1)
    ctx = [int(t) for t in prompt_ids]
    caches = _prefill(model, ctx, None)
    out: list[int] = []
    while len(out) < max_new_tokens:
        logits = model(torch.tensor([ctx[-1:]]), caches, start_pos=len(ctx) - 1)[0, -1]
        ctx.append(int(logits.argmax()))
        out.append(ctx[-1])
    return out


@torch.inference_mode()
def speculative_decode(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    draft: Any,
    gamma: int = 4,
    temperature: float = 0.0,
    seed: int = 0,
    tree: bool = False,
    caches: Sequence[KVCache] | None = None,
) -> tuple[list[int], SpecStats]:
    """Decode ``max_new_tokens`` tokens after ``prompt_ids`` with ``draft`` proposing ``gamma`` tokens a step.

    ``draft``: a :class:`~refimpl.speculative.draft.PromptLookupDraft`, a
    :class:`~refimpl.speculative.draft.LayerSkipDraft` or any object with ``propose`` (and ``propose_tree`` for
    ``tree=True``). ``caches``: empty caches of the target, one per layer, that support ``truncate``
    (default: :class:`~refimpl.llm.cache.FullCache`). Returns ``(new ids, SpecStats)``.

    Raises ``ValueError`` for an empty prompt, ``gamma < 1``, a negative temperature, ``tree=True`` with a
    temperature above 0, or a context longer than the model's ``max_seq_len``.
    """
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, min_value=1)
    gamma = check_int("gamma", gamma, min_value=1)
    temperature = check_float("temperature", temperature, min_value=0.0)
    if tree and temperature > 0.0:
        raise ValueError(f"tree verification is greedy here: temperature must be 0 with tree=True, got {temperature}")
    ctx = [int(t) for t in prompt_ids]
    if len(ctx) + max_new_tokens > model.config.max_seq_len:
        raise ValueError(
            f"prompt ({len(ctx)} tokens) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len="
            f"{model.config.max_seq_len}"
        )
    caches = _prefill(model, ctx, caches)
    generator = torch.Generator().manual_seed(check_int("seed", seed))
    stats = SpecStats()
    out: list[int] = []
    while len(out) < max_new_tokens:
        start = len(ctx) - 1  # position of the last emitted token, the first one this forward caches
        g = min(gamma, max_new_tokens - len(out) - 1)  # never draft past the end
        if tree:
            t = draft.propose_tree(ctx, g) if g > 0 else None
            if t is not None and len(t):
                accepted, nxt, _ = verify_tree_greedy(model, caches, ctx[-1], start, t)
                new = [t.tokens[i] for i in accepted] + [nxt]
                stats._count(t.depth, len(accepted))
                stats.drafted += t.depth
                stats.accepted += len(accepted)
                stats.target_forwards += 1
                ctx += new
                out += new
                continue
            drafts, q = [], None
        else:
            drafts, q = draft.propose(ctx, g, temperature, generator) if g > 0 else ([], None)
        logits = model(torch.tensor([[ctx[-1], *drafts]]), caches, start_pos=start)[0]  # (1 + gamma, V)
        stats.target_forwards += 1
        if not drafts:  # nothing proposed: a plain decode step
            p = probs_from_logits(logits[-1], temperature)
            nxt = int(p.argmax()) if temperature == 0.0 else int(torch.multinomial(p, 1, generator=generator))
            new = [nxt]
        else:
            if temperature == 0.0:
                verdict = verify_greedy(logits, drafts)
            else:
                verdict = verify_sampled(probs_from_logits(logits, temperature), q, drafts, generator)
            n = verdict.n_accepted
            for c in caches:  # roll back: keep the context, the last emitted token and the accepted drafts
                c.truncate(start + 1 + n)
            new = [*drafts[:n], verdict.next_token]
            stats._count(len(drafts), n)
            stats.drafted += len(drafts)
            stats.accepted += n
        ctx += new
        out += new
    stats.new_tokens = len(out)
    return out, stats
