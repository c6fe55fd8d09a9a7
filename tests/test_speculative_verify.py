"""Exactness of the speculative verification rule (refimpl.speculative.verify); no model file needed."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from refimpl.speculative.verify import (
    acceptance_probability,
    check_distribution,
    emitted_distribution,
    expected_tokens_per_step,
    probs_from_logits,
    residual_distribution,
    verify_greedy,
    verify_sampled,
)


def random_dist(gen: torch.Generator, v: int, sparsity: float) -> torch.Tensor:
    """A random distribution over ``v`` tokens with some exact zeros (at least one non-zero entry)."""
    w = torch.rand(v, generator=gen, dtype=torch.float64) ** 3
    zero = torch.rand(v, generator=gen, dtype=torch.float64) < sparsity
    zero[int(torch.randint(v, (1,), generator=gen))] = False
    w = w.masked_fill(zero, 0.0) + (~zero) * 1e-3
    return w / w.sum()


def random_model(seed: int, v: int, sparsity: float):
    """A context-dependent next-token distribution: a fixed random table indexed by the prefix."""
    table: dict[tuple[int, ...], torch.Tensor] = {}
    gen = torch.Generator().manual_seed(seed)

    def dist(prefix: tuple[int, ...]) -> torch.Tensor:
        if prefix not in table:
            table[prefix] = random_dist(gen, v, sparsity)
        return table[prefix]

    return dist


def completed(emitted: dict, p_of, length: int, v: int) -> dict:
    """Extend each emitted sequence with the target's own sampling up to ``length`` tokens."""
    out: dict[tuple[int, ...], float] = {}
    for seq, prob in emitted.items():
        for rest in itertools.product(range(v), repeat=length - len(seq)):
            full, pr = seq + rest, prob
            for i in range(len(seq), length):
                pr *= float(p_of(full[:i])[full[i]])
            out[full] = out.get(full, 0.0) + pr
    return out


def target_joint(p_of, length: int, v: int) -> dict:
    out = {}
    for seq in itertools.product(range(v), repeat=length):
        pr = 1.0
        for i in range(length):
            pr *= float(p_of(seq[:i])[seq[i]])
        out[seq] = pr
    return out


@settings(max_examples=40, deadline=None)
@given(
    seed_p=st.integers(0, 2**31 - 1),
    seed_q=st.integers(0, 2**31 - 1),
    v=st.integers(1, 4),
    gamma=st.integers(1, 3),
    sparsity=st.sampled_from([0.0, 0.3, 0.6]),
)
def test_enumerated_output_equals_target(seed_p, seed_q, v, gamma, sparsity):
    """Theorem (Leviathan et al. 2023, A.1): whatever q, the emitted tokens are distributed as the target's."""
    if v**gamma > 64:
        gamma = 1
    p_of, q_of = random_model(seed_p, v, sparsity), random_model(seed_q, v, sparsity)
    emitted = emitted_distribution(p_of, q_of, gamma, v)
    assert sum(emitted.values()) == pytest.approx(1.0, abs=1e-12)
    # first emitted token: exactly p_1
    first = torch.zeros(v, dtype=torch.float64)
    for seq, pr in emitted.items():
        first[seq[0]] += pr
    torch.testing.assert_close(first, p_of(()), rtol=0, atol=1e-12)
    # the whole step, completed by the target to gamma + 1 tokens: the target's joint distribution
    got, want = completed(emitted, p_of, gamma + 1, v), target_joint(p_of, gamma + 1, v)
    for seq, pr in want.items():
        assert got.get(seq, 0.0) == pytest.approx(pr, abs=1e-12), seq


def test_enumeration_sees_rejections():
    """A draft far from p: the enumeration must route mass through the residual (not a vacuous identity)."""
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    q = torch.tensor([0.1, 0.1, 0.8], dtype=torch.float64)
    beta = float(torch.minimum(p, q).sum())
    emitted = emitted_distribution(lambda s: p, lambda s: q, 1, 3)
    one_token = sum(pr for s, pr in emitted.items() if len(s) == 1)
    assert one_token == pytest.approx(1 - beta)  # rejection probability 1 - beta (Leviathan et al., sec. 3.1)
    torch.testing.assert_close(residual_distribution(p, q), torch.tensor([6 / 7, 1 / 7, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("deterministic", [False, True])
def test_monte_carlo_matches_target(deterministic):
    """Run the sampler itself: chi-square of the first and second emitted tokens against p (fixed seed)."""
    v, gamma, n = 5, 2, 6000
    gen = torch.Generator().manual_seed(0)
    p = torch.stack([random_dist(gen, v, 0.2) for _ in range(gamma + 1)])  # context-free for the sampler
    q = torch.stack([random_dist(gen, v, 0.2) for _ in range(gamma)])
    counts = torch.zeros(v)
    second = torch.zeros(v)
    for _ in range(n):
        if deterministic:
            draft = [0, 1]
            verdict = verify_sampled(p, None, draft, gen)
        else:
            draft = [int(torch.multinomial(q[i], 1, generator=gen)) for i in range(gamma)]
            verdict = verify_sampled(p, q, draft, gen)
        emitted = [*draft[: verdict.n_accepted], verdict.next_token]
        counts[emitted[0]] += 1
        if len(emitted) > 1:
            second[emitted[1]] += 1
    for c, want in ((counts, p[0]), (second, p[1])):
        keep = want > 0
        assert float(c[~keep].sum()) == 0, "a token of probability 0 was emitted"
        expected = want[keep] * c.sum()
        assert stats.chisquare(c[keep].numpy(), expected.numpy()).pvalue > 1e-3


def test_greedy_is_temperature_zero():
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        logits = torch.randn(4, 7, generator=gen)
        j = int(torch.randint(4, (1,), generator=gen))  # the first j drafts agree with the target's argmax
        draft = logits.argmax(-1)[:j].tolist() + torch.randint(7, (3 - j,), generator=gen).tolist()
        p = probs_from_logits(logits, 0.0)
        assert verify_sampled(p, None, draft, gen) == verify_greedy(logits, draft)
    assert verify_greedy(torch.tensor([[0.0, 1.0], [2.0, 0.0]]), [1]) == (1, 0)
    assert verify_greedy(torch.tensor([[0.0, 1.0], [2.0, 0.0]]), [0]) == (0, 1)


def test_expected_tokens_formula():
    for alpha in (0.0, 0.3, 0.8, 1.0):
        for gamma in range(5):
            direct = sum(alpha**i for i in range(gamma + 1))  # 1 + alpha + ... + alpha^gamma
            assert expected_tokens_per_step(alpha, gamma) == pytest.approx(direct)


def test_acceptance_probability():
    p = torch.tensor([0.5, 0.5], dtype=torch.float64)
    assert acceptance_probability(p, torch.tensor([0.25, 0.75]), 0) == 1.0
    assert acceptance_probability(p, torch.tensor([0.25, 0.75]), 1) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"q\[token\]"):
        acceptance_probability(p, torch.tensor([0.0, 1.0]), 0)


def test_bad_inputs():
    p = torch.full((3, 4), 0.25)
    q = torch.full((2, 4), 0.25)
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="draft must hold at least one token"):
        verify_sampled(p[:1], None, [], gen)
    with pytest.raises(ValueError, match="draft must hold at least one token"):
        verify_greedy(p[:1], [])
    with pytest.raises(ValueError, match="q must have vocabulary size 4"):
        verify_sampled(p, torch.full((2, 5), 0.2), [0, 1], gen)
    with pytest.raises(ValueError, match=r"p must have shape \(gamma \+ 1, V\)"):
        verify_sampled(p, q, [0, 1, 2], gen)
    with pytest.raises(ValueError, match="p rows must sum to 1"):
        verify_sampled(p * 2, q, [0, 1], gen)
    with pytest.raises(ValueError, match="q must be >= 0"):
        verify_sampled(p, q - 0.5, [0, 1], gen)
    with pytest.raises(ValueError, match="p must be finite"):
        verify_sampled(torch.full((3, 4), float("nan")), q, [0, 1], gen)
    with pytest.raises(ValueError, match=r"draft\[1\] must be <= 3"):
        verify_sampled(p, q, [0, 4], gen)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        probs_from_logits(torch.zeros(4), -1.0)
    with pytest.raises(ValueError, match="temperature must be finite"):
        probs_from_logits(torch.zeros(4), float("nan"))
    with pytest.raises(ValueError, match="target_logits must have gamma"):
        verify_greedy(torch.zeros(2, 4), [0, 1])
    with pytest.raises(ValueError, match="gamma must be >= 1"):
        emitted_distribution(lambda s: p[0], lambda s: p[0], 0, 4)
    check_distribution("p", p)
