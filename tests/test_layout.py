"""The package's layout: imports run downward, no cycles, every docstring example runs.

Layers, bottom up: ``common`` (shared helpers) <- ``storage`` (moment formats)
<- ``stages`` <- ``optimizers`` <- ``kernels``; ``readers`` and ``guards`` read
or wrap states and sit beside the stages. ``optax_snr/__init__.py`` and
``demo.py`` are on top and may import anything.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import pathlib
import pkgutil

import helpers
import pytest

import optax_snr

PACKAGE = helpers.REPO / "optax_snr"

# What each folder may import from inside the package (besides itself).
ALLOWED = {
    "common": set(),
    "storage": {"common"},
    "stages": {"common", "storage"},
    "optimizers": {"common", "stages", "storage"},
    "readers": {"common", "stages", "storage"},
    "guards": {"common"},
    "kernels": {"common", "stages", "optimizers", "storage"},
}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(helpers.REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _internal_imports(path: pathlib.Path) -> set[str]:
    """The ``optax_snr`` modules that ``path`` imports, as dotted names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("optax_snr"):
                for alias in node.names:  # ``from optax_snr.x import y``: y may be a module.
                    candidate = f"{node.module}.{alias.name}"
                    file = helpers.REPO.joinpath(*candidate.split(".")).with_suffix(".py")
                    names.add(candidate if file.exists() else node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("optax_snr"))
    return names


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if p.name != "__init__.py"}
GRAPH = {name: _internal_imports(path) for name, path in MODULES.items()}


def test_layers_exist():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(ALLOWED)


@pytest.mark.parametrize("module", sorted(n for n in MODULES if n.count(".") == 2))
def test_imports_run_downward(module):
    folder = module.split(".")[1]
    for imported in GRAPH[module]:
        parts = imported.split(".")
        assert len(parts) >= 2 and parts[1] != "demo", f"{module} imports {imported}"
        target = parts[1]
        assert target == folder or target in ALLOWED[folder], (
            f"{module} imports {imported}: {folder} may import only "
            f"{sorted(ALLOWED[folder] | {folder})}"
        )


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done.

    def visit(name: str, path: tuple[str, ...]) -> None:
        state[name] = 1
        for nxt in GRAPH.get(name, ()):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join((*path, name, nxt)))
            if nxt in GRAPH and nxt not in state:
                visit(nxt, (*path, name))
        state[name] = 2

    for name in GRAPH:
        if name not in state:
            visit(name, ())


def test_public_api_is_top_level():
    for name in optax_snr.__all__:
        obj = getattr(optax_snr, name)
        assert not getattr(obj, "__module__", "optax_snr").startswith("optax_snr._")


def _all_modules() -> list[str]:
    return sorted(
        m.name
        for m in pkgutil.walk_packages(optax_snr.__path__, "optax_snr.")
        if m.name != "optax_snr.demo"  # The demo's examples are its command line.
    )


@pytest.mark.parametrize("module", _all_modules())
def test_docstring_examples(module):
    """Every example in every docstring runs; every public stage, optimizer, reader,
    guard and kernel module has at least one."""
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.failed == 0
    if module.count(".") == 2 and not module.startswith("optax_snr.common."):
        assert result.attempted > 0, f"{module} has no docstring example"
