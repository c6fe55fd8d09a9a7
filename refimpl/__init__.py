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
``refimpl.quant``          weight/activation quantization, outliers       ``chapters/quantization``
``refimpl.moe``            Mixture-of-Experts routing and dispatch        ``chapters/moe``
``refimpl.parallel``       data, ZeRO, tensor, pipeline parallelism       ``chapters/parallel``
``refimpl.speculative``    speculative decoding, self-drafts, token trees ``chapters/speculative``
``refimpl.llm``            SmolLM2-135M in plain PyTorch                  ``chapters/smollm2``
``refimpl.serving``        paged KV cache, continuous batching            ``chapters/serving``
=========================  =============================================  ==========================

Helpers every chapter uses: ``refimpl.display`` (``show_source``, the book's figure style) and
``refimpl.recording`` (provenance of recorded GPU measurements), ``refimpl.interact`` (widgets that also work
while a notebook executes in the book build). ``python -m refimpl`` checks an installation.

Shared pieces: ``refimpl.model_config`` (the model shape the cost model and the LLM share), ``refimpl.caches``
(the KV-cache policies of every technique by name) and ``refimpl.cli`` (the LLM's command line, which uses
them). Imports point down: helpers, then ``roofline`` and ``llm``, then the techniques, then these registries.

``import refimpl`` is cheap: submodules (and torch) are imported only when first used.
"""

from __future__ import annotations

from refimpl._lazy import lazy_exports

__version__ = "0.1.0"

_SUBMODULES = (
    "attention",
    "caches",
    "cli",
    "display",
    "eviction",
    "interact",
    "kivi",
    "llm",
    "memo",
    "model_config",
    "moe",
    "parallel",
    "quant",
    "recording",
    "roofline",
    "serving",
    "speculative",
)

__all__ = ["__version__", *_SUBMODULES]

_, __getattr__, _ = lazy_exports(__name__, dict.fromkeys(_SUBMODULES, ""))  # imports a submodule on first use


def __dir__() -> list[str]:
    return sorted(__all__)
