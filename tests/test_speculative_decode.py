"""Speculative decoding on the real model (refimpl.speculative): drafts, the loop, token trees."""

from __future__ import annotations

import pytest
import torch

from refimpl.llm import FullCache, load_model
from refimpl.llm.corpus import eval_ids
from refimpl.speculative.decode import plain_decode, speculative_decode
from refimpl.speculative.draft import LayerSkipDraft, PromptLookupDraft, prompt_lookup
from refimpl.speculative.tree import TokenTree, verify_tree_greedy

needs_model = pytest.mark.model
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llm():
    return load_model()


@pytest.fixture(scope="module")
def prompt(llm):
    return eval_ids(48, llm[1]).tolist()


# ------------------------------------------------------------------------------------------ prompt lookup


def test_prompt_lookup_finds_the_most_recent_longest_match():
    ctx = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert prompt_lookup(ctx, 2, ngram=3) == [[7, 8]]  # "2 3" -> after the most recent earlier "2 3"
    assert prompt_lookup(ctx, 2, ngram=3, n_candidates=3) == [[7, 8], [9, 1]]
    assert prompt_lookup([1, 2, 3], 4) == []  # no suffix occurred before
    assert prompt_lookup([5, 5, 5, 5], 3, ngram=2) == [[5]]  # a match at the end proposes what follows it
    with pytest.raises(ValueError, match="gamma must be >= 1"):
        prompt_lookup(ctx, 0)


def test_prompt_lookup_against_brute_force():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        ctx = torch.randint(3, (int(torch.randint(2, 30, (1,), generator=gen)),), generator=gen).tolist()
        got = prompt_lookup(ctx, 3, ngram=2, n_candidates=1)
        want = []
        for n in (2, 1):  # longest n first; most recent earlier occurrence
            if n >= len(ctx):
                continue
            for j in range(len(ctx) - n - 1, -1, -1):
                if ctx[j : j + n] == ctx[-n:]:
                    want = [ctx[j + n : j + n + 3]]
                    break
            if want:
                break
        assert got == want, ctx


# ------------------------------------------------------------------------------------------ token trees


def test_token_tree_structure():
    t = TokenTree.from_paths([[5, 6, 7], [5, 8], [9]])
    assert t.tokens == [5, 6, 7, 8, 9] and t.parents == [-1, 0, 1, 0, -1]
    assert t.depths == [1, 2, 3, 2, 1] and t.depth == 3
    assert t.path_to(2) == [0, 1, 2] and t.leaves() == [2, 3, 4]
    assert t.positions(10).tolist() == [10, 11, 12, 13, 12, 11]
    mask = t.attention_mask()
    assert mask[4].tolist() == [True, True, False, False, True, False]  # node 3 (token 8): root, 5, itself
    with pytest.raises(ValueError, match="parents"):
        TokenTree([1, 2], [-1, 1])
    with pytest.raises(ValueError, match="siblings must differ"):
        TokenTree([1, 1], [-1, -1])


@needs_model
def test_tree_forward_equals_each_path_alone(llm, prompt):
    """One tree forward gives every node the logits of its root-to-node path decoded alone; the cache keeps the
    accepted path exactly as plain decoding of that path would."""
    model, _ = llm
    ctx = prompt[:-1]
    caches = [FullCache() for _ in range(model.config.n_layers)]
    model(torch.tensor([ctx]), caches)
    greedy = plain_decode(model, prompt, 3)
    # a tree holding the greedy path (so some of it is accepted) and wrong branches
    tree = TokenTree.from_paths([[greedy[0], greedy[1], 17], [greedy[0], 99], [123, 4, 5]])
    accepted, nxt, logits = verify_tree_greedy(model, caches, prompt[-1], len(ctx), tree)
    assert [tree.tokens[i] for i in accepted] == greedy[:2] and nxt == greedy[2]
    for leaf in tree.leaves():
        path = [prompt[-1]] + [tree.tokens[i] for i in tree.path_to(leaf)]
        ref = [FullCache() for _ in range(model.config.n_layers)]
        model(torch.tensor([ctx]), ref)
        want = model(torch.tensor([path]), ref, start_pos=len(ctx))[0]  # (len(path), V)
        rows = [0] + [i + 1 for i in tree.path_to(leaf)]
        torch.testing.assert_close(logits[rows], want, rtol=1e-4, atol=1e-4)
    plain = [FullCache() for _ in range(model.config.n_layers)]
    model(torch.tensor([prompt + greedy[:2]]), plain)
    for c, r in zip(caches, plain):
        assert len(c) == len(r)
        torch.testing.assert_close(c.keys_values()[0], r.keys_values()[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(c.keys_values()[1], r.keys_values()[1], rtol=1e-4, atol=1e-4)
        assert c.key_positions().tolist() == r.key_positions().tolist()


# ------------------------------------------------------------------------------------------ the loop


@needs_model
@pytest.mark.parametrize("tree", [False, True])
def test_greedy_speculative_equals_plain_greedy(llm, prompt, tree):
    model, _ = llm
    n = 12
    want = plain_decode(model, prompt, n)
    # a self-draft with few layers skipped (some accepted) and prompt lookup on a repetitive prompt
    for draft in (PromptLookupDraft(), LayerSkipDraft(model, [i for i in range(30) if i not in (10, 20)])):
        got, stats = speculative_decode(model, prompt, n, draft, gamma=3, tree=tree)
        assert got == want, type(draft).__name__
        assert stats.new_tokens == n and stats.target_forwards <= n
        assert 0.0 <= stats.acceptance_rate <= 1.0
    rep = prompt[:8] * 4
    got, stats = speculative_decode(model, rep, n, PromptLookupDraft(), gamma=4, tree=tree)
    assert got == plain_decode(model, rep, n)
    assert stats.accepted > 0, "prompt lookup on a repeated prompt accepts nothing"


@needs_model
def test_sampled_speculative_decoding_runs_and_is_seeded(llm, prompt):
    model, _ = llm
    draft = LayerSkipDraft(model, [i for i in range(30) if i not in (10, 20)])
    a, _ = speculative_decode(model, prompt, 6, draft, gamma=3, temperature=0.8, seed=3)
    b, _ = speculative_decode(model, prompt, 6, draft, gamma=3, temperature=0.8, seed=3)
    assert a == b and len(a) == 6


@needs_model
def test_bad_inputs(llm, prompt):
    model, _ = llm
    with pytest.raises(ValueError, match="gamma must be >= 1"):
        speculative_decode(model, prompt, 4, PromptLookupDraft(), gamma=0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        speculative_decode(model, prompt, 4, PromptLookupDraft(), temperature=-1.0)
    with pytest.raises(ValueError, match="temperature must be 0 with tree=True"):
        speculative_decode(model, prompt, 4, PromptLookupDraft(), temperature=0.5, tree=True)
    with pytest.raises(ValueError, match="prompt_ids must hold at least one token"):
        speculative_decode(model, [], 4, PromptLookupDraft())
    with pytest.raises(ValueError, match="layers must be distinct"):
        LayerSkipDraft(model, [1, 1])
    with pytest.raises(ValueError, match=r"layers\[i\] must be <= 29"):
        LayerSkipDraft(model, [30])
    with pytest.raises(ValueError, match="positions must hold 2 positions"):
        model(torch.tensor([[1, 2]]), positions=torch.tensor([0]))


@needs_model
def test_explicit_positions_equal_start_pos(llm, prompt):
    """The one change to the model: ``positions`` (default ``start_pos .. +T-1``) gives the same logits when it
    spells out the default, with and without caches."""
    model, _ = llm
    ids = torch.tensor([prompt[:12]])
    torch.testing.assert_close(model(ids, start_pos=5), model(ids, positions=torch.arange(5, 17)), rtol=0, atol=0)
    a = [FullCache() for _ in range(model.config.n_layers)]
    b = [FullCache() for _ in range(model.config.n_layers)]
    model(ids, a)
    model(ids, b)
    step = torch.tensor([prompt[12:15]])
    torch.testing.assert_close(model(step, a, start_pos=12), model(step, b, 12, positions=torch.arange(12, 15)))
