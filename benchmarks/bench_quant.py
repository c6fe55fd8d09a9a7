"""Weight and activation quantization benchmark: the perplexity each recipe costs SmolLM2-135M.

Prints ``name: value`` lines, each a relative perplexity increase ``PPL / PPL_float - 1`` over the float model
on the same tokens (the mean over ``--slices`` disjoint slices of ``--tokens`` tokens of the book's corpus,
scored as rows of one batch; ``*_se`` lines give the standard error over slices), calibration on the disjoint
``heldout`` region:

* ``w4_g128_rtn_ppl_increase``: 4-bit asymmetric round-to-nearest weights in groups of 128. SmolLM2's width
  576 is not a multiple of 128, so each row ends with a shorter group of 64 (``partial_group=True``, the
  ``column // 128`` convention of GPTQ's and AutoGPTQ's code), its statistics counted in the bits;
* ``w4_g128_gptq_ppl_increase``: the same grid with GPTQ, on the rotated model (the QuaRot recipe);
* ``w4_rotated_ppl_increase``: RTN g128 on the rotated model;
* ``w4_g64_rtn_ppl_increase`` / ``w4_g64_gptq_ppl_increase``: the same with groups of 64, which divide 576;
* ``w8a8_int_ppl_increase`` / ``w8a8_int_rotated_ppl_increase``: INT8 per-channel weights, INT8 per-token
  activations, without and with the Hadamard rotation;
* ``w4_bits_per_weight`` / ``w4_g64_bits_per_weight``: bits per weight of the W4 g128 / g64 grids, fp16 scales
  and zero points included.

The GGUF file's weights are already Q4_1 (groups of 32): a W4 grid aligned with them would be lossless, which
is why these recipes use groups of 128 or 64 and rotations. Targets: GPTQ below RTN, ``w8a8_int_rotated`` <=
0.02.

Usage: ``python benchmarks/bench_quant.py [--quick] [--slices N] [--tokens N]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from refimpl.llm import load_model, paired_increase  # noqa: E402
from refimpl.llm.corpus import slice_rows  # noqa: E402
from refimpl.quant import experiment as qx  # noqa: E402
from refimpl.quant.model import quantize_activations, rotate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 slices of 128 tokens, 2 x 128 calibration tokens")
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    slices, tokens = (3, 128) if args.quick else (args.slices, args.tokens)
    calib_rows = 2 if args.quick else 8
    t0 = time.perf_counter()
    model, tokenizer = load_model()
    rows = slice_rows(slices, tokens + 1, tokenizer)
    calib = slice_rows(calib_rows, 128, tokenizer, "heldout")
    base = qx.slice_nll(model, rows)
    rotated = rotate(model)
    act8 = qx.int_activations(8, "token")
    g128 = {"group_size": 128, "symmetric": False, "partial_group": True}
    g64 = {"group_size": 64, "symmetric": False}
    w4, w4_bits = qx.quantize_weights(model, qx.rtn(4, "group", **g128))
    w4_g64, w4_g64_bits = qx.quantize_weights(model, qx.rtn(4, "group", **g64))
    w8, _ = qx.quantize_weights(model, qx.rtn(8, "channel"))
    w8_rot, _ = qx.quantize_weights(rotated, qx.rtn(8, "channel"))
    configs = {
        "w4_g128_rtn": lambda: w4,
        "w4_g128_gptq": lambda: qx.quantize_weights_gptq(rotated, calib, bits=4, block_size=128, **g128)[0],
        "w4_rotated": lambda: qx.quantize_weights(rotated, qx.rtn(4, "group", **g128))[0],
        "w4_g64_rtn": lambda: w4_g64,
        "w4_g64_gptq": lambda: qx.quantize_weights_gptq(rotated, calib, bits=4, block_size=64, **g64)[0],
        "w8a8_int": lambda: quantize_activations(w8, act8),
        "w8a8_int_rotated": lambda: quantize_activations(w8_rot, act8),
    }
    with torch.inference_mode():
        for name, build in configs.items():
            inc = paired_increase(qx.slice_nll(build(), rows), base)
            print(f"{name}_ppl_increase: {inc.mean:.4f}")
            print(f"{name}_ppl_increase_se: {inc.se:.4f}")
    print(f"w4_bits_per_weight: {w4_bits:.4f}")
    print(f"w4_g64_bits_per_weight: {w4_g64_bits:.4f}")
    print(f"n_slices: {slices}")
    print(f"tokens_per_slice: {tokens}")
    print(f"seconds: {time.perf_counter() - t0:.1f}")


if __name__ == "__main__":
    main()
