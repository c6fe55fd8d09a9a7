"""Sampled speculative decoding inside the real decoding loop is distributed as the target's own sampling:
a chi-square test on a tiny random Llama (fast enough for thousands of runs; no model file needed)."""

from __future__ import annotations

import itertools

import torch
from scipy import stats

from refimpl.llm.config import LlamaConfig
from refimpl.llm.model import Llama
from refimpl.speculative.decode import speculative_decode
from refimpl.speculative.draft import LayerSkipDraft, PromptLookupDraft
from tests.models import random_llama

V = 6


def tiny_llama(seed: int = 0) -> Llama:
    """A 2-layer Llama over a 6-token vocabulary with random weights (GGUF names and ``(out, in)`` shapes)."""
    cfg = LlamaConfig(
        n_layers=2, d_model=16, n_heads=2, n_kv_heads=1, head_dim=8, ffn_dim=32, vocab_size=V, rope_base=1e4,
        norm_eps=1e-5, max_seq_len=64,
    )  # fmt: skip
    return random_llama(cfg, seed, scale=0.6)


def target_joint(model: Llama, prompt: list[int], n: int, temperature: float) -> dict[tuple[int, ...], float]:
    """Exact probability of every n-token continuation under the target's sampling at ``temperature``."""
    out = {}
    for seq in itertools.product(range(V), repeat=n):
        logits = model(torch.tensor([prompt + list(seq)]))[0, len(prompt) - 1 :]  # (n + 1, V)
        probs = torch.softmax(logits.double() / temperature, -1)
        out[seq] = float(torch.prod(probs[torch.arange(n), torch.tensor(seq)]))
    return out


def test_sampled_speculative_decoding_matches_target_sampling(one_thread):
    model = tiny_llama()
    prompt, n, temperature, runs = [1, 2, 1, 2, 1], 2, 1.0, 1500
    want = target_joint(model, prompt, n, temperature)
    for draft, gamma in ((LayerSkipDraft(model, [1]), 2), (PromptLookupDraft(), 3)):
        counts = dict.fromkeys(want, 0)
        accepted = 0
        for seed in range(runs):
            got, st = speculative_decode(model, prompt, n, draft, gamma=gamma, temperature=temperature, seed=seed)
            counts[tuple(got)] += 1
            accepted += st.accepted
        assert accepted > 0, "the test must exercise accepted drafts, not only residual samples"
        keys = [k for k in want if want[k] * runs >= 5]  # chi-square needs expected counts >= 5; pool the rest
        obs = [counts[k] for k in keys] + [runs - sum(counts[k] for k in keys)]
        exp = [want[k] * runs for k in keys] + [runs * (1 - sum(want[k] for k in keys))]
        assert stats.chisquare(obs, exp).pvalue > 1e-3, type(draft).__name__
