"""Serving many requests: a paged KV cache, an engine with iteration-level scheduling, a simulated cluster.

=================================  ==========================================================================
``refimpl.serving.paged_cache``    PagedAttention's block pool, block tables, free list (Kwon et al. 2023)
``refimpl.serving.engine``         the engine: continuous batching (Orca, Yu et al. 2022), preemption by recompute
``refimpl.serving.cluster``        a simulated cluster: dispatch policies and Llumnix migration (Sun et al. 2024)
=================================  ==========================================================================
"""

from refimpl.serving.engine import Engine, Request
from refimpl.serving.paged_cache import BlockAllocator, OutOfBlocksError, PagedCache, PagedKVPool

__all__ = ["BlockAllocator", "Engine", "OutOfBlocksError", "PagedCache", "PagedKVPool", "Request"]
