"""The layout holds: no import circle in `pipeline/` or `supervit/`, no module too long to read, and each command
is a package whose options sit in a room of their own below the rooms that read them.

Every import counts, wherever it stands (module level, inside a function, under ``TYPE_CHECKING``): a lazy import
only hides a circle until the day someone moves it to the top.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "supervit")
MAX_LINES = 450


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _resolve(name: str, importer: str, is_package: bool, level: int) -> str:
    """The absolute module name of a (possibly relative) import."""
    if level == 0:
        return name
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports (``from pkg import sub`` counts as importing ``pkg.sub`` when that
    is a module, else ``pkg`` itself: its ``__init__``)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node.module or "", mod, is_package, node.level)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                # `import a.b.c` names a.b.c; keep the longest prefix that is a project module.
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_lazy_type_checking_and_relative_imports(tmp_path):
    graph = import_graph(_modules())
    # A few arrows known to exist, one of each kind, so an empty graph cannot pass the cycle test.
    assert "pipeline.search.options" in graph["pipeline.search.plan"]  # under TYPE_CHECKING
    assert "pipeline.common.cli" in graph["pipeline.search.options"]  # from ..common import cli
    assert "pipeline.search.command" in graph["pipeline.search"]  # a package's __init__
    assert "supervit.export" in graph["supervit.latency"]  # inside a function


def test_no_import_circle_in_pipeline_or_supervit():
    cycles = find_cycles(import_graph(_modules()))
    assert not cycles, "import circles: " + "; ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_is_too_long(package):
    long = {
        str(p.relative_to(ROOT)): n
        for p in (ROOT / package).rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


@pytest.mark.parametrize("command", ["supertrain", "search", "serve"])
def test_each_command_is_a_package_with_its_options_below_its_rooms(command):
    graph = import_graph(_modules())
    pkg = f"pipeline.{command}"
    options = f"{pkg}.options"
    assert (ROOT / "pipeline" / command / "__main__.py").is_file()
    # The options import nothing of the command's own rooms that reads them back.
    readers = {m for m, deps in graph.items() if options in deps}
    assert f"{pkg}.command" in readers
    assert not graph[options] & readers
    # The shared floor imports no command.
    for m, deps in graph.items():
        if m.startswith("pipeline.common"):
            assert not {
                d for d in deps if d.startswith(("pipeline.supertrain", "pipeline.search", "pipeline.serve"))
            }, m
