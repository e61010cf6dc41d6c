#!/usr/bin/env python3
"""Print which module of klippy_extras/polar_cloud/ imports which, as the
tree docs/architecture.md shows (tests/unit/test_layout.py keeps the two
equal).  Relative imports only, read with ast, nothing is imported."""
from __future__ import annotations

import ast
import os
import sys

PACKAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                       "klippy_extras", "polar_cloud")


def module_imports(package: str = PACKAGE) -> dict[str, list[str]]:
    """{module: sorted modules of the package it imports}."""
    names = sorted(f[:-3] for f in os.listdir(package) if f.endswith(".py"))
    graph = {}
    for name in names:
        with open(os.path.join(package, name + ".py")) as f:
            tree = ast.parse(f.read())
        found = set()
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or node.level != 1:
                continue
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        graph[name] = sorted(found & set(names))
    return graph


def find_cycle(graph: dict[str, list[str]]) -> list[str]:
    """One import cycle as a list of modules, or [] when there is none."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str]:
        if name in path:
            return path[path.index(name):] + [name]
        if name in done:
            return []
        for child in graph[name]:
            cycle = visit(child, path + [name])
            if cycle:
                return cycle
        done.add(name)
        return []
    for name in graph:
        cycle = visit(name, [])
        if cycle:
            return cycle
    return []


def render(graph: dict[str, list[str]], root: str = "__init__") -> str:
    lines = [root]
    shown: set[str] = {root}

    def walk(name: str, prefix: str) -> None:
        children = graph[name]
        for i, child in enumerate(children):
            last = i == len(children) - 1
            branch = "└── " if last else "├── "
            if child in shown and graph[child]:
                lines.append(prefix + branch + child + "  (above)")
                continue
            shown.add(child)
            lines.append(prefix + branch + child)
            walk(child, prefix + ("    " if last else "│   "))
    walk(root, "")
    return "\n".join(lines)


def main() -> int:
    graph = module_imports()
    cycle = find_cycle(graph)
    if cycle:
        print("import cycle: " + " -> ".join(cycle), file=sys.stderr)
        return 1
    print(render(graph))
    return 0


if __name__ == "__main__":
    sys.exit(main())
