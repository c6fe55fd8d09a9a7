"""Speculative decoding: exact verification, drafts from the model itself, token trees.

=====================================  ==================================================================
``refimpl.speculative.verify``         the rule: accept ``min(1, p/q)``, residual, bonus; greedy as ``T = 0``
``refimpl.speculative.draft``          drafts: prompt lookup, self-speculative layer skipping
``refimpl.speculative.tree``           token trees: tree positions, tree attention mask, one-forward verify
``refimpl.speculative.decode``         the decoding loop with cache rollback; counters
``refimpl.speculative.cost``           the expected speed-up, the roofline of draft + verify, a predicted cache
``refimpl.speculative.measure``        CPU measurements: forward cost of k tokens, methods against plain decoding
=====================================  ==================================================================

Explained in ``chapters/speculative``.
"""

from refimpl.speculative.decode import SpecStats, plain_decode, speculative_decode
from refimpl.speculative.draft import LayerSkipDraft, PromptLookupDraft, prompt_lookup
from refimpl.speculative.tree import TokenTree, TreeAttentionCache, verify_tree_greedy
from refimpl.speculative.verify import (
    Verdict,
    emitted_distribution,
    expected_tokens_per_step,
    probs_from_logits,
    verify_greedy,
    verify_sampled,
)

__all__ = [
    "LayerSkipDraft",
    "PromptLookupDraft",
    "SpecStats",
    "TokenTree",
    "TreeAttentionCache",
    "Verdict",
    "emitted_distribution",
    "expected_tokens_per_step",
    "plain_decode",
    "prompt_lookup",
    "probs_from_logits",
    "speculative_decode",
    "verify_greedy",
    "verify_sampled",
    "verify_tree_greedy",
]
