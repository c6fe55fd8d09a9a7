"""Sphinx extension: the API reference page of one ``refimpl`` package, generated from its docstrings.

A page of the book's "API reference" part (``api/*.rst``; reStructuredText, as autodoc writes) holds one
directive::

    .. refimpl-api:: refimpl.roofline

which expands to the package's docstring (autodoc), a summary table of its public submodules (autosummary), and
one section per submodule with every public member (``automodule`` with ``:members:``; a module's ``__all__``
decides what is public). Submodules are found with :mod:`pkgutil` when the book is built, so a new module appears
in the reference without editing the page; modules whose name starts with ``_`` (``__main__``, ``_checks``) are
left out. ``:modules:`` names the modules of a page that is not one package (the top-level helpers).

Event handlers let docstrings written for readers of the source work in the reference:

* a cross-reference to a ``refimpl`` object by the name its reader would use (``:func:`analyze``` inside the
  module that imports it, ``refimpl.roofline.analyze`` for what the package re-exports, ``:meth:`attend``` for a
  method a base class defines) is resolved by importing the object and linking to where it is documented; a
  method named in a module's docstring (``:meth:`observe```) links to the first documented method of that name
  in the module, a function named where it is not imported to the only documented object of that name; a
  reference to an object that exists but has no entry (a private member such as ``_priority``, a constant
  without a ``#:`` comment) is rendered as code without a link. A name that does not resolve still warns, so
  ``-n`` catches a typo.
* Google-style sections (``Args:``, ``Returns:``, ``Raises:``) are read by napoleon, except in the docstrings
  of attributes and properties, which are prose.
* a method that inherits its docstring from outside ``refimpl`` (``forward`` of a ``torch.autograd.Function``)
  shows its signature without PyTorch's docstring, whose references point into PyTorch's own documentation.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.ext import napoleon
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import make_refnode, nested_parse_with_titles

#: Options of each module's ``automodule``: every name of ``__all__``, with or without a docstring.
MODULE_OPTIONS = ("members", "undoc-members", "show-inheritance")


def public_submodules(package: str) -> list[str]:
    """Dotted names of the public modules below ``package`` (recursively), in alphabetical order."""
    module = importlib.import_module(package)
    found = pkgutil.walk_packages(getattr(module, "__path__", []), f"{package}.")
    return sorted(m.name for m in found if not any(part.startswith("_") for part in m.name.split(".")))


def api_rst(package: str | None, modules: list[str]) -> list[str]:
    """The reStructuredText of one API page: ``package``'s docstring, a table of ``modules``, then each module."""
    lines: list[str] = []
    if package is not None:
        lines += [f".. automodule:: {package}", "   :no-members:", ""]
    # autosummary names are relative to the current module, which the package's automodule has just set.
    prefix = f"{package}." if package is not None else ""
    lines += [".. autosummary::", "", *(f"   {m.removeprefix(prefix)}" for m in modules), ""]
    for m in modules:
        title = f"``{m}``"
        lines += [title, "-" * len(title), "", f".. automodule:: {m}", *(f"   :{o}:" for o in MODULE_OPTIONS), ""]
    return lines


class RefimplAPI(SphinxDirective):
    """``{refimpl-api} PACKAGE`` or ``{refimpl-api}`` with ``:modules: a b c``: the API reference of a page."""

    optional_arguments = 1
    option_spec = {"modules": directives.unchanged_required}

    def run(self) -> list[nodes.Node]:
        package = self.arguments[0] if self.arguments else None
        modules = self.options.get("modules", "").split() or (public_submodules(package) if package else [])
        if not modules:
            raise self.error("refimpl-api needs a package with public submodules or a :modules: list")
        for m in [package, *modules] if package else modules:  # rebuild the page when a module changes
            self.env.note_dependency(importlib.import_module(m).__file__)
        node = nodes.section()
        node.document = self.state.document
        nested_parse_with_titles(self.state, StringList(api_rst(package, modules), self.get_source_info()[0]), node)
        return node.children


def import_path(dotted: str) -> Any:
    """The object named by ``dotted`` (a module, then attributes), or ``None`` if it does not import."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _canonical_names(obj: Any) -> list[str]:
    """Where ``obj`` is defined: ``module.qualname`` of a module, class, function or property."""
    obj = getattr(obj, "fget", obj)
    if isinstance(obj, type(importlib)):
        return [obj.__name__]
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    return [f"{module}.{qualname}"] if module and qualname else []


def resolve_refimpl_reference(app: Any, env: Any, node: Any, contnode: nodes.Node) -> nodes.Node | None:
    """``missing-reference`` handler: link a ``refimpl`` name to the page that documents its object."""
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip(".~")
    module, cls = node.get("py:module") or "", node.get("py:class") or ""
    scopes = [f"{module}.{cls}" if cls else "", module, ""]
    found = [(f"{scope}.{target}" if scope else target) for scope in scopes]
    found = [name for name in found if name.startswith("refimpl")]
    domain = env.get_domain("py")
    for name in found:
        obj = import_path(name)
        if obj is None:
            continue
        documented = [c for c in _canonical_names(obj) if c in domain.objects]
        # A constant has no __qualname__: find the documented object of the same name that is the same object.
        last = name.rsplit(".", 1)[-1]
        documented += [k for k in domain.objects if k.rsplit(".", 1)[-1] == last and import_path(k) is obj]
        if documented:
            entry = domain.objects[documented[0]]
            return make_refnode(app.builder, node["refdoc"], entry.docname, entry.node_id, contnode, documented[0])
        return contnode  # it exists but has no entry (private, or a constant without a ``#:`` comment)
    # ``:meth:`observe``` in a module's docstring: the first member of that name the module documents; else
    # ``:func:`list_models``` from a module that does not import it: the one object of that name in the reference.
    if module.startswith("refimpl") and "." not in target:
        suffix = f".{target}"
        here = [k for k in domain.objects if k.startswith(f"{module}.") and k.endswith(suffix)]
        anywhere = [k for k in domain.objects if k.startswith("refimpl.") and k.endswith(suffix)]
        for names in (here, anywhere if len(anywhere) == 1 else []):
            if names:
                entry = domain.objects[names[0]]
                return make_refnode(app.builder, node["refdoc"], entry.docname, entry.node_id, contnode, names[0])
    return None


def napoleon_except_attributes(app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    """Napoleon for functions, classes and modules; an attribute's or property's docstring stays prose.

    Napoleon reads the first line of an attribute docstring as ``type: description``; this package writes
    "Seconds for the stage: the sum of ...", which is a sentence, not a type.
    """
    if what not in ("attribute", "property", "data"):
        napoleon._process_docstring(app, what, name, obj, options, lines)


def drop_foreign_docstrings(app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    """``autodoc-process-docstring`` handler: drop a method's docstring inherited from outside ``refimpl``."""
    if what not in ("method", "attribute", "property") or getattr(obj, "__doc__", None):
        return
    owner_name, _, attr = name.rpartition(".")
    owner = import_path(owner_name)
    for base in getattr(owner, "__mro__", ()):
        if attr in vars(base) and getattr(vars(base)[attr], "__doc__", None):
            if not base.__module__.startswith("refimpl"):
                lines.clear()
            return


def setup(app: Any) -> dict[str, Any]:
    app.add_directive("refimpl-api", RefimplAPI)
    app.connect("missing-reference", resolve_refimpl_reference)
    app.connect("autodoc-process-docstring", drop_foreign_docstrings)
    app.setup_extension("sphinx.ext.napoleon")
    listeners = app.events.listeners["autodoc-process-docstring"]
    listeners[:] = [entry for entry in listeners if entry.handler is not napoleon._process_docstring]
    app.connect("autodoc-process-docstring", napoleon_except_attributes)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
