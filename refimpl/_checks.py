"""Validation helpers for the public boundary of every ``refimpl`` module.

Each helper raises ``ValueError`` (or ``TypeError`` for a wrong type) with a message that names the argument,
what was expected and what was given, e.g. ``block_size must be a positive int, got 0``. Modules call these at
their public entry points and trust the types inside.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from numbers import Integral, Real
from typing import Any


def check_int(name: str, value: Any, *, min_value: int | None = None, max_value: int | None = None) -> int:
    """Return ``value`` as ``int`` if it is an integer in ``[min_value, max_value]``, else raise."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if min_value is not None and value < min_value:
        raise ValueError(f"{name} must be >= {min_value}, got {value}")
    if max_value is not None and value > max_value:
        raise ValueError(f"{name} must be <= {max_value}, got {value}")
    return value


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` if it is an int >= 1, else raise naming ``name``."""
    return check_int(name, value, min_value=1)


def check_float(
    name: str,
    value: Any,
    *,
    min_value: float | None = None,
    max_value: float | None = None,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
) -> float:
    """Return ``value`` as a finite ``float`` within the given bounds, else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    if min_value is not None and (value < min_value or (not min_inclusive and value == min_value)):
        op = ">=" if min_inclusive else ">"
        raise ValueError(f"{name} must be {op} {min_value}, got {value}")
    if max_value is not None and (value > max_value or (not max_inclusive and value == max_value)):
        op = "<=" if max_inclusive else "<"
        raise ValueError(f"{name} must be {op} {max_value}, got {value}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``, else raise listing them."""
    options = list(choices)
    if value not in options:
        shown = ", ".join(repr(c) for c in options)
        raise ValueError(f"{name} must be one of {shown}; got {value!r}")
    return value


def resolve_named(name: str, value: Any, cls: type, load: Callable[[str], Any]) -> Any:
    """``value`` if it is a ``cls``, else ``load(value)`` of a name; another type: ``TypeError`` naming ``name``."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a {cls.__name__} or a name, got {type(value).__name__}")
    return load(value)


def check_tensor(
    name: str,
    value: Any,
    *,
    ndim: int | Sequence[int] | None = None,
    dtypes: Iterable[Any] | None = None,
    floating: bool = False,
) -> Any:
    """Check that ``value`` is a ``torch.Tensor`` of the given rank(s) and dtype(s); return it.

    ``floating=True`` requires a floating-point dtype. Raises ``TypeError`` for a non-tensor or a wrong
    dtype, ``ValueError`` for a wrong rank.
    """
    import torch

    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        ranks = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in ranks:
            want = " or ".join(str(r) for r in ranks)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(value.shape)}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {value.dtype}")
    if dtypes is not None:
        allowed = list(dtypes)
        if value.dtype not in allowed:
            raise TypeError(f"{name} must have dtype in {allowed}, got {value.dtype}")
    return value


def check_same_device(**tensors: Any) -> None:
    """Raise if the given tensors (keyword name -> tensor) are not all on one device."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        shown = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must be on one device, got {shown}")
