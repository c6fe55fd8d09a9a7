"""The dtype rule every kernel in ``refimpl`` follows, defined once at the lowest layer (beside ``_checks``).

Half-precision inputs (float16, bfloat16) are computed in float32, as a GPU kernel does in its registers; float32
stays float32 and float64 stays float64, so a float64 run is the exact reference the tests compare against.
"""

from __future__ import annotations

import torch

__all__ = ["accumulation_dtype"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums and running statistics are kept in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
