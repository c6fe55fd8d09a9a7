"""Lazy subpackage exports (PEP 562): a subpackage names what each submodule exports and loads it on first use."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """``(__all__, __getattr__, __dir__)`` for ``package`` whose submodules export the names in ``exports``.

    ``exports`` maps a submodule to its exported names as one space-separated string (its ``__all__``; ``""`` for
    a submodule reached only as itself). An attribute that is a submodule or one of its names imports that
    submodule on first access and is cached in the package's namespace; any other raises ``AttributeError``.
    """
    where = {name: module for module, names in exports.items() for name in names.split()}
    namespace = vars(importlib.import_module(package))
    public = sorted(where) + list(exports)

    def __getattr__(name: str) -> Any:
        """Load a submodule, or the submodule defining ``name``, on first access (PEP 562)."""
        if name in exports:
            value = importlib.import_module(f"{package}.{name}")
        elif name in where:
            value = getattr(importlib.import_module(f"{package}.{where[name]}"), name)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(public)

    return public, __getattr__, __dir__
