"""The module graph points one way: every import (module level or inside a function; `TYPE_CHECKING` blocks
aside) goes to a strictly lower layer or stays inside its own package, so there is no cycle, and evaluators/
reaches harness only through its base layer."""

from __future__ import annotations

import ast
from pathlib import Path

from harness.paths import REPO_ROOT

PACKAGES = ("harness", "evaluators", "experiments")
# Lower number = lower layer. An import may only point to a lower layer or within its own package.
LAYERS = {
    # the base layer: where files live, then the embedded builders (which read the shipped data), then core
    # (records, formats, prompts, model loading, which resolves embedded model names, the generation contract)
    "harness.paths": 0, "harness.embedded": 1, "harness.core": 2,
    "evaluators": 3, "harness.engines": 3,
    "harness.training": 4, "harness.rl": 4,
    "experiments": 5,
    "harness.sweeps": 6,
    "harness.commands": 7,
    "harness": 8,  # harness/__main__.py
}
BASE = ("harness.paths", "harness.core", "harness.embedded")


def module_files() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO_ROOT / package).rglob("*.py"):
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports, each resolved to the module file it loads."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_lines(tree)
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def layer_of(module: str) -> tuple[str, int]:
    package = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return package, LAYERS[package]


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_graph_covers_every_module():
    edges = graph()
    assert {"harness.core.generation", "evaluators.humaneval", "harness.training.runner",
            "harness.commands.cli", "experiments.simpo_qwen"} <= set(edges)
    # imports inside function bodies count: cli loads the runner lazily
    assert "harness.training.runner" in edges["harness.commands.cli"]


def test_no_import_cycle():
    assert find_cycle(graph()) is None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_every_import_points_down():
    upward = []
    for module, targets in graph().items():
        package, level = layer_of(module)
        for target in targets:
            target_package, target_level = layer_of(target)
            if target_package != package and target_level >= level:
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_evaluators_import_only_the_base_layer():
    reach = [f"{m} -> {t}" for m, targets in graph().items() if m.startswith("evaluators")
             for t in targets if t.startswith("harness") and not t.startswith(BASE)]
    assert reach == []
