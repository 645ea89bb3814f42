"""The runtime modules by concern: imports flow one way (no cycle, ``__main__`` blocks and imports inside functions
included), none is much over 800 lines, and ruff formats them (at most a handful of ``# fmt: skip``)."""

import ast
from pathlib import Path

from conftest import REPO

MAX_LINES = 820  # "about 800": a module past this holds more than one concern
MAX_FMT_SKIPS = 10


def runtime_modules() -> dict[str, Path]:
    return {path.stem: path for path in sorted(REPO.glob("*.py"))}


def project_imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules ``path`` imports anywhere in it (functions and ``__main__`` blocks included), except under
    ``if TYPE_CHECKING:``, which never runs."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return (found & modules) - {path.stem}


def import_graph() -> dict[str, set[str]]:
    modules = runtime_modules()
    return {name: project_imports(path, set(modules)) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_import_graph_of_the_runtime_modules_has_no_cycle():
    graph = import_graph()
    assert {"datasets", "methods", "registry", "train", "config"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_lower_layers_import_nothing_above_them():
    graph = import_graph()
    for low in ("losses", "metrics", "models", "files", "tool_io"):
        assert not graph[low] & {"config", "train", "datasets", "methods", "registry"}, (low, graph[low])
    assert "methods" not in graph["registry"]  # the entries register themselves; the machinery never imports them


def test_no_runtime_module_is_much_over_800_lines():
    lengths = {name: len(path.read_text().splitlines()) for name, path in runtime_modules().items()}
    assert {name: n for name, n in lengths.items() if n > MAX_LINES} == {}


def test_ruff_formats_the_runtime_code_with_few_exceptions():
    skips = {name: path.read_text().count("# fmt: skip") for name, path in runtime_modules().items()}
    assert sum(skips.values()) <= MAX_FMT_SKIPS, {name: n for name, n in skips.items() if n}
