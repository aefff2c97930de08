"""The package's import graph, read from the AST of every module under ``ctpo_lab/``: acyclic, and no module
imports another module's ``_private`` names.

Every ``import`` and ``from ... import`` counts, at module level and inside functions (a lazy import still
makes a dependency); relative imports are resolved against the importing module's package.  ``from pkg import
name`` depends on ``pkg.name`` when that is a module of the package, otherwise on ``pkg`` (its ``__init__``).
Importing ``a.b.c`` counts as a dependency on ``a.b.c`` only, not on the packages above it, so a package
``__init__`` that re-exports its submodules is not a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "ctpo_lab"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    """{dotted module name: file} for every ``.py`` file under ``ctpo_lab/``."""
    return {_module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a module of the package."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in modules:
            return cand
    return None


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """(edges {module: {imported modules of the package}}, private-name violations as readable strings)."""
    modules = package_modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    private: list[str] = []
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] != PACKAGE:
                        continue
                    target = _owner(alias.name, modules)
                    if target is not None:
                        edges[module].add(target)
                    if any(p.startswith("_") and not p.startswith("__") for p in alias.name.split(".")):
                        private.append(f"{module}:{node.lineno} imports module {alias.name}")
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    source = _resolve_relative(module, is_package, node.level, node.module)
                else:
                    source = node.module or ""
                if source.split(".")[0] != PACKAGE:
                    continue
                if any(p.startswith("_") and not p.startswith("__") for p in source.split(".")):
                    private.append(f"{module}:{node.lineno} imports from private module {source}")
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    target = sub if sub in modules else _owner(source, modules)
                    if target is not None and target != module:
                        edges[module].add(target)
                    if sub not in modules and alias.name.startswith("_") and not alias.name.startswith("__"):
                        private.append(f"{module}:{node.lineno} imports {alias.name} from {source}")
        edges[module].discard(module)
    return edges, private


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(sccs)


def _cycle_path(edges: dict[str, set[str]], component: list[str]) -> str:
    """One concrete cycle inside a strongly connected component, as ``a → b → … → a``."""
    members = set(component)
    start = component[0]
    path, seen = [start], {start}
    node = start
    while True:
        nxt = sorted(w for w in edges[node] if w in members)
        if start in nxt and len(path) > 1:
            return " → ".join(path + [start])
        fresh = [w for w in nxt if w not in seen]
        if not fresh:  # fall back: the component itself
            return " ⇄ ".join(component)
        node = fresh[0]
        path.append(node)
        seen.add(node)


def test_graph_sees_the_package():
    edges, _ = import_graph()
    assert {"ctpo_lab.losses", "ctpo_lab.train.loop", "ctpo_lab.train.device"} <= set(edges)
    assert "ctpo_lab.losses" in edges["ctpo_lab.train.loop"]
    assert "ctpo_lab.train.device" in edges["ctpo_lab.train.policy"]  # a function-level import counts too


def test_relative_imports_are_resolved():
    assert _resolve_relative("ctpo_lab.markov.exact", False, 1, "model") == "ctpo_lab.markov.model"
    assert _resolve_relative("ctpo_lab.markov", True, 1, "exact") == "ctpo_lab.markov.exact"
    assert _resolve_relative("ctpo_lab.llm.bias", False, 2, "losses") == "ctpo_lab.losses"


def test_cycle_detection_finds_a_lazy_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_is_acyclic():
    edges, _ = import_graph()
    cycles = find_cycles(edges)
    assert not cycles, "import cycles (module- or function-level imports):\n" + "\n".join(
        _cycle_path(edges, c) for c in cycles
    )


def test_no_private_names_imported_across_modules():
    _, private = import_graph()
    assert not private, "private names imported from another module:\n" + "\n".join(private)
