"""KIVI benchmark: bytes of a 2-bit KIVI cache vs fp16, and the perplexity it costs SmolLM2-135M.

Prints ``name: value`` lines:

* ``kivi2_bytes_ratio``: ``KIVICache(bits=2).nbytes() / FullCache.nbytes()`` after the same fp16 keys and values
  of a Llama-2-7B-shaped layer (32 KV heads of 128 channels) at context 4096 (``--quick``: 256); everything the
  cache holds is counted: packed codes, fp16 scales and zero points, the full-precision residual.
* ``kivi2_bits_per_element``: the same, as bits per stored K/V element (the roofline model's ``kv_bits``).
* ``kivi2_ppl_increase`` and ``kivi2_ppl_increase_se`` (and ``kivi4_...``, ``kivi2_keys_per_token_...``,
  ``kivi2_values_per_channel_...``, ``kivi2_quantize_then_attend_...``): perplexity relative to the
  full-precision cache, minus 1, as the mean over ``--slices`` disjoint windows of the book's corpus and its
  standard error (:func:`refimpl.llm.paired_increase`), measured on the decoded tokens: the first ``prefill``
  tokens of each window in one call, then ``decode`` tokens one step at a time through the cache; all
  configurations and windows decode as the rows of one batch (:func:`refimpl.llm.evaluate_many`), as in the
  chapter. ``kivi2_decode_bits``: KIVI-2's bits per number (fp16 storage, everything included) averaged over
  the decode steps, i.e. how compressed the cache was while it was measured. ``kivi2_r256_...`` and
  ``kivi2_g16_...``: a larger window and smaller groups. ``{name}_vs_kivi2`` (and ``_se``): the same
  configurations against KIVI-2 on the same windows.

``--record PATH`` also writes the lines as JSON with provenance (:mod:`refimpl.recording`); the chapter reads
``data/measurements/kivi_cpu.json``, made by ``python benchmarks/bench_kivi.py --record
data/measurements/kivi_cpu.json``.

Usage: ``python benchmarks/bench_kivi.py [--quick] [--slices S] [--decode N] [--prefill N]``.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
from _common import argument_parser, report

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


def ppl_increase(slices: int, prefill: int, decode: int) -> dict[str, float]:
    """Perplexity increase over full precision of each cache configuration on the decoded tokens of ``slices``
    disjoint windows: ``{name_ppl_increase: mean, name_ppl_increase_se: standard error}``, plus ``full_ppl``."""
    from refimpl.llm import evaluate_many, load_model, paired_increase
    from refimpl.llm.corpus import slice_rows

    model, tokenizer = load_model()
    windows = slice_rows(slices, prefill + decode + 1, tokenizer)  # (S, N)
    policies = {
        "full": FullCache,
        "kivi2": lambda: KIVICache(bits=2),
        "kivi4": lambda: KIVICache(bits=4),
        "kivi2_keys_per_token": lambda: KIVICache(bits=2, key_axis="token"),
        "kivi2_values_per_channel": lambda: KIVICache(bits=2, value_axis="channel"),
        "kivi2_quantize_then_attend": lambda: KIVICache(bits=2, order="quantize_then_attend"),
        "kivi2_r256": lambda: KIVICache(bits=2, residual_length=256),
        "kivi2_g16": lambda: KIVICache(bits=2, group_size=16),
    }
    results = evaluate_many(model, windows, policies, prefill=prefill, threads=1)
    base = results["full"].slice_nll()
    out = {"full_ppl": results["full"].decode_perplexity()}
    for name, r in results.items():
        if name != "full":
            inc = paired_increase(r.slice_nll(), base)
            out[f"{name}_ppl_increase"] = inc.mean
            out[f"{name}_ppl_increase_se"] = inc.se
    for name, r in results.items():  # paired against KIVI-2 on the same windows: rankings with their noise
        if name not in ("full", "kivi2"):
            inc = paired_increase(r.slice_nll(), results["kivi2"].slice_nll())
            out[f"{name}_vs_kivi2"] = inc.mean
            out[f"{name}_vs_kivi2_se"] = inc.se
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser(__doc__, "tiny sizes (a smoke test)")
    parser.add_argument("--context", type=int, default=None, help="context for the bytes ratio (default 4096)")
    parser.add_argument("--slices", type=int, default=None, help="disjoint corpus windows (default 6; quick 2)")
    parser.add_argument("--prefill", type=int, default=None, help="prefilled tokens (default 1024; quick 160)")
    parser.add_argument("--decode", type=int, default=None, help="decoded tokens per window (default 128; quick 4)")
    parser.add_argument("--record", default=None, help="also write the lines as JSON with provenance to this path")
    args = parser.parse_args(argv)
    context = args.context or (256 if args.quick else 4096)
    slices = args.slices or (2 if args.quick else 6)
    prefill = args.prefill or (160 if args.quick else 1024)  # quick: past R = 128, so tokens are quantized
    decode = args.decode or (4 if args.quick else 128)

    t0 = time.perf_counter()
    ratio, bits = bytes_ratio(context)
    report({"context": context, "kivi2_bytes_ratio": ratio, "kivi2_bits_per_element": bits})
    inc = ppl_increase(slices, prefill, decode)
    decode_bits = sum(bits_per_element(t, bits=2) for t in range(prefill + 1, prefill + decode + 1)) / decode
    values = {"ppl_windows": slices, "ppl_tokens_decoded": decode, "kivi2_decode_bits": decode_bits}
    lines = {**values, **inc}
    report({**lines, "seconds": time.perf_counter() - t0})
    if args.record:
        from refimpl.recording import provenance, write_recording

        command = "python benchmarks/bench_kivi.py " + " ".join(argv if argv is not None else sys.argv[1:])
        lines |= {"context": context, "kivi2_bytes_ratio": ratio, "kivi2_bits_per_element": bits}
        lines |= {"ppl_prefill": prefill}
        write_recording(args.record, {**provenance(command.strip()), "lines": lines})
    return 0


if __name__ == "__main__":
    sys.exit(main())
