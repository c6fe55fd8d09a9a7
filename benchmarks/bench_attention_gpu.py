"""GPU benchmark: the Triton FlashAttention-2 kernels vs PyTorch SDPA's flash and cuDNN backends, in TFLOP/s.

    python benchmarks/bench_attention_gpu.py            # B=4, H=16, d=128, bf16, N in {1024, 4096, 16384}
    python benchmarks/bench_attention_gpu.py --quick    # one small size (a smoke test on a GPU)

Writes a recording (JSON: device, date, library versions, command, configuration, one row per measurement) to
``--out`` (default ``data/measurements/flash_attention_gpu.json``; not written with ``--quick`` unless ``--out``
is given) and prints ``name: value`` lines. FLOPs follow the FlashAttention papers: forward ``4 B H N^2 d``,
halved for causal; backward 2.5 times the forward. Times are medians of ``triton.testing.do_bench``.
Every implementation's output is checked against SDPA's before it is timed. Exits with status 2 and a message
when no CUDA device exists: the numbers cannot be produced on a CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from _common import argument_parser, progress, report, require_cuda

from refimpl.recording import provenance, write_recording

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "data" / "measurements" / "flash_attention_gpu.json"


def attention_flops(batch: int, heads: int, n: int, d: int, causal: bool, direction: str) -> float:
    """FLOPs of attention as the FlashAttention papers count them (``4 B H N^2 d``; causal /2; bwd x2.5)."""
    flops = 4.0 * batch * heads * n * n * d
    if causal:
        flops /= 2
    return flops * (2.5 if direction == "bwd" else 1.0)


def _implementations():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from refimpl.attention.triton_kernels import triton_flash_attention

    def sdpa_with(backend):
        def run(q, k, v, causal):
            with sdpa_kernel(backend):
                return sdpa(q, k, v, is_causal=causal)

        return run

    return {
        "triton": lambda q, k, v, causal: triton_flash_attention(q, k, v, causal),
        "sdpa_flash": sdpa_with(SDPBackend.FLASH_ATTENTION),
        "sdpa_cudnn": sdpa_with(SDPBackend.CUDNN_ATTENTION),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argument_parser(__doc__, "one small size, no recording unless --out")
    parser.add_argument("--out", type=Path, default=None, help=f"recording path (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    require_cuda("bench_attention_gpu", "GPU kernels", "benchmarks/bench_attention.py")
    from triton.testing import do_bench

    batch, heads, d, dtype = (1, 2, 128, torch.bfloat16) if args.quick else (4, 16, 128, torch.bfloat16)
    sizes = (1024,) if args.quick else (1024, 4096, 16384)
    impls = _implementations()
    rows = []
    for n in progress(sizes, desc="bench_attention_gpu"):
        for causal in (False, True):
            g = torch.Generator(device="cuda").manual_seed(0)
            q, k, v, do = (torch.randn(batch, heads, n, d, device="cuda", dtype=dtype, generator=g) for _ in range(4))
            reference = impls["sdpa_flash"](q, k, v, causal)
            for name, fn in impls.items():
                row = {"impl": name, "n": n, "causal": causal}
                try:
                    out = fn(q, k, v, causal)
                    err = (out.float() - reference.float()).abs().max().item()
                    if not err < 2e-2:
                        raise AssertionError(f"{name} differs from sdpa_flash by {err}")
                    fwd_ms = do_bench(lambda fn=fn, q=q, k=k, v=v, causal=causal: fn(q, k, v, causal))
                    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
                    o = fn(qg, kg, vg, causal)
                    bwd_ms = do_bench(lambda o=o, do=do: o.backward(do, retain_graph=True), grad_to_none=[qg, kg, vg])
                except Exception as exc:  # a backend may not support this GPU or shape; record why
                    rows.append({**row, "error": f"{type(exc).__name__}: {exc}"[:300]})
                    continue
                for direction, ms in (("fwd", fwd_ms), ("bwd", bwd_ms)):
                    tflops = attention_flops(batch, heads, n, d, causal, direction) / (ms * 1e-3) / 1e12
                    rows.append({**row, "direction": direction, "ms": ms, "tflops": tflops, "max_abs_err": err})
    command = " ".join(["python", sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    record = {
        "benchmark": "flash_attention_gpu",
        **provenance(command),
        "config": {
            "batch": batch,
            "heads": heads,
            "head_dim": d,
            "dtype": str(dtype).replace("torch.", ""),
            "flops": "fwd 4*B*H*N^2*d, causal /2, bwd x2.5",
            "timer": "triton.testing.do_bench median",
        },
        "results": rows,
    }
    out = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)
    if out is not None:
        write_recording(out, record)
    values = {}
    for r in rows:
        tag = f"{r['impl']}_{r.get('direction', 'fwd')}_{'causal' if r['causal'] else 'full'}_n{r['n']}"
        values.update({f"{tag}_tflops": r["tflops"]} if "tflops" in r else {f"{tag}_error": r["error"]})
    by_key = {(r["impl"], r["direction"], r["causal"], r["n"]): r["tflops"] for r in rows if "tflops" in r}
    n_ref = 4096 if 4096 in sizes else sizes[0]
    for causal in (False, True):
        ours, theirs = by_key.get(("triton", "fwd", causal, n_ref)), by_key.get(("sdpa_flash", "fwd", causal, n_ref))
        if ours and theirs:
            values[f"triton_vs_sdpa_flash_fwd_{'causal' if causal else 'full'}_n{n_ref}"] = ours / theirs
    report(values, header=f"{record['device']}, B={batch} H={heads} d={d} {record['config']['dtype']}")
    return record


if __name__ == "__main__":
    main()
