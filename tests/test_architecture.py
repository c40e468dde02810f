"""The design rules that keep peftlab extensible, checked on the source (no model is built here).

* Methods own what a method is: no module outside ``methods/`` names a method in a string literal;
  it reads the facts the method declares (``peftlab.methods.base.Method``).
* No module imports another module's ``_private`` name; module-level imports form no cycle; methods do
  not import the package facade; inference does not import training.
* No module is over 600 lines (split by responsibility).

tests/test_plugin_method.py is the other half: a method registered from outside the package works
everywhere.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "peftlab"
MAX_LINES = 600

# String literals equal to a method name that are not about the method, each with its reason.
ALLOWED_NAME_LITERALS = {
    ("artifacts.py", "adapter"): "ADAPTER_DIR, the run folder's weights subfolder, defined once",
}


def _modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def _relative(path: Path) -> str:
    return path.relative_to(SRC).as_posix()


def _docstring_nodes(tree: ast.AST) -> set[int]:
    """ids of the Constant nodes that are docstrings (module, class, function)."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                ids.add(id(first.value))
    return ids


def test_no_method_name_literals_outside_methods():
    from peftlab.methods import method_names

    names = set(method_names())
    assert {"lora", "full", "adapter", "p-tuning-v2"} <= names
    found = []
    for path in _modules():
        relative = _relative(path)
        if relative.startswith("methods/"):
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        docstrings = _docstring_nodes(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names
                    and id(node) not in docstrings and (relative, node.value) not in ALLOWED_NAME_LITERALS):
                found.append(f"{relative}:{node.lineno} {node.value!r}")
    assert not found, ("method names outside methods/ (read the method's declared facts instead): "
                       + ", ".join(found))


def _imports(tree: ast.AST, *, top_level_only: bool):
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [alias.name for alias in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno


def test_no_private_cross_module_imports():
    found = []
    for path in _modules():
        for module, names, line in _imports(ast.parse(path.read_text()), top_level_only=False):
            if not module.startswith("peftlab"):
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                found.append(f"{_relative(path)}:{line} from {module} import {', '.join(private)}")
    assert not found, "imports of another module's private names: " + "; ".join(found)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def test_module_level_imports_have_no_cycle():
    graph: dict[str, set[str]] = {}
    known = {_module_name(path) for path in _modules()}
    for path in _modules():
        edges = set()
        for module, names, _ in _imports(ast.parse(path.read_text()), top_level_only=True):
            if module in known:
                edges.add(module)
            for name in names:  # from peftlab import training -> the submodule
                if f"{module}.{name}" in known:
                    edges.add(f"{module}.{name}")
        graph[_module_name(path)] = edges - {_module_name(path)}

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            # a package importing its own submodules to re-export them is not a cycle of design
            if target.startswith(node + "."):
                continue
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if state.get(target) is None:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None:
            cycle = visit(node)
            assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


def test_methods_do_not_import_the_package_facade():
    for path in sorted((SRC / "methods").glob("*.py")):
        for module, names, line in _imports(ast.parse(path.read_text()), top_level_only=False):
            assert not (module == "peftlab" and (not names or set(names) - {"errors"})), (
                f"methods/{path.name}:{line} imports the package facade; import the leaf module instead")


def test_inference_does_not_import_training():
    tree = ast.parse((SRC / "inference.py").read_text())
    for module, names, line in _imports(tree, top_level_only=False):
        assert module != "peftlab.training" and not (module == "peftlab" and "training" in names), (
            f"inference.py:{line} imports training")


@pytest.mark.parametrize("path", _modules(), ids=_relative)
def test_modules_stay_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{_relative(path)} has {lines} lines: split it by responsibility"


def test_task_kinds_are_defined_once():
    """The set of kinds is the TaskKind enum; no module spells the five kinds out again."""
    kinds = ('"seq-cls"', '"token-cls"', '"causal-lm"', '"seq2seq"', '"qa"')
    found = [_relative(path) for path in _modules()
             if _relative(path) != "kinds.py" and all(kind in path.read_text() for kind in kinds)]
    assert not found, f"the five kinds written out again in: {', '.join(found)} (use peftlab.kinds.TaskKind)"
