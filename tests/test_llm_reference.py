"""Our SmolLM2 against an independent implementation: Hugging Face ``transformers`` loading the same GGUF file.

``transformers`` has its own GGUF path: metadata -> ``LlamaConfig``, dequantization with gguf-py's numpy
kernels, its own reversal of llama.cpp's Q/K row permutation, its own tokenizer conversion and its own
``LlamaForCausalLM``. None of it shares code with ``refimpl.llm`` (which dequantizes with its own kernels and
builds its own tokenizer and decoder), so agreement on token ids, logits, perplexity and greedy text checks the
whole chain.

Slow (about 15-30 s on 2 cores: gguf-py dequantizes 135M weights in numpy): marked ``slow`` and ``model``.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from refimpl.llm import corpus, evaluate, evaluate_one_shot, find_gguf, generate, load_model

pytestmark = [pytest.mark.model, pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf():
    """(model, tokenizer) built by transformers from the GGUF file, offline.

    ``from_pretrained(..., gguf_file=...)`` needs the ``accelerate`` package, which the book does not install,
    so we call the same building blocks it calls: ``AutoConfig`` from the GGUF metadata, the model on the meta
    device, ``load_gguf_checkpoint`` for the dequantized (and un-permuted) weights, ``convert_gguf_tokenizer``.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.integrations.gguf import convert_gguf_tokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    path = find_gguf()
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)
    result = model.load_state_dict(parsed["tensors"], strict=False, assign=True)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys
    model.lm_head.weight = model.model.embed_tokens.weight  # tied head (tie_word_embeddings)
    model.model.rotary_emb = LlamaRotaryEmbedding(config)  # its buffers were on the meta device
    tokenizer, _ = convert_gguf_tokenizer("llama", parsed["tokenizer"])
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def ours():
    return load_model()


TEXT_EXTRA = 'x = 12345  # digits, "quotes" and naïve café ☕ 東京\n\tdef f(a, b=2):\n        return a ** b\n'


def test_same_token_ids(hf, ours):
    _, hf_tok = hf
    _, tok = ours
    text = corpus.load_text()[:6000] + TEXT_EXTRA
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text).ids
    assert len(ids) > 1000


def test_same_logits_and_perplexity(hf, ours):
    hf_model, _ = hf
    model, tok = ours
    ids = corpus.eval_ids(256, tok)
    with torch.inference_mode():
        ref = hf_model(ids[None]).logits.float()  # (1, 256, V)
    mine = model(ids[None])
    rel = float((mine - ref).abs().max() / ref.abs().max())
    assert rel < 1e-4, f"max |logit difference| / max |logit| = {rel:.2e}"
    assert torch.equal(mine.argmax(-1), ref.argmax(-1))

    # perplexity from transformers' logits (causal: the first 64 rows are those of a 64-token forward)
    def ref_perplexity(n: int) -> float:
        nll = torch.nn.functional.cross_entropy(ref[0, : n - 1].double(), ids[1:n])
        return math.exp(float(nll))

    one = evaluate_one_shot(model, ids)
    assert f"{one.perplexity:.4g}" == f"{ref_perplexity(256):.4g}", (one.perplexity, ref_perplexity(256))
    assert one.perplexity == pytest.approx(ref_perplexity(256), rel=2e-5)
    # and through the full cache, prefill then token by token (equal to one-shot: tests/test_llm.py)
    step = evaluate(model, ids[:64], prefill=16)
    assert step.perplexity == pytest.approx(ref_perplexity(64), rel=2e-5)


def test_same_greedy_text(hf, ours):
    hf_model, hf_tok = hf
    model, tok = ours
    prompt = "The capital of France is"
    ids = torch.tensor([hf_tok.encode(prompt).ids])
    with torch.inference_mode():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    ref_text = hf_tok.decode(out[0, ids.shape[1] :].tolist())
    assert generate(model, tok, prompt, 12) == ref_text
