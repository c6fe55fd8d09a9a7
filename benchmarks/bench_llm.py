"""Benchmark: SmolLM2-135M decode and prefill speed on this CPU against the roofline.

Batch-1 decode reads every weight once per token (float32: ``config.decode_weight_bytes()`` bytes, plus the
KV cache), so its ceiling is ``memory bandwidth / bytes per token`` tokens/s. Prefill of T tokens is a
sequence of matrix-matrix products, bound by the matmul throughput: ``FLOP/s / FLOPs per token``.
Both ceilings are measured in the same run with ``refimpl.roofline.measure`` (STREAM copy bandwidth, best fp32
matmul), so the printed fractions are ratios of two measurements on the same machine.

Usage: ``python benchmarks/bench_llm.py [--quick] [--context N] [--steps N] [--prefill-tokens N]``.
Prints ``name: value`` lines.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from refimpl.llm import corpus, load_model  # noqa: E402
from refimpl.llm.config import LlamaConfig  # noqa: E402
from refimpl.roofline import measure  # noqa: E402


def prefill_flops(config: LlamaConfig, t: int) -> float:
    """FLOPs of a prefill of ``t`` tokens: 2 per weight per token (every matrix, the head on every token) plus
    causal attention (``q k^T`` and ``p v``: ``2 * 2 * D`` per query head and visible key)."""
    c = config
    matrix = sum(v for k, v in c.layer_params().items() if not k.endswith("norm")) * c.n_layers
    head = c.vocab_size * c.d_model
    visible = t * (t + 1) / 2  # (query, key) pairs under the causal mask
    attention = c.n_layers * c.n_heads * 4 * c.head_dim * visible
    return 2.0 * (matrix + head) * t + attention


def decode_seconds_per_token(model, prompt: torch.Tensor, steps: int, repeats: int) -> float:
    """Seconds per decode step after a prefill of ``prompt``: min over ``repeats`` runs of the mean of
    ``steps`` steps (the minimum is least disturbed by other processes)."""
    best = float("inf")
    n = prompt.shape[0]
    for _ in range(repeats):
        caches = model.new_caches()
        logits = model(prompt[None], caches, 0)
        nxt = int(logits[0, -1].argmax())
        start = time.perf_counter()
        for i in range(steps):
            logits = model(torch.tensor([[nxt]]), caches, n + i)
            nxt = int(logits[0, -1].argmax())
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def main(argv: Sequence[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    p.add_argument("--context", type=int, default=128, help="prompt tokens before the timed decode steps")
    p.add_argument("--steps", type=int, default=32, help="decode steps per timed run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prefill-tokens", type=int, default=256)
    args = p.parse_args(argv)
    if args.quick:
        args.context, args.steps, args.repeats, args.prefill_tokens = 8, 3, 1, 16
    stream_bytes = (16 if args.quick else 256) * 2**20

    model, tok = load_model()
    c = model.config
    ids = corpus.eval_ids(max(args.context, args.prefill_tokens), tok)

    bandwidth = measure.stream_bandwidth(stream_bytes, repeats=3 if args.quick else 5)  # B/s
    peak = max(measure.matmul_flops(n, repeats=2 if args.quick else 5) for n in ((256,) if args.quick else (512, 1024)))

    # decode: weights once per token + the KV cache read at the mean context of the timed steps
    s_decode = decode_seconds_per_token(model, ids[: args.context], args.steps, args.repeats)
    mean_context = args.context + (args.steps + 1) / 2
    bytes_per_token = c.decode_weight_bytes(4) + c.kv_bytes_per_token(4) * mean_context
    decode_bound = bandwidth / bytes_per_token

    # prefill: one forward of T tokens through fresh caches (what generation does), min over repeats
    t = args.prefill_tokens
    s_prefill = measure.time_fn(lambda: model(ids[None, :t], model.new_caches(), 0), repeats=args.repeats)
    flops_per_token = prefill_flops(c, t) / t
    prefill_bound = peak / flops_per_token

    lines = [
        f"threads: {torch.get_num_threads()}",
        f"weight_bytes_per_token: {bytes_per_token:.0f}",
        f"stream_bandwidth_GBps: {bandwidth / 1e9:.3f}",
        f"decode_context: {args.context}",
        f"decode_ms_per_token: {s_decode * 1e3:.3f}",
        f"decode_tokens_per_s: {1 / s_decode:.3f}",
        f"decode_bound_tokens_per_s: {decode_bound:.3f}",
        f"decode_roofline_fraction: {1 / s_decode / decode_bound:.3f}",
        f"matmul_GFLOPs: {peak / 1e9:.3f}",
        f"prefill_tokens: {t}",
        f"prefill_tokens_per_s: {t / s_prefill:.3f}",
        f"prefill_bound_tokens_per_s: {prefill_bound:.3f}",
        f"prefill_roofline_fraction: {t / s_prefill / prefill_bound:.3f}",
    ]
    for line in lines:
        print(line)
    return lines


if __name__ == "__main__":
    main()
