"""Speculative decoding of SmolLM2-135M on the CPU: wall-clock against plain greedy decoding in the same run.

    python benchmarks/bench_speculative.py            # 2 prompts of the eval slice, 256 new tokens each (minutes)
    python benchmarks/bench_speculative.py --quick    # 1 prompt, 24 new tokens
    python benchmarks/bench_speculative.py --record data/measurements/speculative_cpu.json   # as the chapter reads it

Protocol: prompts are consecutive ``--prompt-len``-token pieces of the book's fixed corpus slice ``eval``
(:func:`refimpl.llm.corpus.eval_ids`); each is decoded greedily for ``--new-tokens`` tokens by plain decoding
(one forward per token) and by each method, interleaved per prompt (:func:`refimpl.speculative.measure.
compare_methods`): prompt lookup (chain of ``gamma`` tokens, and a tree of up to 4 continuations), a self-draft
skipping layers 10 and 20 (chain, and a tree with 2 candidates per position). ``*_speedup`` is plain decoding's
time over the method's; ``spec_greedy_speedup`` the best method's. ``forward_cost_k{k}`` is the time of one
cached forward of k tokens over that of 1 token. Prompt lookup also runs at gamma 2 and 8:
``lookup_best_gamma_measured`` is the fastest of its draft lengths, ``lookup_best_gamma_predicted`` the gamma
(0 .. 8) that maximizes ``E(alpha, gamma) / v(gamma + 1)`` with its measured acceptance rate alpha and the measured
forward costs. Every line after the header is ``name: number``.
"""

from __future__ import annotations

import sys

import torch
from _common import argument_parser


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argument_parser(__doc__, threads=True)
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens decoded per prompt (default 256)")
    parser.add_argument("--prompts", type=int, default=None, help="number of prompts (default 2)")
    parser.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt (default 128)")
    parser.add_argument("--gamma", type=int, default=4, help="draft length (default 4)")
    parser.add_argument("--record", default=None, help="also write the lines as JSON with provenance to this path")
    args = parser.parse_args(argv)

    from refimpl.llm import load_model
    from refimpl.llm.corpus import eval_ids
    from refimpl.speculative import LayerSkipDraft, PromptLookupDraft
    from refimpl.speculative.cost import best_gamma
    from refimpl.speculative.measure import compare_methods, forward_cost

    torch.set_num_threads(args.threads)
    new = args.new_tokens or (24 if args.quick else 256)
    n_prompts = args.prompts or (1 if args.quick else 2)
    model, tokenizer = load_model()
    ids = eval_ids(n_prompts * args.prompt_len, tokenizer).view(n_prompts, args.prompt_len).tolist()
    keep = [i for i in range(model.config.n_layers) if i not in (10, 20)]
    g = args.gamma
    methods = {
        "lookup": lambda: (PromptLookupDraft(), {"gamma": g}),
        "lookup_tree": lambda: (PromptLookupDraft(n_candidates=4), {"gamma": g, "tree": True}),
        "selfdraft": lambda: (LayerSkipDraft(model, keep), {"gamma": g}),
        "selfdraft_tree": lambda: (LayerSkipDraft(model, keep, width=2), {"gamma": g, "tree": True}),
    }
    print(f"# SmolLM2-135M, {n_prompts} prompts x {args.prompt_len} tokens (eval slice), {new} new tokens, gamma {g}")
    extra = (2, 8) if not args.quick else ()  # prompt lookup at other draft lengths: the best gamma, measured
    for gx in extra:
        methods[f"lookup_gamma{gx}"] = lambda gx=gx: (PromptLookupDraft(), {"gamma": gx})
    res = compare_methods(model, ids, new, methods)
    out: dict[str, float] = {"plain_tokens_per_s": res["plain"]["tokens_per_s"]}
    for name in methods:
        r, st = res[name], res[name]["stats"]
        out[f"{name}_tokens_per_s"] = r["tokens_per_s"]
        out[f"{name}_speedup"] = r["speedup"]
        out[f"{name}_identical"] = float(r["identical"])
        out[f"{name}_acceptance_rate"] = st.acceptance_rate
        out[f"{name}_tokens_per_target_forward"] = st.tokens_per_forward
    lk = res["lookup"]["stats"]
    for i, (a, d) in enumerate(zip(lk.accepted_at, lk.drafted_at)):
        out[f"lookup_acceptance_at_{i + 1}"] = a / d
    best = max(methods, key=lambda n: res[n]["speedup"])
    out["spec_greedy_speedup"] = res[best]["speedup"]
    out["spec_outputs_identical"] = float(all(res[n]["identical"] for n in methods))
    out["spec_tokens_per_target_forward"] = res[best]["stats"].tokens_per_forward
    out["spec_acceptance_rate"] = res[best]["stats"].acceptance_rate
    out["spec_mean_accepted_length"] = out["spec_tokens_per_target_forward"] - 1
    v = forward_cost(model, torch.tensor(ids[0]), range(2, 10))  # v[k]: a forward of k tokens over one of 1
    for k, ratio in v.items():
        out[f"forward_cost_k{k}"] = ratio
    if extra:  # the expected-tokens formula with lookup's measured alpha (c = 0) against the measured best
        v_of = [1.0] + [v[k] for k in range(2, 10)]  # v_of[gamma] = cost of gamma + 1 tokens, gamma = 0 .. 8
        out["lookup_best_gamma_predicted"] = best_gamma(lk.acceptance_rate, 0.0, v_of)
        measured = {gx: res["lookup" if gx == g else f"lookup_gamma{gx}"]["speedup"] for gx in {g, *extra}}
        out["lookup_best_gamma_measured"] = max(measured, key=measured.get)
    print(f"# best method: {best}")
    for key, value in out.items():
        print(f"{key}: {value:.4g}")
    if args.record:
        from refimpl.recording import provenance, write_recording

        command = "python benchmarks/bench_speculative.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_recording(args.record, {**provenance(command.strip()), "best_method": best, "lines": out})
    return out


if __name__ == "__main__":
    main()
