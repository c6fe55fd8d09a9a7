"""Token trees: several candidates per position, verified in ONE target forward (SpecInfer, Miao et al. 2024;
Medusa, Cai et al. 2024).

A tree hangs below the last emitted token (the root, not yet in the KV cache). Node ``i`` holds a token
``tokens[i]`` and its parent ``parents[i]`` (``-1``: the root). Flattened as ``[root, node 0, node 1, ...]``
the tree is one sequence for one forward, with two changes to plain causal decoding (SpecInfer sec. 4.2):

* **tree positions**: a node at depth ``d`` (the root's children have ``d = 1``) sits at position
  ``start + d``, so siblings share a position (RoPE sees each root-to-leaf path as a plain sequence);
* **tree attention mask**: a node attends to the cached prefix and to its ancestors and itself only, never to
  a sibling's branch.

Each node's logits are then exactly those of its path decoded alone. Greedy verification walks down from the root
following the target's argmax; the cache keeps the keys/values of the root and the accepted path only.

The mask lives in :class:`TreeAttentionCache`, a :class:`~refimpl.llm.cache.KVCache` that wraps each layer's
cache for the one tree forward: the tree's keys/values never enter the wrapped cache; :meth:`commit` then appends
the accepted path's keys/values through the ordinary ``update``. So the wrapped cache is rolled back to the
accepted path by construction, and any cache type works (a quantizing cache quantizes only accepted tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from refimpl._checks import check_int
from refimpl.llm.cache import KVCache

__all__ = ["TokenTree", "TreeAttentionCache", "verify_tree_greedy"]


class TokenTree:
    """A tree of drafted tokens below the root (the last emitted token); parents precede their children."""

    def __init__(self, tokens: Sequence[int], parents: Sequence[int]) -> None:
        if len(tokens) != len(parents):
            raise ValueError(f"tokens and parents must have one entry per node, got {len(tokens)} and {len(parents)}")
        self.tokens = [int(t) for t in tokens]
        self.parents = [int(p) for p in parents]
        self.depths: list[int] = []  # depth of node i; the root's children have depth 1
        for i, p in enumerate(self.parents):
            if not -1 <= p < i:
                raise ValueError(f"parents[{i}] must be -1 (the root) or an earlier node in [0, {i}), got {p}")
            self.depths.append(1 if p == -1 else self.depths[p] + 1)
        seen = set()
        for t, p in zip(self.tokens, self.parents):
            if (p, t) in seen:
                raise ValueError(f"token {t} appears twice below node {p}: siblings must differ")
            seen.add((p, t))

    @classmethod
    def from_paths(cls, paths: Sequence[Sequence[int]]) -> TokenTree:
        """The trie of the candidate continuations ``paths`` (shared prefixes merged)."""
        tokens: list[int] = []
        parents: list[int] = []
        index: dict[tuple[int, int], int] = {}  # (parent, token) -> node
        for path in paths:
            parent = -1
            for t in path:
                key = (parent, int(t))
                if key not in index:
                    index[key] = len(tokens)
                    tokens.append(int(t))
                    parents.append(parent)
                parent = index[key]
        return cls(tokens, parents)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def depth(self) -> int:
        """Length of the longest root-to-leaf path (0 for an empty tree)."""
        return max(self.depths, default=0)

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root's child down to ``node``."""
        path = []
        while node != -1:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def leaves(self) -> list[int]:
        parents = set(self.parents)
        return [i for i in range(len(self)) if i not in parents]

    def children(self, node: int) -> dict[int, int]:
        """``{token: child index}`` of ``node`` (``-1``: the root)."""
        return {self.tokens[i]: i for i, p in enumerate(self.parents) if p == node}

    def attention_mask(self) -> Tensor:
        """``(1 + n, 1 + n)`` bool, row/column 0 the root: ``True`` where a node sees a node (ancestor or self)."""
        n = len(self)
        mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)
        mask[:, 0] = True  # everything descends from the root
        for i in range(n):
            mask[i + 1, [j + 1 for j in self.path_to(i)]] = True
        return mask

    def positions(self, start: int) -> Tensor:
        """Tree positions ``(1 + n,)``: the root at ``start``, a node of depth ``d`` at ``start + d``."""
        return torch.tensor([start] + [start + d for d in self.depths], dtype=torch.long)


class TreeAttentionCache(KVCache):
    """Wraps one layer's cache for one tree forward: attention over the cached prefix plus the tree's tokens
    under the tree mask ``(T_new, T_new)``; :meth:`commit` appends the chosen tokens to the wrapped cache."""

    def __init__(self, inner: KVCache, tree_mask: Tensor) -> None:
        self.inner = inner
        self.tree_mask = tree_mask  # (T_new, T_new) bool
        self._k: Tensor | None = None  # (B, H_kv, T_new, D): the tree's keys, kept out of the inner cache
        self._v: Tensor | None = None
        self._pos: Tensor | None = None

    def update(self, k: Tensor, v: Tensor, positions: Tensor) -> None:
        if k.shape[2] != self.tree_mask.shape[0]:
            raise ValueError(f"the tree forward must hold {self.tree_mask.shape[0]} tokens, got {k.shape[2]}")
        self._k, self._v, self._pos = k, v, positions

    def attend(self, q: Tensor, q_positions: Tensor, scale: float) -> Tensor:
        k, v = self._k, self._v
        mask = self.tree_mask
        if len(self.inner):  # the prefix: every cached token precedes the whole tree
            k0, v0 = self.inner.keys_values()
            k, v = torch.cat([k0, k], dim=2), torch.cat([v0, v], dim=2)  # (B, H_kv, L + T_new, D)
            mask = torch.cat([mask.new_ones(mask.shape[0], k0.shape[2]), mask], dim=1)  # (T_new, L + T_new)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])

    def commit(self, nodes: Sequence[int]) -> None:
        """Append the tree tokens at flat indices ``nodes`` (0 = the root) to the wrapped cache."""
        idx = torch.tensor(list(nodes), dtype=torch.long)
        self.inner.update(self._k[:, :, idx], self._v[:, :, idx], self._pos[idx])

    def __len__(self) -> int:
        return len(self.inner) + (0 if self._k is None else self._k.shape[2])

    def nbytes(self) -> int:
        return self.inner.nbytes()


@torch.inference_mode()
def verify_tree_greedy(
    model: torch.nn.Module, caches: Sequence[KVCache], root: int, start: int, tree: TokenTree
) -> tuple[list[int], int, Tensor]:
    """Verify ``tree`` below the token ``root`` at position ``start`` in one forward of ``model``; greedy.

    ``caches`` hold the context before ``root`` (``start`` tokens). Returns ``(accepted, next_token, logits)``:
    the accepted node indices (root to leaf, the longest path on which every token is the target's argmax),
    the target's argmax after them, and the logits ``(1 + n, V)`` of the flattened tree. Afterwards ``caches``
    hold the context, the root and the accepted path.
    """
    start = check_int("start", start, min_value=0)
    if any(len(c) != start for c in caches):
        raise ValueError(f"caches must hold the {start} tokens before the root, got {sorted({len(c) for c in caches})}")
    wrapped = [TreeAttentionCache(c, tree.attention_mask()) for c in caches]
    ids = torch.tensor([[root, *tree.tokens]])  # (1, 1 + n)
    logits = model(ids, wrapped, start_pos=start, positions=tree.positions(start))[0]  # (1 + n, V)
    best = logits.argmax(-1).tolist()
    accepted: list[int] = []
    node = -1  # the root
    while True:
        nxt = best[node + 1]
        child = tree.children(node).get(nxt)
        if child is None:
            break
        accepted.append(child)
        node = child
    for w in wrapped:
        w.commit([0] + [i + 1 for i in accepted])
    return accepted, best[node + 1], logits
