"""Measurements on the book's model, shared by the chapter and ``benchmarks/bench_speculative.py``.

* :func:`forward_cost`: wall-clock of one cached forward over ``k`` new tokens relative to ``k = 1`` (the
  verification cost ``v`` of :mod:`refimpl.speculative.cost`), minimum over interleaved repeats;
* :func:`compare_methods`: plain greedy decoding and each speculative method on the same prompts, in the same
  run (methods interleaved per prompt, so a slow spell of a shared machine hits them all): tokens/s, whether the
  output equals plain greedy, acceptance per draft position, tokens per target forward;
* :func:`greedy_agreement`: how often a layer-skipping draft's argmax equals the target's under teacher forcing
  (the greedy acceptance rate ``alpha`` of a draft, without decoding).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from refimpl._checks import check_int
from refimpl.llm.cache import FullCache
from refimpl.speculative.decode import SpecStats, plain_decode, speculative_decode
from refimpl.speculative.draft import LayerSkipDraft

__all__ = ["compare_methods", "forward_cost", "greedy_agreement"]


@torch.inference_mode()
def forward_cost(
    model: torch.nn.Module, context: torch.Tensor, ks: Sequence[int], repeats: int = 5
) -> dict[int, float]:
    """Seconds of one forward of ``k`` new tokens after ``context: (T,)`` in the cache, divided by ``k = 1``'s.

    Returns ``{k: cost(k) / cost(1)}``; each cost is the minimum over ``repeats`` (the ``k`` interleaved)."""
    repeats = check_int("repeats", repeats, min_value=1)
    caches = [FullCache() for _ in range(model.config.n_layers)]
    model(context[None], caches)
    t = context.shape[0]
    best = {k: float("inf") for k in (1, *ks)}
    for _ in range(repeats):
        for k in best:
            ids = context[-k:][None] if k <= t else context[:1].repeat(k)[None]  # (1, k)
            t0 = time.perf_counter()
            model(ids, caches, start_pos=t)
            best[k] = min(best[k], time.perf_counter() - t0)
            for c in caches:
                c.truncate(t)
    return {k: best[k] / best[1] for k in ks}


def compare_methods(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    new_tokens: int,
    methods: dict[str, Callable[[], tuple[Any, dict[str, Any]]]],
) -> dict[str, dict[str, Any]]:
    """Decode ``new_tokens`` after each prompt with plain greedy decoding and each method, interleaved.

    ``methods[name]()`` returns ``(draft, kwargs)`` for :func:`~refimpl.speculative.decode.speculative_decode`
    (a fresh draft per prompt). Returns ``{name: {"seconds", "tokens_per_s", "speedup", "identical",
    "stats"}}`` with ``"plain"`` the baseline; ``speedup`` is plain's seconds over the method's, summed over
    prompts; ``identical`` is True when every output equals plain greedy decoding; ``stats`` merges the
    :class:`~refimpl.speculative.decode.SpecStats` of all prompts.
    """
    new_tokens = check_int("new_tokens", new_tokens, min_value=1)
    res: dict[str, dict[str, Any]] = {
        n: {"seconds": 0.0, "identical": True, "stats": SpecStats()} for n in ("plain", *methods)
    }
    for prompt in prompts:
        t0 = time.perf_counter()
        want = plain_decode(model, prompt, new_tokens)
        res["plain"]["seconds"] += time.perf_counter() - t0
        for name, make in methods.items():
            draft, kwargs = make()
            t0 = time.perf_counter()
            got, st = speculative_decode(model, prompt, new_tokens, draft, **kwargs)
            r = res[name]
            r["seconds"] += time.perf_counter() - t0
            r["identical"] &= got == want
            _merge(r["stats"], st)
    for r in res.values():
        r["tokens_per_s"] = new_tokens * len(prompts) / r["seconds"]
        r["speedup"] = res["plain"]["seconds"] / r["seconds"]
    return res


def _merge(total: SpecStats, st: SpecStats) -> None:
    total.new_tokens += st.new_tokens
    total.target_forwards += st.target_forwards
    total.drafted += st.drafted
    total.accepted += st.accepted
    for i, (d, a) in enumerate(zip(st.drafted_at, st.accepted_at)):
        if i == len(total.drafted_at):
            total.drafted_at.append(0)
            total.accepted_at.append(0)
        total.drafted_at[i] += d
        total.accepted_at[i] += a


@torch.inference_mode()
def greedy_agreement(model: torch.nn.Module, skip: Sequence[int], ids: torch.Tensor) -> float:
    """Fraction of positions of ``ids: (T,)`` where the draft that skips layers ``skip`` predicts the target's
    argmax next token (teacher forcing, one forward each): the greedy acceptance rate of that draft."""
    keep = [i for i in range(model.config.n_layers) if i not in set(skip)]
    draft = LayerSkipDraft(model, keep)
    want = model(ids[None])[0].argmax(-1)
    return float((draft.model(ids[None])[0].argmax(-1) == want).double().mean())
