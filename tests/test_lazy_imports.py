"""The lazy loaders (PEP 562 ``__getattr__``) of ``refimpl`` and its subpackages resolve every name to the object
the submodule that defines it holds.

A lazy name is one a package lists (``__all__`` or ``__dir__``) or a public submodule of it, that is not bound
right after a fresh ``import``. Each package is checked in a fresh interpreter, since importing a submodule
anywhere binds it on its parent and would hide a loader that returns the wrong module. The expected object is
found independently of the loader: the submodule of that name, or the one object that the package's submodules
export under that name.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import refimpl

ROOT = Path(__file__).resolve().parents[1]


def _packages_with_lazy_loader() -> list[str]:
    names = ["refimpl"] + [m.name for m in pkgutil.walk_packages(refimpl.__path__, "refimpl.") if m.ispkg]
    return [n for n in names if "__getattr__" in vars(importlib.import_module(n))]


LAZY_PACKAGES = _packages_with_lazy_loader()

# Runs in a fresh interpreter: argv[1] is the package. Prints one JSON object per lazy name.
PROBE = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys, types

    pkg_name = sys.argv[1]
    pkg = importlib.import_module(pkg_name)
    submodules = [m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_")]
    listed = set(getattr(pkg, "__all__", ())) | set(dir(pkg)) | set(submodules)
    lazy = sorted(n for n in listed if n not in vars(pkg))
    loader = vars(pkg)["__getattr__"]
    # Resolve every lazy name before the reference imports below bind submodules on the package.
    direct, fresh = {}, {}
    for n in lazy:
        for table, get in ((direct, loader), (fresh, lambda n: getattr(pkg, n))):
            try:
                table[n] = get(n)  # the loader itself, then attribute access
            except AttributeError as e:
                table[n] = e

    def expected(name):
        if name in submodules:
            return importlib.import_module(f"{pkg_name}.{name}")
        found = []
        for sub in submodules:
            mod = importlib.import_module(f"{pkg_name}.{sub}")
            if name in getattr(mod, "__all__", ()) and all(obj is not vars(mod)[name] for obj in found):
                found.append(vars(mod)[name])
        assert len(found) == 1, f"{pkg_name}.{name} is exported by {len(found)} submodules"
        return found[0]

    def describe(obj):
        if isinstance(obj, AttributeError):
            return f"AttributeError({obj})"
        if isinstance(obj, types.ModuleType):
            return f"module {obj.__name__}"
        return f"{type(obj).__name__} {getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', '?')}"

    for n in lazy:
        want = expected(n)
        print(json.dumps({
            "name": n,
            "expected": describe(want),
            "direct": describe(direct[n]),
            "direct_ok": direct[n] is want,
            "attribute": describe(fresh[n]),
            "attribute_ok": fresh[n] is want,
        }))
    """
)


def test_every_lazy_package_is_found() -> None:
    assert {"refimpl", "refimpl.roofline", "refimpl.attention", "refimpl.memo"} <= set(LAZY_PACKAGES), LAZY_PACKAGES


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_every_lazy_name_resolves_to_its_object(package: str) -> None:
    done = subprocess.run([sys.executable, "-c", PROBE, package], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert rows, f"{package} has a lazy __getattr__ but no lazy names"
    wrong = [r for r in rows if not (r["direct_ok"] and r["attribute_ok"])]
    assert not wrong, "\n".join(
        f"{package}.{r['name']}: expected {r['expected']}, loader gave {r['direct']}, attribute gave {r['attribute']}"
        for r in wrong
    )


def test_top_level_lists_every_public_submodule() -> None:
    public = {m.name for m in pkgutil.iter_modules(refimpl.__path__) if not m.name.startswith("_")}
    assert public <= set(refimpl.__all__), f"missing from refimpl.__all__: {sorted(public - set(refimpl.__all__))}"


def test_unknown_names_raise_attribute_error() -> None:
    for name in LAZY_PACKAGES:
        with pytest.raises(AttributeError, match="no_such_name"):
            importlib.import_module(name).no_such_name  # noqa: B018
