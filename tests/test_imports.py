"""The package's structure: imports point one way (config / manifest <- graphs <- export, runtime <- validate <-
build <- serve <- cli) with no cycle, no import of a package module inside a function except where laziness is the
point, and no line over 120 characters."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "star_export"
# Layer of each top-level part; a module may import its own layer's modules and lower layers' only. export and
# runtime share a rank but may not import each other (checked apart).
LAYERS = {
    "errors": 0, "config": 0, "manifest": 0, "engine_check": 0, "memory": 0, "models": 0, "flops": 0, "testing": 0,
    "checkpoints": 0, "assets": 0, "processor": 0,
    "graphs": 1,
    "export": 2, "runtime": 2,
    "validate": 3,
    "build": 4, "calibrate": 4,
    "serve": 5,
    "cli": 6,
}
# Modules that import package modules inside functions on purpose, and why.
LAZY = {
    "star_export.cli.*": "`--help` and argument errors answer without importing torch",
    "star_export.serve": "`star-serve --help` and the extra's check run without the server's packages",
    "star_export.serve.triton_model": "Triton imports model.py before the engine's packages are needed",
}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]):
    """(imported package module, inside a function?) for every import statement of module `name`."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:  # `from . import x`: the submodule x where there is one
                sub = f"{target}.{alias.name}"
                yield (sub if sub in known else target), id(node) in inner
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, id(node) in inner


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    known = modules()
    edges, lazy = {m: set() for m in known}, {m: set() for m in known}
    for name, path in known.items():
        for target, in_function in imports(name, path, known):
            if target in known and target != name and not name.startswith(target + "."):
                (lazy if in_function else edges)[name].add(target)
    return edges, lazy


def part(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_every_part_of_the_package_has_a_layer():
    assert {part(m) for m in modules() if m != "star_export"} <= set(LAYERS)


def test_no_import_cycle():
    edges, lazy = graph()
    both = {m: edges[m] | lazy[m] for m in edges}
    assert cycles(both) == []


def test_imports_point_down_the_layers():
    edges, lazy = graph()
    wrong = []
    for module in edges:
        if module == "star_export":
            continue
        for target in edges[module] | lazy[module]:
            a, b = part(module), part(target)
            if LAYERS[b] > LAYERS[a] or (a != b and {a, b} == {"export", "runtime"}):
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_package_modules_are_imported_inside_functions_only_where_laziness_is_the_point():
    _, lazy = graph()
    def allowed(module: str) -> bool:
        return module in LAZY or any(k.endswith(".*") and module.startswith(k[:-1]) for k in LAZY)

    assert {m: sorted(t) for m, t in lazy.items() if t and not allowed(m)} == {}


def test_the_checker_sees_a_cycle_and_a_wrong_direction():
    """The walk itself: a planted cycle is found, and so is an import against the layers."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    edges, _ = graph()
    assert "star_export.runtime.engine" in edges["star_export.validate.run"]  # a real edge, seen
    assert LAYERS[part("star_export.validate.run")] > LAYERS[part("star_export.runtime.engine")]


def test_no_line_of_the_package_is_over_120_characters():
    long = [f"{p.relative_to(PACKAGE.parent)}:{n}" for p in PACKAGE.rglob("*.py")
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if len(line) > 120]
    assert long == []
