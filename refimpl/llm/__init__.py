"""SmolLM2-135M in plain PyTorch: GGUF loading, tokenizer, decoder, KV-cache interface, perplexity harness.

=============================  ===============================================================
``refimpl.llm.gguf_file``      find/verify the GGUF file, read its metadata, dequantize weights
``refimpl.llm.config``         :class:`LlamaConfig`, the model's shapes
``refimpl.llm.tokenizer``      byte-level BPE rebuilt from the file's vocabulary and merges
``refimpl.llm.model``          the decoder (:class:`Llama`) and :func:`load_model`
``refimpl.llm.matvec``         ``x @ W`` for a decode step's few rows: a C loop that reads ``W`` at memory speed
``refimpl.llm.cache``          the KV-cache interface (:class:`KVCache`) and :class:`FullCache`
``refimpl.llm.generate``       :func:`generate`: greedy or temperature + top-p :class:`Sampling`, streaming
``refimpl.llm.perplexity``     :func:`evaluate_many`: perplexity of cache configurations, step by step
``refimpl.llm.corpus``         the fixed evaluation corpus (CPython's pydoc topics)
``refimpl.llm.perf``           FLOPs and bytes of a forward call, measured decode speed
``refimpl.llm.reference``      the independent implementation: ``transformers`` on the same GGUF file
=============================  ===============================================================

The layer names no technique: KIVI, the eviction policies and others hand their cache classes (factories) to
:func:`evaluate_many`, :func:`generate` and :func:`make_caches`.

Command line: ``python -m refimpl.llm generate "PROMPT"`` and ``python -m refimpl.llm perplexity FILE``
(defined in :mod:`refimpl.cli`, above the techniques whose caches it names).
"""

from refimpl.llm.cache import CacheFactory, FullCache, KVCache, grouped_attention, make_caches
from refimpl.llm.config import LlamaConfig
from refimpl.llm.generate import Sampling, generate, generate_ids
from refimpl.llm.gguf_file import find_gguf, read_config
from refimpl.llm.model import Llama, load_model
from refimpl.llm.perplexity import (
    Increase,
    PerplexityResult,
    RowCaches,
    evaluate,
    evaluate_many,
    evaluate_one_shot,
    paired_increase,
)
from refimpl.llm.tokenizer import Tokenizer

__all__ = [
    "CacheFactory",
    "FullCache",
    "Increase",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "PerplexityResult",
    "RowCaches",
    "Sampling",
    "Tokenizer",
    "evaluate",
    "evaluate_many",
    "evaluate_one_shot",
    "find_gguf",
    "generate",
    "generate_ids",
    "grouped_attention",
    "load_model",
    "make_caches",
    "paired_increase",
    "read_config",
]
