"""The import graph between packages has no cycles, `cluster` never imports `serving`, and the runner
seam (serving/engine/runner.py) is all that `serving/parallel` knows of the engine.

Imports are read from the source (every `import` statement, module level or inside a function), so a
dependency hidden in a function body counts like any other. Nodes are the packages of
`serving` (serving.engine, serving.models, ...), each top-level module of `serving` (serving.config,
serving.cli, ...), `cluster` and its subpackages; the seam module is a node of its own, because both
the engine and the parallel backends depend on it and it depends on neither.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP_PACKAGES = ("serving", "cluster")
SEAMS = ("serving.engine.runner",)

Edges = dict[str, dict[str, list[str]]]  # node -> imported node -> "file:line" of each import


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(root: Path, path: Path) -> list[tuple[str, int]]:
    """(module, line) of every import in the file; `from pkg import name` counts as pkg.name when that is a module."""
    own = module_name(root, path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                as_path = root / Path(*candidate.split("."))
                is_module = as_path.with_suffix(".py").is_file() or (as_path / "__init__.py").is_file()
                found.append((candidate if is_module else base, node.lineno))
    return found


def node_of(root: Path, module: str) -> str | None:
    """The graph node a module belongs to, or None outside the project."""
    if module.split(".")[0] not in TOP_PACKAGES:
        return None
    for seam in SEAMS:
        if module == seam or module.startswith(seam + "."):
            return seam
    parts = module.split(".")
    if len(parts) == 1:
        return parts[0]
    if (root / parts[0] / parts[1]).is_dir() or parts[0] == "serving":
        return ".".join(parts[:2])
    return parts[0]  # a top-level module of cluster


def package_edges(root: Path) -> Edges:
    edges: Edges = defaultdict(lambda: defaultdict(list))
    for top in TOP_PACKAGES:
        for path in sorted((root / top).rglob("*.py")):
            source = node_of(root, module_name(root, path))
            for module, line in imported_modules(root, path):
                target = node_of(root, module)
                if target is not None and target != source:
                    edges[source][target].append(f"{path.relative_to(root)}:{line}")
    return edges


def cycles(edges: Edges) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in list(edges):
        if node not in index:
            visit(node)
    return found


def describe(edges: Edges, component: list[str]) -> str:
    members = set(component)
    lines = []
    for a in component:
        for b, where in edges[a].items():
            if b in members:
                lines.append(f"{a} -> {b} ({', '.join(list(dict.fromkeys(where))[:3])})")
    return "\n".join(lines)


def test_no_import_cycle_between_packages():
    edges = package_edges(ROOT)
    found = cycles(edges)
    assert not found, "import cycles between packages:\n" + "\n\n".join(describe(edges, c) for c in found)


def test_cluster_never_imports_serving():
    edges = package_edges(ROOT)
    wrong = {f"{a} -> {b}: {where}" for a in edges if a.startswith("cluster") for b, where in edges[a].items() if b.startswith("serving")}
    assert not wrong, "\n".join(sorted(wrong))


def test_parallel_knows_only_the_engines_runner_seam():
    edges = package_edges(ROOT)
    assert "serving.engine" not in edges["serving.parallel"], edges["serving.parallel"]["serving.engine"]
    assert set(edges["serving.engine.runner"]) <= {"serving.config", "serving.errors", "serving.models"}, dict(
        edges["serving.engine.runner"]
    )


def test_models_know_nothing_of_parallel_or_the_engine():
    edges = package_edges(ROOT)
    assert not {"serving.parallel", "serving.engine", "serving.engine.runner"} & set(edges["serving.models"]), dict(edges["serving.models"])


def test_the_checks_find_a_cycle_and_a_function_level_import(tmp_path):
    """The graph is read the way the tests above rely on: a cycle through an import inside a function is found."""
    (tmp_path / "serving" / "a").mkdir(parents=True)
    (tmp_path / "serving" / "b").mkdir()
    (tmp_path / "cluster").mkdir()
    for folder in ("serving", "serving/a", "serving/b", "cluster"):
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "serving" / "a" / "x.py").write_text("from serving.b import y\n")
    (tmp_path / "serving" / "b" / "y.py").write_text("def f():\n    from ..a import x\n")
    (tmp_path / "cluster" / "z.py").write_text("import serving.config\n")
    edges = package_edges(tmp_path)
    assert cycles(edges) == [["serving.a", "serving.b"]]
    assert dict(edges["cluster"]) == {"serving.config": ["cluster/z.py:1"]}
