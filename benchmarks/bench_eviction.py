"""Perplexity cost of a 5x smaller KV cache on SmolLM2-135M: Scissorhands, H2O, StreamingLLM, sliding window.

    python benchmarks/bench_eviction.py            # 4 slices of 512 tokens of the eval slice, 255 decoded each
    python benchmarks/bench_eviction.py --quick    # 3 slices of 80 tokens, a few seconds after the model loads

Protocol (the chapter's): ``--slices`` disjoint windows of ``--tokens`` tokens of the book's fixed corpus
(:func:`refimpl.llm.corpus.slice_rows`, slice ``eval``, or ``--slice heldout``) are the texts; every policy
runs on every text, all side by side as the rows of one batch (:func:`refimpl.llm.perplexity.evaluate_many`).
Each text's first ``--prefill`` tokens (default half) go through the model in one call, the rest one token per
decode step. The budget is 20% of a window (a 5x smaller cache at its end), so it is below the context at
every decoded token. The perplexity is that of the decoded tokens, where the policies act.

Lines (after the header, ``name: number``):

* ``full_ppl``: the full cache's perplexity over all decoded tokens;
* ``{policy}_ppl_increase_at_5x``: ``PPL_policy / PPL_full - 1`` per window, mean over windows
  (:func:`refimpl.llm.paired_increase`; 0.10 = 10% higher), and ``..._se`` its standard error over windows;
* ``{policy}_cache_compression``: the full cache's peak bytes over the policy's (the memory to provide);
* ``{policy}_realised_compression``: tokens the full cache held over tokens the policy held, averaged over
  the decode (:func:`refimpl.eviction.experiments.realised_compression`).

Policies run with their defaults (Scissorhands: w = 400, r = 10, m = 1; H2O: r = B / 2; StreamingLLM: four sink
tokens, positions in the cache).
"""

from __future__ import annotations

import torch
from _common import argument_parser, report

POLICIES = ("scissorhands", "h2o", "streamingllm", "window")


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argument_parser(__doc__, threads=True)
    parser.add_argument("--slices", type=int, default=None, help="disjoint windows (default 4; quick 3)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per window (default 512; quick 80)")
    parser.add_argument("--prefill", type=int, default=None, help="tokens in the prefill (default tokens / 2)")
    parser.add_argument("--slice", default="eval", help="corpus slice: eval (default) or heldout")
    args = parser.parse_args(argv)

    from refimpl.caches import cache_factory
    from refimpl.eviction.experiments import realised_compression
    from refimpl.llm import evaluate_many, load_model, paired_increase
    from refimpl.llm.corpus import slice_rows

    torch.set_num_threads(args.threads)
    n_slices = args.slices or (3 if args.quick else 4)
    n = args.tokens or (80 if args.quick else 512)
    prefill = args.prefill or n // 2
    budget = n // 5
    model, tokenizer = load_model()
    ids = slice_rows(n_slices, n, tokenizer, args.slice)  # (S, N)
    factories = {"full": cache_factory("full")}
    factories |= {p: cache_factory(p, model.config, budget=budget) for p in POLICIES}
    runs = evaluate_many(model, ids, factories, prefill=prefill)
    full = runs["full"]
    out: dict[str, float] = {"full_ppl": full.decode_perplexity()}
    for name in POLICIES:
        r = runs[name]
        inc = paired_increase(r.slice_nll(), full.slice_nll())
        out[f"{name}_ppl_increase_at_5x"] = inc.mean
        out[f"{name}_ppl_increase_at_5x_se"] = inc.se
        out[f"{name}_cache_compression"] = full.peak_cache_bytes / r.peak_cache_bytes
        out[f"{name}_realised_compression"] = realised_compression(r, full)
    report(
        out,
        header=f"SmolLM2-135M, {n_slices} windows of {n} tokens of the {args.slice} slice, prefill {prefill}, "
        f"budget {budget} (20%)",
    )
    return out


if __name__ == "__main__":
    main()
