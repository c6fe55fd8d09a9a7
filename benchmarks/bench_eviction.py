"""Perplexity cost of a 5x smaller KV cache on SmolLM2-135M: Scissorhands and the sliding window.

    python benchmarks/bench_eviction.py            # 1024 tokens of the eval slice, 512 decoded (~several minutes)
    python benchmarks/bench_eviction.py --quick    # 80 tokens, a few seconds after the model loads

Protocol (the chapter's): the first ``--prefill`` tokens of the book's fixed corpus slice
(:func:`refimpl.llm.corpus.eval_ids`, slice ``eval``) go through the model in one call, then the rest one token
per decode step, the caches under test side by side as rows of one batch
(:func:`refimpl.llm.perplexity.evaluate_many`). The budget is 20% of the evaluated context (``--tokens``), i.e.
a 5x smaller cache. The perplexity is that of the decoded tokens, where the policy acts; the increase is
relative to the full cache measured in the same run: ``ppl_policy / ppl_full - 1`` (0.10 = 10% higher).
Scissorhands runs with its defaults (w = 400, r = 10, m = 0.4 B). Every line after the header is ``name: number``.
"""

from __future__ import annotations

import torch
from _common import argument_parser, report


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argument_parser(__doc__, threads=True)
    parser.add_argument("--tokens", type=int, default=None, help="evaluated context (default 1024; quick 80)")
    parser.add_argument("--prefill", type=int, default=None, help="tokens in the prefill (default tokens / 2)")
    args = parser.parse_args(argv)

    from refimpl.eviction import ScissorhandsCache, SlidingWindowCache
    from refimpl.llm import FullCache, evaluate_many, load_model
    from refimpl.llm.corpus import eval_ids

    torch.set_num_threads(args.threads)
    n = args.tokens or (80 if args.quick else 1024)
    prefill = args.prefill or n // 2
    budget = n // 5
    model, tokenizer = load_model()
    ids = eval_ids(n, tokenizer)
    out: dict[str, float] = {}
    runs = evaluate_many(
        model,
        ids,
        {
            "full": FullCache,
            "scissorhands": lambda: ScissorhandsCache(budget=budget),
            "window": lambda: SlidingWindowCache(budget=budget),
        },
        prefill=prefill,
    )
    full = runs["full"]
    out["full_ppl"] = full.decode_perplexity()
    for name in ("scissorhands", "window"):
        r = runs[name]
        out[f"{name}_ppl_at_5x"] = r.decode_perplexity()
        out[f"{name}_ppl_increase_at_5x"] = out[f"{name}_ppl_at_5x"] / out["full_ppl"] - 1
        out[f"{name}_cache_compression"] = full.peak_cache_bytes / r.peak_cache_bytes  # memory to provide
    report(out, header=f"SmolLM2-135M, {n} tokens of the eval slice, prefill {prefill}, budget {budget} (20%)")
    return out


if __name__ == "__main__":
    main()
