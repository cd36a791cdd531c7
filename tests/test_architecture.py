"""The layers of service/ hold: no import cycle, nothing below the API imports it, and no method's name is
used as a key outside service/methods/ (each method declares its facts on its class)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from service.methods import METHODS

SERVICE = Path(__file__).resolve().parent.parent / "service"


def module_name(path: Path) -> str:
    parts = path.relative_to(SERVICE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in SERVICE.rglob("*.py")}


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The service modules `name` imports when it runs (lazy imports in functions too; not the ones under
    `if TYPE_CHECKING:`), each with the packages above it that Python initialises first."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_only(child):
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = package[: len(package) - child.level + 1] if child.level else []
                target = ".".join([*base, *(child.module.split(".") if child.module else [])])
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in child.names)
            visit(child)

    visit(ast.parse(path.read_text()))
    out = set()
    for target in found:
        parts = target.split(".")
        # the package inits run first; a module's own packages do not count
        for i in range(2, len(parts) + 1):
            candidate = ".".join(parts[:i])
            if candidate in known and candidate != name and not name.startswith(candidate + "."):
                out.add(candidate)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in edges.get(node, ()):
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return found


def test_the_checker_sees_a_cycle_and_an_upward_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    known = modules()
    assert "service.errors" in imports("service.runtime", known["service.runtime"], known)
    assert "service.api" in imports("service.app", known["service.app"], known)


def test_no_import_cycle_inside_service():
    assert cycles(graph()) == []


def test_nothing_below_the_api_imports_it():
    """Only the composition root (service/app.py, which mounts the routers) imports service.api."""
    upward = {(name, target) for name, targets in graph().items() if not name.startswith("service.api")
              and name != "service.app" for target in targets if target.startswith("service.api")}
    assert upward == set()


def test_no_method_name_is_used_as_a_key_outside_the_methods():
    assert "gradcam" in METHODS  # the registered methods: a new one is covered with no edit here
    names = "|".join(re.escape(n) for n in sorted(METHODS))
    pattern = re.compile(rf"""["'`]({names})["'`]""")
    offenders = []
    for path in sorted(SERVICE.rglob("*")):
        if path.suffix not in (".py", ".js", ".html", ".css") or "methods" in path.relative_to(SERVICE).parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(SERVICE.parent)}:{number}: {line.strip()}")
    assert offenders == []
