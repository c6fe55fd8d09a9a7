"""Element types of the cost model: canonical names and storage bits.

One name per storage format (``"fp16"``, ``"bf16"``, ``"fp32"``, ...), whatever spelling a reader uses
(torch's ``torch.float16``, numpy's ``"float16"``, ``"half"``).
"""

from __future__ import annotations

from typing import Any

from refimpl._checks import check_choice

__all__ = ["DTYPE_BITS", "dtype_bits", "normalize_dtype"]

# Storage size of one element, in bits. tf32 is stored as fp32 (it only changes the Tensor Core arithmetic).
DTYPE_BITS: dict[str, float] = {
    "fp64": 64,
    "fp32": 32,
    "tf32": 32,
    "bf16": 16,
    "fp16": 16,
    "fp8": 8,
    "int8": 8,
    "int4": 4,
}

# Other spellings readers use (torch names, numpy names) -> the canonical short name.
_ALIASES: dict[str, str] = {
    "float64": "fp64",
    "double": "fp64",
    "float32": "fp32",
    "float": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "float8_e4m3fn": "fp8",
    "float8_e5m2": "fp8",
    "e4m3": "fp8",
    "e5m2": "fp8",
}


def normalize_dtype(dtype: Any) -> str:
    """Return the canonical dtype name (``"fp16"``, ``"bf16"``, ``"fp32"``, ...) for a name or ``torch.dtype``.

    Accepts ``"fp16"``, ``"float16"``, ``"half"``, ``torch.float16`` and the like. Raises ``ValueError`` listing
    the known names for anything else.
    """
    name = str(dtype).removeprefix("torch.").lower() if not isinstance(dtype, str) else dtype.lower()
    name = _ALIASES.get(name, name)
    return check_choice("dtype", name, DTYPE_BITS)


def dtype_bits(dtype: Any) -> float:
    """Bits per stored element of ``dtype`` (see :data:`DTYPE_BITS`)."""
    return DTYPE_BITS[normalize_dtype(dtype)]
