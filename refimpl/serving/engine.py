"""A serving engine with iteration-level scheduling (Orca, Yu et al. 2022, sec. 3.1) over a paged KV cache.

Requests arrive with a prompt and a token limit (:meth:`Engine.add_request`). Each :meth:`Engine.step` is one
iteration of the scheduler:

1. **admit**: waiting requests, first come first served, join the batch while it has room and the pool has
   blocks for the prompt plus one block per running sequence (a watermark, so admitting does not immediately
   force a preemption); their blocks are reserved at once;
2. **one forward**: every running sequence advances in *one* forward over *packed* tokens: one token for
   each decoding sequence and the whole prompt of each one just admitted (batched prefill), at per-token
   positions over the paged cache; only the rows that sample a token go through the output head, and a
   completed prompt emits its first token;
3. **retire**: sequences that reached their token limit or a stop token free their blocks at once, so a
   waiting request can take their place in the next iteration (continuous batching).

``max_batched_tokens`` (chunked prefill, Sarathi: Agrawal et al. 2024, sec. 4): a budget of tokens per
forward. Every decode gets its token first ("decode-maximal" batching), and the rest of the budget goes to
prompt *chunks*, oldest first, so a long prompt is prefilled over several iterations while the others keep
decoding; ``None`` (the default) prefills whole prompts.

When a decode step needs a block and none is free, the most recently admitted running sequence is
*preempted by recompute* (Kwon et al. 2023, sec. 4.5): its blocks are freed and it goes back to the front of
the queue with the tokens it has generated; when it is admitted again its prompt and those tokens are
prefilled together, and decoding continues where it stopped. Decoding is greedy, so every request's output is
the one it gets decoded alone (tests check it for any arrival order and batch mix).

``share_prefixes=True`` (the stretch of Kwon et al. 2023, sec. 4.4, shared prefix): a request whose tokens
begin with at least a block of the tokens a running sequence has cached *forks* that sequence's blocks for the
common prefix (reference counts, copy-on-write) and prefills only the rest of its prompt.

``policy="static"`` is the baseline that continuous batching replaces: a new batch is admitted only when the
whole previous batch has finished, so short requests leave their slots idle until the longest one ends.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from refimpl._checks import check_choice, check_positive_int
from refimpl.llm.model import Llama
from refimpl.serving.paged_cache import PagedKVPool

__all__ = ["Engine", "Request"]


@dataclass(eq=False)  # requests compare by identity
class Request:
    """One request: its prompt, token limit, the tokens generated so far and its timeline.

    Times are ``time.perf_counter()`` seconds; ``first_token_time - arrival_time`` is the time to first token,
    and the gaps between ``token_times`` are the times between tokens (Sarathi's TBT).
    """

    request_id: Hashable
    prompt: list[int]
    max_new_tokens: int
    output: list[int] = field(default_factory=list)
    finished: bool = False
    preemptions: int = 0
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    token_times: list[float] = field(default_factory=list)  # when each output token was emitted

    @property
    def context_len(self) -> int:
        """Tokens of prompt and output so far."""
        return len(self.prompt) + len(self.output)


class Engine:
    """Continuous batching of greedy decoding over a :class:`~refimpl.serving.paged_cache.PagedKVPool`.

    ``num_blocks`` blocks of ``block_size`` tokens hold the KV caches of all running sequences; at most
    ``max_batch_size`` sequences run at once; a request finishes after ``max_new_tokens`` tokens or after
    emitting any of ``stop_ids`` (included in its output). ``policy``: ``"continuous"`` (admit whenever there
    is room) or ``"static"`` (admit only into an empty batch). ``share_prefixes``: reuse a running sequence's
    blocks for a common prompt prefix (see the module docstring).
    """

    def __init__(
        self,
        model: Llama,
        num_blocks: int,
        block_size: int = 16,
        max_batch_size: int = 8,
        stop_ids: Sequence[int] = (),
        policy: str = "continuous",
        share_prefixes: bool = False,
        max_batched_tokens: int | None = None,
    ) -> None:
        c = model.config
        self.model = model
        self.max_batch_size = check_positive_int("max_batch_size", max_batch_size)
        self.policy = check_choice("policy", policy, ("continuous", "static"))
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        self.share_prefixes = bool(share_prefixes)
        self.max_batched_tokens = (
            None if max_batched_tokens is None else check_positive_int("max_batched_tokens", max_batched_tokens)
        )
        self.prefix_tokens_shared = 0  # prompt tokens not prefilled because a running sequence had them
        self.pool = PagedKVPool(c.n_layers, num_blocks, block_size, c.n_kv_heads, c.head_dim, dtype=model.head.dtype)
        self.caches = self.pool.caches()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[Hashable, Request] = {}
        self.steps = 0
        self.preemptions = 0
        self.peak_blocks = 0

    # ------------------------------------------------------------------------------------------ requests

    def add_request(self, request_id: Hashable, prompt_ids: Sequence[int], max_new_tokens: int) -> Request:
        """Queue a request; raises ``ValueError`` (and changes nothing) for a duplicate id, an empty prompt, a
        token id outside the vocabulary, a non-positive limit, or a prompt plus limit beyond the model's context
        or the pool's capacity."""
        c = self.model.config
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        prompt = [int(i) for i in prompt_ids]
        if not prompt:
            raise ValueError(f"request {request_id!r}: prompt_ids must hold at least one token, got an empty prompt")
        bad = [i for i in prompt if not 0 <= i < c.vocab_size]
        if bad:
            raise ValueError(f"request {request_id!r}: token ids must be in [0, {c.vocab_size}), got {bad[0]}")
        max_new_tokens = check_positive_int("max_new_tokens", max_new_tokens)
        total = len(prompt) + max_new_tokens
        if total > c.max_seq_len:
            raise ValueError(
                f"request {request_id!r}: prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) "
                f"exceeds the model's max_seq_len={c.max_seq_len}"
            )
        if total - 1 > self.pool.capacity_tokens:  # the last token is never fed back, so never cached
            raise ValueError(
                f"request {request_id!r}: prompt + max_new_tokens - 1 = {total - 1} tokens exceed the pool's "
                f"capacity of {self.pool.capacity_tokens} tokens ({self.pool.num_blocks} blocks of "
                f"{self.pool.block_size})"
            )
        req = Request(request_id, prompt, max_new_tokens, arrival_time=time.perf_counter())
        self.requests[request_id] = req
        self.waiting.append(req)
        return req

    def result(self, request_id: Hashable) -> list[int]:
        """The tokens generated for a finished request; ``KeyError`` for an unknown id, ``RuntimeError`` if it
        has not finished."""
        if request_id not in self.requests:
            raise KeyError(f"unknown request_id {request_id!r}")
        req = self.requests[request_id]
        if not req.finished:
            raise RuntimeError(f"request {request_id!r} has not finished ({len(req.output)} tokens so far)")
        return list(req.output)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def run(self) -> dict[Hashable, list[int]]:
        """Step until every request has finished; returns each request's output."""
        while self.has_unfinished():
            self.step()
        return {rid: list(r.output) for rid, r in self.requests.items()}

    # ------------------------------------------------------------------------------------------ one iteration

    def step(self) -> list[Request]:
        """One scheduler iteration (admit, one forward, retire); returns the requests that finished in it.

        The iteration's work is one forward over *packed* tokens: one token per decoding sequence, and the
        prompt (or, under a token budget, the next chunk) of each sequence still in prefill."""
        self.steps += 1
        budget = self.max_batched_tokens if self.max_batched_tokens is not None else float("inf")
        # decode-maximal batching (Agrawal et al. 2024, sec. 4.3): every decode first, then prefill chunks
        budget -= sum(1 for r in self.running if self._pending(r) == 1)
        work: dict[Request, int] = {}  # request -> tokens it computes this step (prefill chunks so far)
        for r in self.running:  # prompts left part-prefilled by the budget go on, oldest first
            if self._pending(r) > 1 and budget > 0:
                work[r] = int(min(self._pending(r), budget))
                budget -= work[r]
        for r in self._admit(budget):
            if budget > 0:  # static batching admits a whole batch, whose prompts may take several steps
                work[r] = int(min(self._pending(r), budget))
                budget -= work[r]
        decoding = self._reserve_decode_blocks([r for r in self.running if r not in work and self._pending(r) == 1])
        work = {r: n for r, n in work.items() if r in self.running}  # a preempted one computes nothing
        for r in decoding:
            work[r] = 1
        if work:
            batch = [r for r in self.running if r in work]  # admission order
            counts = [work[r] for r in batch]
            self.pool.prepare([r.request_id for r in batch], counts)
            self._note_peak()
            starts = [self.pool.lengths[r.request_id] - n for r, n in zip(batch, counts, strict=True)]
            tokens = [t for r, a, n in zip(batch, starts, counts, strict=True) for t in self._tokens(r)[a : a + n]]
            positions = torch.cat([torch.arange(a, a + n) for a, n in zip(starts, counts, strict=True)])  # (N,)
            h = self.model.hidden(torch.tensor([tokens]), self.caches, positions=positions)[0]  # (N, d)
            ends = torch.tensor(counts).cumsum(0) - 1  # (S,): each sequence's last token in the packed row
            emit = [i for i, r in enumerate(batch) if starts[i] + counts[i] == r.context_len]  # prompt complete
            if emit:
                logits = self.model.logits(h[ends[emit]])  # (E, V): only the rows that sample a token
                for i, token in zip(emit, logits.argmax(-1).tolist(), strict=True):
                    self._emit(batch[i], token)
        done = [r for r in self.running if r.finished]
        for r in done:
            self.pool.free_sequence(r.request_id)
            r.finish_time = time.perf_counter()
        self.running = [r for r in self.running if not r.finished]
        return done

    def _tokens(self, req: Request) -> list[int]:
        """The request's tokens so far: prompt and output (a preempted request recomputes what it generated)."""
        return req.prompt + req.output

    def _pending(self, req: Request) -> int:
        """Tokens of a running request not in the cache yet: 1 when it decodes, more while its prompt is
        prefilled."""
        return req.context_len - self.pool.lengths[req.request_id]

    def _admit(self, budget: float) -> list[Request]:
        """Admit waiting requests (first come first served) while the batch has room, the token budget is not
        spent (continuous batching; static batching fills the whole batch) and the pool has blocks for the whole
        prompt plus one per running sequence (a watermark, so admitting does not immediately force a
        preemption); reserves their blocks; returns them."""
        if self.policy == "static":
            if self.running:
                return []
            budget = float("inf")
        admitted = []
        while self.waiting and len(self.running) < self.max_batch_size and budget > 0:
            req = self.waiting[0]
            tokens = self._tokens(req)
            parent, shared = self._longest_prefix(tokens)
            need = -(-len(tokens) // self.pool.block_size) - shared // self.pool.block_size  # upper bound
            if need + len(self.running) > self.pool.num_free_blocks:
                break
            self.waiting.popleft()
            if parent is None:
                self.pool.add_sequence(req.request_id)
            else:
                self.pool.fork(parent.request_id, req.request_id, shared)
                self.prefix_tokens_shared += shared
            self.pool.reserve(req.request_id, len(tokens))
            self._note_peak()
            self.running.append(req)
            admitted.append(req)
            budget -= min(len(tokens) - shared, budget)
        return admitted

    def _longest_prefix(self, tokens: list[int]) -> tuple[Request | None, int]:
        """The running sequence whose cached tokens share the longest prefix with ``tokens`` and its length,
        if sharing is on and that is at least a block (at least one token is left to prefill, for the logits)."""
        best, best_len = None, 0
        if not self.share_prefixes:
            return best, best_len
        for r in self.running:
            cached = self._tokens(r)[: self.pool.lengths[r.request_id]]  # not the last emitted token, nor a
            # prompt still to prefill (a request admitted in this step has nothing cached yet)
            n = 0
            limit = min(len(cached), len(tokens) - 1)
            while n < limit and cached[n] == tokens[n]:
                n += 1
            if n > best_len:
                best, best_len = r, n
        if best_len < self.pool.block_size:
            return None, 0
        return best, best_len

    def _reserve_decode_blocks(self, decoding: list[Request]) -> list[Request]:
        """Preempt (by recompute) the most recently admitted running sequences until every decoding one can
        append a token; returns the decoding sequences that remain."""
        while decoding:
            need = sum(self.pool.blocks_needed(r.request_id, 1) for r in decoding)
            if need <= self.pool.num_free_blocks:
                break
            victim = next(r for r in reversed(self.running) if not r.finished)
            self.pool.free_sequence(victim.request_id)
            self.running.remove(victim)
            victim.preemptions += 1
            self.preemptions += 1
            self.waiting.appendleft(victim)
            decoding = [r for r in decoding if r is not victim]
        return decoding

    def _emit(self, req: Request, token: int) -> None:
        now = time.perf_counter()
        if req.first_token_time is None:
            req.first_token_time = now
        req.token_times.append(now)
        req.output.append(token)
        if token in self.stop_ids or len(req.output) == req.max_new_tokens:
            req.finished = True

    def _note_peak(self) -> None:
        self.peak_blocks = max(self.peak_blocks, self.pool.num_blocks - self.pool.num_free_blocks)
