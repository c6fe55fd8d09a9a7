"""The import graph of ``refimpl``: every import points down the layers, and no module imports itself back.

Layers, bottom up (DESIGN.md sec. 3): checks, display, recording and the shared model shape; the cost model
(``roofline``) and the model (``llm``), which know nothing of each other; one subpackage per technique; the
registries on top (``refimpl`` itself, the command line and its table of cache names). The imports are read
from the source with ``ast``: module-level and function-level ``import``/``from ... import``, and
``importlib.import_module`` calls (a literal name, an f-string prefix such as ``f"refimpl.memo.{name}"``, or a
variable, resolved to every module named by a string in that file), so a lazy import is an import too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "refimpl"

LAYERS: list[set[str]] = [
    {"refimpl._checks", "refimpl._dtypes", "refimpl._lazy", "refimpl.display", "refimpl.interact", "refimpl.recording"}
    | {"refimpl.model_config"},
    {"refimpl.roofline", "refimpl.llm"},
    {"refimpl.attention", "refimpl.memo", "refimpl.kivi", "refimpl.eviction", "refimpl.moe", "refimpl.quant"}
    | {"refimpl.parallel", "refimpl.serving", "refimpl.speculative"},
    {"refimpl", "refimpl.caches", "refimpl.cli"},
]
#: Units of one layer that may import each other (the helpers at the bottom and the registries on top may, in
#: any order): none of the base layers; a technique may reuse another technique's pieces (eviction stores
#: tokens with KIVI's quantizer, which is built from the integer grids of ``quant``).
LAZY, LAZY_EXPORTS = "refimpl._lazy", "lazy_exports"  # the lazy-table mechanism and its function
SIDEWAYS_OK = {("refimpl.eviction", "refimpl.kivi"), ("refimpl.kivi", "refimpl.quant")}


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules(root: Path = PACKAGE) -> dict[str, str]:
    """``{module name: source}`` of every ``.py`` file under ``root``."""
    return {module_name(p, root): p.read_text(encoding="utf-8") for p in sorted(root.rglob("*.py"))}


def _resolve(name: str, known: set[str]) -> str | None:
    """The longest known module that ``name`` is or lies in (``refimpl.llm.cache.FullCache`` -> ``...cache``)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, source: str, known: set[str], is_package: bool) -> set[str]:
    """The known modules that ``module`` imports anywhere in ``source`` (see the module docstring)."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    named = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in known}
    out: set[str | None] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(_resolve(a.name, known) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                out.add(full if full in known else _resolve(base, known))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == LAZY_EXPORTS:
            # a package's lazy table (refimpl._lazy): it imports its own submodules (never an entry point), on first use
            depth = module.count(".") + 1
            out.update(
                m for m in known if m.startswith(module + ".") and m.count(".") == depth and not m.endswith(".__main__")
            )
        elif module == LAZY and isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module":
            continue  # the mechanism imports what its caller's table names; those imports count as the caller's
        elif (
            isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
        ):
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant):
                out.add(_resolve(str(arg.value), known))
            elif isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
                prefix = str(arg.values[0].value)
                # a lazy loader's table names submodules, never an entry point
                out.update(
                    m
                    for m in known
                    if m.startswith(prefix) and "." not in m[len(prefix) :] and not m.endswith(".__main__")
                )
            elif named:
                out.update(named)
            elif module.rpartition(".")[2] == "__main__":  # an entry point may load any module, all below it
                out.update(known)
            else:
                raise AssertionError(f"{module}: import_module({ast.unparse(arg)}) names no module this test can see")
    out.discard(None)
    out.discard(module)
    return {m for m in out if m is not None and m.startswith("refimpl")}


def import_graph(modules: dict[str, str]) -> dict[str, set[str]]:
    known = set(modules)
    packages = {m for m in known if any(o.startswith(m + ".") for o in known)}
    return {m: imports_of(m, src, known, m in packages) for m, src in modules.items()}


def unit_of(module: str) -> str:
    """The layer unit a module belongs to (``refimpl.llm.cache`` -> ``refimpl.llm``)."""
    units = [u for layer in LAYERS for u in layer if module == u or (u != "refimpl" and module.startswith(u + "."))]
    assert units, f"{module} is in no layer: place it in LAYERS of {Path(__file__).name}"
    return max(units, key=len)


def layer_of(module: str) -> int:
    if module.rpartition(".")[2] == "__main__":
        return len(LAYERS)  # an entry point: run, never imported
    unit = unit_of(module)
    return next(i for i, layer in enumerate(LAYERS) if unit in layer)


def bad_imports(graph: dict[str, set[str]]) -> list[str]:
    """Each import that points up a layer, sideways between units that may not, or at an entry point."""
    bad = []
    for src, targets in graph.items():
        for dst in sorted(targets):
            if dst.rpartition(".")[2] == "__main__" and src.rpartition(".")[2] != "__main__":
                bad.append(f"{src} imports the entry point {dst}")  # (one entry point may run another)
            elif layer_of(src) < layer_of(dst):
                bad.append(f"{src} (layer {layer_of(src)}) imports {dst} (layer {layer_of(dst)}): upward")
            elif 0 < layer_of(src) == layer_of(dst) < len(LAYERS) - 1:  # helpers and registries: any order
                pair = (unit_of(src), unit_of(dst))
                if pair[0] != pair[1] and pair not in SIDEWAYS_OK:
                    bad.append(f"{src} imports {dst}: sideways between {pair[0]} and {pair[1]}")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles (each as the modules on it), by depth-first search for back edges."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                found.append(path[path.index(n) :] + [n])
            elif n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def test_every_import_points_down_the_layers():
    assert bad_imports(import_graph(all_modules())) == []


def test_no_import_cycle():
    assert cycles(import_graph(all_modules())) == []


def test_the_base_layers_name_no_technique():
    graph = import_graph(all_modules())
    techniques = LAYERS[2]
    for module, targets in graph.items():
        if layer_of(module) <= 1:
            assert not {unit_of(t) for t in targets} & techniques, module


def test_the_checks_catch_what_they_are_for(tmp_path):
    """The two defects this test was written for, planted in a copy: a name table loaded with importlib in the
    model layer (an upward import no ``import`` line shows), and two modules importing each other lazily."""
    pkg = tmp_path / "refimpl"
    for sub in ("llm", "kivi", "roofline"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "kivi" / "cache.py").write_text("class KIVICache: ...\n")
    (pkg / "llm" / "cache.py").write_text(
        'import importlib\nNAMES = {"kivi2": ("refimpl.kivi", "KIVICache")}\n'
        "def make(name):\n    module, cls = NAMES[name]\n    return getattr(importlib.import_module(module), cls)\n"
    )
    (pkg / "roofline" / "hardware.py").write_text("def load():\n    from refimpl.roofline.measure import run\n")
    (pkg / "roofline" / "measure.py").write_text("from refimpl.roofline.hardware import load\n")
    graph = import_graph(all_modules(pkg))
    assert graph["refimpl.llm.cache"] == {"refimpl.kivi"}
    assert any("refimpl.llm.cache (layer 1) imports refimpl.kivi (layer 2): upward" in b for b in bad_imports(graph))
    assert ["refimpl.roofline.hardware", "refimpl.roofline.measure", "refimpl.roofline.hardware"] in cycles(graph)


@pytest.mark.parametrize("module", ["refimpl.llm", "refimpl.roofline"])
def test_base_layer_packages_import_without_the_techniques(module):
    """Importing a base layer loads no technique module (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = (
        f"import sys, {module}\n"
        "bad = [m for m in sys.modules if m.split('.')[:2] in "
        "[['refimpl', t] for t in ('attention', 'memo', 'kivi', 'eviction', 'moe', 'caches', 'cli')]]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)
