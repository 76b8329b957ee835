"""Layout guards on the package's source (read with ast; nothing is imported): no import circles, no module too long.

That rapid.client and rapid.protocol load no torch is checked in test_config.py (test_light_modules_load_no_torch).
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rapid"
MAX_LINES = 420


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name; a package's __init__.py under the package's own name."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path) -> set[str]:
    """Dotted names this module imports anywhere in it (function-level, lazy imports included): for
    `from a import b`, both `a` and `a.b` (b may be a module)."""
    is_package = path.name == "__init__.py"
    deps = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            deps |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if is_package else name.split(".")[:-1]
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            deps |= {base} | {f"{base}.{a.name}" for a in node.names}
    return deps


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of the package it imports. Package faces (__init__.py, which only re-export) are
    left out, as nodes and as targets."""
    mods = modules()
    faces = {n for n, p in mods.items() if p.name == "__init__.py"}
    return {n: {d for d in imports_of(n, p) if d in mods and d != n and d not in faces}
            for n, p in mods.items() if n not in faces}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_the_checker_finds_a_circle_and_reads_relative_and_lazy_imports():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []
    deps = imports_of("rapid.engine.mp_client", PACKAGE / "engine" / "mp_client.py")
    assert {"rapid.engine.ipc", "rapid.engine.launch", "rapid.worker.memory_check"} <= deps  # the last one is lazy
    graph = import_graph()
    assert "rapid.engine" not in graph and "rapid.engine.ipc" in graph["rapid.engine.mp_client"]


def test_no_import_circles():
    found = circles(import_graph())
    assert not found, "import circles among rapid's modules:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_module_over_the_line_limit():
    sizes = {name: path.read_text().count("\n") for name, path in modules().items()}
    long = {name: n for name, n in sorted(sizes.items()) if n > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them): {long}"
