"""The analyzer's FLOPs agree with an independent count: torch's FlopCounterMode on real forward passes.

FlopCounterMode counts matrix products (``mm``, ``bmm``, ...) at 2 FLOPs per multiply-add, so we compare it
with the analyzer's matmul and attention rows (``flash_attention=False``: the full masked ``(T, S)`` rectangle,
as these implementations compute it). Elementwise operators are a convention of the cost model and are not
part of the comparison.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from refimpl.llm.cache import FullCache
from refimpl.llm.matvec import blas_only
from refimpl.roofline import ModelConfig, Workload, analyze, get_model
from tests.models import gguf_shapes


def matmul_flops(analysis) -> float:
    """FLOPs of the analyzer rows that are matrix products (weights and attention)."""
    rows = [r for r in analysis.rows if r.op.kind == "matmul" or r.op.name in ("qk_matmul", "sv_matmul")]
    return sum(r.op.flops * r.op.count for r in rows)


def counted(fn) -> int:
    """FLOPs of ``fn()`` by torch's counter. The LLM's C matvec (``refimpl.llm.matvec``) runs outside torch's
    dispatcher, where the counter cannot see it, so the same products run on the BLAS here."""
    with torch.no_grad(), blas_only(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def smollm2():
    """The book's model class (``refimpl.llm.model.Llama``) with SmolLM2-135M's exact config from its GGUF
    metadata; zero weights (FLOPs do not depend on values, and zeros allocate fastest)."""
    from refimpl.llm.gguf_file import read_config
    from refimpl.llm.model import Llama

    cfg = read_config()
    shapes = gguf_shapes(cfg)  # GGUF's names and (out, in) shapes; from_gguf_tensors lays them out
    return Llama.from_gguf_tensors(cfg, {name: torch.zeros(shape) for name, shape in shapes.items()})


class _ExplicitAttentionCache(FullCache):
    """Every token, attended with explicit products (the base class's attention), not FullCache's fused
    kernel, whose FLOPs torch's counter takes from its own formula."""

    needs_attention = True


def test_smollm2_prefill_and_decode_flops_match_flop_counter(smollm2, one_thread):
    batch, prompt = 2, 5
    ids = torch.randint(0, smollm2.config.vocab_size, (batch, prompt + 1), generator=torch.Generator().manual_seed(0))
    caches = smollm2.new_caches(_ExplicitAttentionCache)
    # prefill through the KV cache (attention as explicit matrix products), logits at every position
    prefill = counted(lambda: smollm2(ids[:, :prompt], caches))
    # one decode step at context prompt + 1
    decode = counted(lambda: smollm2(ids[:, prompt:], caches, start_pos=prompt))
    kw = dict(batch=batch, dtype="fp32", flash_attention=False)
    pre = analyze("smollm2-135m", "h100-sxm", Workload(stage="prefill", seq=prompt, logits="all", **kw))
    dec = analyze("smollm2-135m", "h100-sxm", Workload(stage="decode", seq=prompt + 1, **kw))
    assert matmul_flops(pre) == prefill
    assert matmul_flops(dec) == decode
    # the analyzer's model is the same model: parameter counts agree
    n = sum(b.numel() for b in smollm2.buffers() if b.dim() > 0) - smollm2.rope_cos.numel() - smollm2.rope_sin.numel()
    assert get_model("smollm2-135m").n_params() == n


def test_flops_match_transformers_llama_with_gqa_untied_head():
    transformers = pytest.importorskip("transformers")
    # H * D != d (the analyzer must use head_dim, not d / H), GQA, an untied head
    ours = ModelConfig(
        "tiny", n_layers=2, d_model=128, n_heads=8, n_kv_heads=2, head_dim=24, ffn_dim=352, vocab_size=512
    )
    hf_cfg = transformers.LlamaConfig(  # the same shapes, read from ours: the two models cannot disagree
        vocab_size=ours.vocab_size,
        hidden_size=ours.d_model,
        intermediate_size=ours.ffn_dim,
        num_hidden_layers=ours.n_layers,
        num_attention_heads=ours.n_heads,
        num_key_value_heads=ours.n_kv_heads,
        head_dim=ours.head_dim,
        tie_word_embeddings=ours.tie_embeddings,
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    ids = torch.randint(0, ours.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    a = analyze(ours, "a100-40gb", Workload(stage="prefill", batch=3, seq=20, flash_attention=False, logits="all"))
    assert matmul_flops(a) == counted(lambda: model(ids))
    assert ours.n_params() == sum(p.numel() for p in model.parameters())
