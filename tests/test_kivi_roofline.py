"""The KIVI and roofline chapters cannot disagree about KIVI's bytes: both take a KIVI configuration's bits per
element from :func:`refimpl.kivi.bits_per_element` (scales, zero points and the residual window included), and
the roofline analyzer's KV bytes at those bits equal what a :class:`~refimpl.kivi.KIVICache` holds."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch

import refimpl.roofline as rl
from refimpl.kivi import KIVICache, bits_per_element

ROOT = Path(__file__).resolve().parent.parent


def _code(chapter: str) -> str:
    nb = json.loads((ROOT / "chapters" / f"{chapter}.ipynb").read_text())
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")


@pytest.mark.parametrize(("seq", "bits", "g", "r"), [(300, 2, 32, 128), (256, 4, 32, 128), (200, 2, 16, 32)])
def test_analyzer_kv_bytes_at_kivi_bits_equal_the_cache(seq: int, bits: int, g: int, r: int) -> None:
    """kv_cache_bytes(kv_bits=bits_per_element(...)) == KIVICache.nbytes() summed over layers (fp16 tokens)."""
    model = dataclasses.replace(rl.get_model("llama-2-7b"), n_layers=2, n_kv_heads=4)  # a small GQA shape
    per_element = bits_per_element(seq, bits, g, r)
    gen = torch.Generator().manual_seed(seq)
    held = 0
    for _ in range(model.n_layers):
        cache = KIVICache(bits, g, r)
        k, v = (torch.randn(1, model.n_kv_heads, seq, model.head_dim, generator=gen).half() for _ in range(2))
        cache.update(k, v, torch.arange(seq))
        held += cache.nbytes()
    analyzed = rl.kv_cache_bytes(model, rl.Workload(batch=1, seq=seq, kv_bits=per_element))
    assert math.isclose(analyzed, held, rel_tol=1e-12)
    assert per_element > bits, "scales, zero points and the residual cost more than the codes alone"


def test_both_chapters_take_kivi_bits_from_the_one_function() -> None:
    """The roofline chapter's KIVI variant and the KIVI chapter's roofline both call bits_per_element, at the
    same setting (Llama-2-7B, H100, batch 64, context 4096), and neither passes KIVI as a bare ``kv_bits=2``."""
    roofline, kivi = _code("roofline"), _code("kivi")
    for name, code in (("roofline", roofline), ("kivi", kivi)):
        assert "bits_per_element(" in code, f"the {name} chapter must use refimpl.kivi.bits_per_element"
        assert not re.search(r"kv_bits\s*=\s*2\b", code), f"the {name} chapter passes kv_bits=2 for KIVI"
    assert "BATCH, CONTEXT = 64, 4096" in kivi
    assert 'base_kw = dict(stage="decode", batch=64, seq=4096, dtype="bf16")' in roofline
    # The same setting gives the same step time whichever chapter's dtype (fp16 or bf16 are both 16 bits).
    kv_bits = bits_per_element(4096, 2)
    times = [
        rl.analyze("llama-2-7b", "h100-sxm", rl.Workload(batch=64, seq=4096, dtype=d, kv_bits=kv_bits)).time
        for d in ("fp16", "bf16")
    ]
    assert math.isclose(*times, rel_tol=1e-12)
