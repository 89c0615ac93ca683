"""The package layout: the import rule of every package, no import circle, no oversized module,
and the import paths of the flat layout still working."""

from __future__ import annotations

import ast
import importlib
import json
import pathlib
import re
import sys

import pytest

import fwdgrad

SOURCE = pathlib.Path(fwdgrad.__file__).parent
# the library's packages; fwdgrad.experiments (the commands) may import anything
LIBRARY = ("core", "local", "distributed", "train", "bench", "studies")
MAX_LINES = 420  # "no module over about 400 lines"
# the standard library, which every package may import
STDLIB = set(sys.stdlib_module_names) | {"__future__"}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    relative = pathlib.Path(*name.split(".")[1:]) if "." in name else pathlib.Path()
    return (SOURCE / relative).with_suffix(".py").is_file() or (SOURCE / relative / "__init__.py").is_file()


def imports(path: pathlib.Path) -> list[tuple[str, bool]]:
    """(imported module, at module level) for every import statement of the file.

    ``from a.b import c`` names ``a.b.c`` where that is a module of fwdgrad, else ``a.b``.
    Imports inside functions count (they are dependencies all the same); so do imports
    under ``if TYPE_CHECKING`` (a circle through annotations is still a circle).
    """
    found = []

    def visit(node: ast.AST, top_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = top_level and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, top_level) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                assert child.level == 0, f"{path}: relative import"
                base = child.module
                for alias in child.names:
                    candidate = f"{base}.{alias.name}"
                    found.append((candidate if base.startswith("fwdgrad") and is_module(candidate) else base,
                                  top_level))
            visit(child, inside)

    visit(ast.parse(path.read_text()), True)
    return found


def package_of(module: str) -> str:
    """``fwdgrad.core.weight`` -> ``core``; a module directly under fwdgrad -> its own name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "fwdgrad"


def import_rule(package: str) -> tuple[set[str], str]:
    """The packages (of fwdgrad, and third-party) that ``package``'s ``__init__`` docstring allows."""
    docstring = ast.get_docstring(ast.parse((SOURCE / package / "__init__.py").read_text())) or ""
    lines = [line for line in docstring.splitlines() if line.startswith("May import:")]
    assert len(lines) == 1, f"fwdgrad/{package}/__init__.py: no 'May import:' line in the docstring"
    allowed = {item.strip().rstrip(".") for item in lines[0].removeprefix("May import:").split(",")}
    return allowed, docstring


MODULES = {module_name(path): path for path in sorted(SOURCE.rglob("*.py"))}
GRAPH = {
    module: {target for target, _ in imports(path) if target.startswith("fwdgrad.") or target == "fwdgrad"}
    for module, path in MODULES.items()
}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as a path [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def search(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for successor in sorted(graph.get(node, ())):
            if state.get(successor) == 1:
                return path[path.index(successor):] + [successor]
            if successor not in state and (cycle := search(successor)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := search(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_known_cycle_and_none_in_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_among_fwdgrad_modules():
    # the package fwdgrad itself imports the public API; a module importing `fwdgrad` would close a circle
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


@pytest.mark.parametrize("package", LIBRARY + ("experiments",))
def test_every_package_says_what_it_is_for_and_what_it_may_import(package):
    allowed, docstring = import_rule(package)
    assert len(docstring.split("May import:")[0].split()) >= 12, f"fwdgrad.{package}: say what the package is for"
    if package != "experiments":
        assert "torch" in allowed and all(item == "torch" or item.startswith("fwdgrad.") for item in allowed)


@pytest.mark.parametrize("package", LIBRARY)
def test_the_library_packages_import_what_their_rule_allows(package):
    allowed, _ = import_rule(package)
    allowed_packages = {item.removeprefix("fwdgrad.") for item in allowed if item.startswith("fwdgrad.")} | {package}
    wrong = []
    for module, path in MODULES.items():
        if package_of(module) != package:
            continue
        for target, top_level in imports(path):
            root = target.split(".")[0]
            if root == "fwdgrad":
                if package_of(target) not in allowed_packages:
                    wrong.append(f"{module} imports {target}")
            elif root not in STDLIB and root != "torch" and top_level:
                # third-party packages only inside the function that needs them
                wrong.append(f"{module} imports {target} at module level")
    assert not wrong, f"fwdgrad.{package} may import {sorted(allowed)}: " + "; ".join(wrong)


def test_nothing_but_the_entry_point_imports_the_commands():
    importers = sorted(module for module, targets in GRAPH.items()
                       if package_of(module) != "experiments" and module != "fwdgrad.__main__"
                       and any(package_of(target) == "experiments" for target in targets))
    assert importers == []


def test_the_top_level_package_imports_the_public_api_only():
    # fwdgrad/__init__ re-exports from the core, local losses and the closed-form studies
    assert {package_of(target) for target in GRAPH["fwdgrad"]} <= {"core", "local", "studies", "_moved"}


def test_no_module_is_over_about_400_lines():
    lines = {module: len(path.read_text().splitlines()) for module, path in MODULES.items()}
    assert {module: count for module, count in lines.items() if count > MAX_LINES} == {}


def test_no_module_is_left_directly_under_fwdgrad_but_the_entry_points():
    assert sorted(path.name for path in SOURCE.glob("*.py")) == ["__init__.py", "__main__.py", "_moved.py"]


OLD = json.loads((pathlib.Path(__file__).parent / "flat_layout_names.json").read_text())["modules"]
# names the layout moved on purpose: the core no longer imports local losses, the library no plotting
MOVED_ON_PURPOSE = {
    ("estimators", "LocalForwardGradient"): "fwdgrad.LocalForwardGradient",
    ("estimators", "PERTURBATIONS"): "removed: unused",
    ("atomic", "save_figure"): "fwdgrad.experiments.plots.save_figure",
    # issue 17: heads of any kind (a layout and a pooled grid instead of a width)
    ("local_losses", "make_head"): "fwdgrad.local.heads.make_head",
}


@pytest.mark.parametrize("old", sorted(OLD))
def test_the_import_paths_of_the_flat_layout_still_work(old):
    module = importlib.import_module(f"fwdgrad.{old}")
    missing = [name for name in OLD[old] if (old, name) not in MOVED_ON_PURPOSE and not hasattr(module, name)]
    assert missing == []
    # the old path is the module itself, not a copy (a monkeypatch through either is seen by both)
    assert sys.modules[f"fwdgrad.{old}"] is module
    assert re.fullmatch(r"fwdgrad\.(core|local|distributed|train|bench|studies|experiments)(\.\w+)?", module.__name__)
    assert module.__spec__.name == module.__name__


def test_an_old_path_and_its_new_module_share_state():
    import fwdgrad.aggregation

    import fwdgrad.core.aggregation

    assert fwdgrad.aggregation is fwdgrad.core.aggregation
    from fwdgrad.models import build_model

    from fwdgrad.train.models import build_model as new_build_model

    assert build_model is new_build_model


def test_an_unknown_submodule_is_still_an_import_error():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("fwdgrad.no_such_module")


def test_every_public_name_is_importable_from_fwdgrad():
    for name in fwdgrad.__all__:
        assert getattr(fwdgrad, name) is not None
