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

import pytest
import torch

from refimpl.llm import corpus, evaluate, evaluate_one_shot, generate, generate_ids, load_model
from refimpl.llm.reference import load_transformers, time_transformers_decode

pytestmark = [pytest.mark.model, pytest.mark.slow]

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Single-threaded, as in tests/test_llm.py: robust on a CPU shared with other processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def hf():
    """(model, tokenizer) built by transformers from the GGUF file, offline (:mod:`refimpl.llm.reference`)."""
    return load_transformers()


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


def test_transformers_decode_timing_and_greedy_tokens(hf, ours):
    """The chapter's baseline: transformers decodes (timed like ours) the same greedy tokens as our model."""
    from transformers import DynamicCache

    hf_model, _ = hf
    model, tok = ours
    prompt = corpus.eval_ids(16, tok)
    assert time_transformers_decode(hf_model, prompt, steps=2, repeats=1) > 0
    with torch.inference_mode():
        cache, ids, theirs = DynamicCache(), prompt[None], []
        for _ in range(4):
            ids = hf_model(ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            theirs.append(int(ids))
    assert generate_ids(model, prompt.tolist(), 4) == theirs
    with pytest.raises(ValueError, match="prompt"):
        time_transformers_decode(hf_model, prompt[None], steps=1)
