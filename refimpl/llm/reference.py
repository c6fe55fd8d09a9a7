"""The independent implementation: Hugging Face ``transformers`` building SmolLM2 from the same GGUF file.

``transformers`` has its own GGUF path: metadata -> its ``LlamaConfig``, dequantization with gguf-py's numpy
kernels, its own reversal of llama.cpp's Q/K row permutation, its own tokenizer conversion and its own
``LlamaForCausalLM``. None of it shares code with :mod:`refimpl.llm`, so the tests compare token ids, logits,
perplexity and greedy text against it, and the SmolLM2 chapter times its decode step next to ours.

``transformers`` is a test dependency of the book, not of :mod:`refimpl`: it is imported when a function
here is called.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch

from refimpl._checks import check_positive_int, check_tensor
from refimpl.llm.gguf_file import find_gguf

__all__ = ["load_transformers", "time_transformers_decode"]


def load_transformers(path: str | os.PathLike[str] | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` built by ``transformers`` from the GGUF file (:func:`find_gguf` resolves ``path``),
    offline, float32, in eval mode.

    ``from_pretrained(..., gguf_file=...)`` needs the ``accelerate`` package, which the book does not install,
    so this calls the building blocks it calls: ``AutoConfig`` from the GGUF metadata, the model on the meta
    device, ``load_gguf_checkpoint`` for the dequantized (and un-permuted) weights, ``convert_gguf_tokenizer``.
    Raises ``ImportError`` if ``transformers`` is not installed.

    Quiet: ``transformers`` imports ``torchao`` when it is installed (the quantization chapter's tests compare
    against it), whose import logs warnings about CUDA-only extensions and torch's pytree registry that do not
    apply here; those two loggers are raised to errors.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.integrations.gguf import convert_gguf_tokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    file = find_gguf(path)
    config = AutoConfig.from_pretrained(str(file.parent), gguf_file=file.name)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    parsed = load_gguf_checkpoint(str(file), return_tensors=True, model_to_load=model)
    result = model.load_state_dict(parsed["tensors"], strict=False, assign=True)
    if result.missing_keys != ["lm_head.weight"] or result.unexpected_keys:
        raise RuntimeError(f"unexpected GGUF weights for transformers: {result}")
    model.lm_head.weight = model.model.embed_tokens.weight  # tied head (tie_word_embeddings)
    model.model.rotary_emb = LlamaRotaryEmbedding(config)  # its buffers were on the meta device
    tokenizer, _ = convert_gguf_tokenizer("llama", parsed["tokenizer"])
    return model.eval(), tokenizer


@torch.inference_mode()
def time_transformers_decode(model: Any, prompt: torch.Tensor, steps: int, repeats: int = 3) -> float:
    """Seconds of one greedy decode step of a ``transformers`` causal LM after a prefill of ``prompt: (T,)``,
    through a fresh ``DynamicCache``: the fastest of ``steps`` steps in each of ``repeats`` runs, the convention
    of :func:`refimpl.llm.perf.time_decode`."""
    from transformers import DynamicCache

    steps = check_positive_int("steps", steps)
    repeats = check_positive_int("repeats", repeats)
    check_tensor("prompt", prompt, ndim=1, dtypes=[torch.int64, torch.int32])
    best = float("inf")
    for _ in range(repeats):
        cache = DynamicCache()
        nxt = model(prompt[None], cache=cache, use_cache=True).logits[:, -1:].argmax(-1)  # (1, 1)
        for _ in range(steps):
            start = time.perf_counter()
            nxt = model(nxt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            best = min(best, time.perf_counter() - start)
    return best
