"""refimpl: minimal, tested reference implementations of efficient-ML-systems techniques.

Each submodule implements one technique from the literature and is explained by one chapter of the book:

=========================  =============================================  ==========================
module                     technique                                      chapter
=========================  =============================================  ==========================
``refimpl.roofline``       roofline cost model, transformer analyzer      ``chapters/roofline``
``refimpl.attention``      FlashAttention tiling (PyTorch and Triton)     ``chapters/flash_attention``
``refimpl.memo``           MEMO activation swapping + recomputation       ``chapters/memo``
``refimpl.kivi``           KIVI 2-bit KV-cache quantization               ``chapters/kivi``
``refimpl.eviction``       Scissorhands, H2O, StreamingLLM eviction       ``chapters/scissorhands``
``refimpl.moe``            Mixture-of-Experts routing and dispatch        ``chapters/moe``
``refimpl.speculative``    speculative decoding, self-drafts, token trees ``chapters/speculative``
``refimpl.llm``            SmolLM2-135M in plain PyTorch                  ``chapters/smollm2``
=========================  =============================================  ==========================

Helpers every chapter uses: ``refimpl.display`` (``show_source``, the book's figure style) and
``refimpl.recording`` (provenance of recorded GPU measurements). ``python -m refimpl`` checks an installation.

``import refimpl`` is cheap: submodules (and torch) are imported only when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = (
    "attention",
    "display",
    "eviction",
    "kivi",
    "llm",
    "memo",
    "moe",
    "recording",
    "roofline",
    "speculative",
)

__all__ = ["__version__", *_SUBMODULES]


def __getattr__(name: str) -> Any:
    """Import a submodule on first attribute access (PEP 562), keeping ``import refimpl`` light."""
    if name in _SUBMODULES:
        module = importlib.import_module(f"refimpl.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'refimpl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
