"""KIVI benchmark: bytes of a 2-bit KIVI cache vs fp16, and the perplexity it costs SmolLM2-135M.

Prints ``name: value`` lines:

* ``kivi2_bytes_ratio``: ``KIVICache(bits=2).nbytes() / FullCache.nbytes()`` after the same fp16 keys and values
  of a Llama-2-7B-shaped layer (32 KV heads of 128 channels) at context 4096 (``--quick``: 256); everything the
  cache holds is counted: packed codes, fp16 scales and zero points, the full-precision residual.
* ``kivi2_bits_per_element``: the same, as bits per stored K/V element (the roofline model's ``kv_bits``).
* ``kivi2_ppl_increase`` (and ``kivi4_...``, ``kivi2_keys_per_token_...``): perplexity relative to the
  full-precision cache, minus 1, on the book's corpus slice: the first ``prefill`` tokens in one call, then
  ``decode`` tokens one step at a time through the cache (:func:`refimpl.llm.perplexity.evaluate`, one
  configuration per run); measured on the decoded tokens.

Usage: ``python benchmarks/bench_kivi.py [--quick] [--decode N] [--prefill N]``.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
from _common import argument_parser, progress, report

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from refimpl.kivi import KIVICache, bits_per_element  # noqa: E402
from refimpl.llm.cache import FullCache  # noqa: E402


def bytes_ratio(context: int, heads: int = 32, head_dim: int = 128) -> tuple[float, float]:
    """(KIVI-2 bytes / fp16 bytes, KIVI-2 bits per element) for one layer at ``context`` tokens."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, heads, context, head_dim, generator=g).half()
    v = torch.randn(1, heads, context, head_dim, generator=g).half()
    kivi, full = KIVICache(bits=2), FullCache()
    for cache in (kivi, full):
        cache.update(k, v, torch.arange(context))
    ratio = kivi.nbytes() / full.nbytes()
    assert math.isclose(16 * ratio, bits_per_element(context, bits=2), rel_tol=1e-12)
    return ratio, 16 * ratio


def ppl_increase(prefill: int, decode: int) -> dict[str, float]:
    """Perplexity increase over full precision of each cache policy, on the decoded tokens of the slice."""
    from refimpl.llm import evaluate, load_model
    from refimpl.llm.corpus import eval_ids

    model, tokenizer = load_model()
    ids = eval_ids(prefill + decode + 1, tokenizer)
    policies = {
        "full": FullCache,
        "kivi2": lambda: KIVICache(bits=2),
        "kivi4": lambda: KIVICache(bits=4),
        "kivi2_keys_per_token": lambda: KIVICache(bits=2, key_axis="token"),
    }
    # One configuration per run: batching the four rows halves the time, but its rounding flips a few 2-bit codes
    # and moves kivi2_keys_per_token_ppl_increase in the third digit (0.8411 -> 0.8429 at the defaults).
    results = {
        name: evaluate(model, ids, make, prefill=prefill)
        for name, make in progress(policies.items(), desc="bench_kivi", total=len(policies))
    }
    ppl = {name: r.decode_perplexity() for name, r in results.items()}  # the decoded tokens
    return {name: ppl[name] / ppl["full"] - 1 for name in policies if name != "full"} | {"full_ppl": ppl["full"]}


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser(__doc__, "tiny sizes (a smoke test)")
    parser.add_argument("--context", type=int, default=None, help="context for the bytes ratio (default 4096)")
    parser.add_argument("--prefill", type=int, default=None, help="prefilled tokens (default 512; quick 40)")
    parser.add_argument("--decode", type=int, default=None, help="decoded tokens (default 512; quick 4)")
    args = parser.parse_args(argv)
    context = args.context or (256 if args.quick else 4096)
    prefill = args.prefill or (40 if args.quick else 512)
    decode = args.decode or (4 if args.quick else 512)

    t0 = time.perf_counter()
    ratio, bits = bytes_ratio(context)
    report({"context": context, "kivi2_bytes_ratio": ratio, "kivi2_bits_per_element": bits})
    inc = ppl_increase(prefill, decode)
    values = {"ppl_tokens_decoded": decode, "full_ppl": inc.pop("full_ppl")}
    values.update({f"{name}_ppl_increase": value for name, value in inc.items()})
    report({**values, "seconds": time.perf_counter() - t0})
    return 0


if __name__ == "__main__":
    sys.exit(main())
