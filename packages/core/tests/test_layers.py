"""core's layers import one way, and a checkpoint names no core module.

The layers, lowest first (``core.LAYERS``; every module sits in one)::

    errors -> config -> nn -> run -> parallel -> task -> engine -> sweep, report -> commands

A module may import from its own layer and the ones before it; ``sweep`` and ``report`` share a
rank and must not import each other both ways; nothing imports ``commands`` but ``commands``
and ``testing``; ``testing`` may import anything and nothing imports it. The imports of a
``python -m`` self-check (the ``if __name__ == "__main__":`` block) run only in that process and
are not counted.
"""

from __future__ import annotations

import ast
import pickletools
import zipfile
from dataclasses import dataclass
from pathlib import Path

import core

CORE = Path(core.__file__).resolve().parent
LAYERS: list[tuple[str, ...]] = core.LAYERS
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
ANY = "testing"  # may import every layer; imported by none


@dataclass(frozen=True)
class Edge:
    """One import of a core module by a core module."""

    source: str  # the importing file, relative to core's folder
    line: int
    importer: str  # layer of the importing file
    imported: str  # layer of the imported module
    text: str  # the import statement

    def __str__(self) -> str:
        return f"core/{self.source}:{self.line}: {self.text}  ({self.importer} -> {self.imported})"


def layer_of(dotted: str) -> str | None:
    """``core.run.folder`` -> ``run``; ``core`` or ``core.__version__`` -> None (the root)."""
    parts = dotted.split(".")
    return (
        parts[1] if parts[0] == "core" and len(parts) > 1 and parts[1] != "lazy_exports" else None
    )


def is_self_check(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)


def imports_of(tree: ast.Module) -> list[tuple[ast.stmt, list[str]]]:
    """``(statement, [imported dotted names])`` of every import outside the self-check block."""
    found = []
    stack: list[ast.AST] = [n for n in tree.body if not is_self_check(n)]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import):
            found.append((node, [a.name for a in node.names]))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "core":
                found.append((node, [f"core.{a.name}" for a in node.names]))
            else:
                found.append((node, [node.module]))
        stack.extend(ast.iter_child_nodes(node))
    return found


def core_edges(root: Path = CORE) -> tuple[list[Edge], list[str]]:
    """Every import between layers of core, and the files that sit in no layer."""
    edges, homeless = [], []
    for path in sorted(root.rglob("*.py")):
        source = path.relative_to(root).as_posix()
        importer = source.split("/")[0].removesuffix(".py")
        if importer == "__init__" or path.name == "__main__.py":
            continue  # a package's __main__.py is its self-check: it runs only in its own process
        if importer not in RANK and importer != ANY:
            homeless.append(source)
            continue
        for node, names in imports_of(ast.parse(path.read_text(encoding="utf-8"))):
            for name in names:
                imported = layer_of(name)
                if imported and imported != importer:
                    edges.append(Edge(source, node.lineno, importer, imported, ast.unparse(node)))
    return edges, homeless


def wrong_way(edges: list[Edge]) -> list[Edge]:
    """The imports that go up the layers, into ``commands`` or into ``testing``."""
    bad = []
    for e in edges:
        if e.importer == ANY:
            continue
        if e.imported == ANY or e.imported not in RANK or RANK[e.imported] > RANK[e.importer]:
            bad.append(e)
        elif e.imported == "commands" and e.importer != "commands":
            bad.append(e)
    return bad


def cycles(edges: list[Edge]) -> list[list[str]]:
    """Cycles in the graph of layers (each as the layers in order, first repeated at the end)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.importer, set()).add(e.imported)
    found, seen = [], set()

    def walk(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                cycle = path[path.index(nxt) :] + [nxt]
                key = frozenset(cycle)
                if key not in seen:
                    seen.add(key)
                    found.append(cycle)
            else:
                walk(nxt, [*path, nxt])

    for start in sorted(graph):
        walk(start, [start])
    return found


def test_every_core_module_sits_in_a_layer():
    _, homeless = core_edges()
    assert not homeless, f"modules in no layer (see core.LAYERS): {homeless}"


def test_no_upward_import_and_no_cycle_between_layers():
    edges, _ = core_edges()
    assert edges, "no import between layers found: the walk is broken"
    bad = wrong_way(edges)
    assert not bad, "imports against the layer order:\n" + "\n".join(map(str, bad))
    loops = cycles(edges)
    assert not loops, "import cycles between layers: " + "; ".join(" -> ".join(c) for c in loops)


def test_the_walk_finds_an_upward_import_and_a_cycle(tmp_path):
    """The checks above fail where they should: a run module importing the engine (which imports
    it back: a cycle), an engine module importing testing, sweep and report importing each other;
    a self-check's import is not counted."""
    files = {
        "run/folder.py": "def f():\n    from core.engine.trainer import Trainer\n",
        "engine/trainer.py": "import core.testing.toy\nfrom core.run import folder\n",
        "sweep/grid.py": "from core.report.collect import x\n",
        "report/collect.py": "from core import sweep\n",
        "task/base.py": 'if __name__ == "__main__":\n    from core.testing.toy import ToyTask\n',
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    edges, homeless = core_edges(tmp_path)
    assert not homeless
    bad = {(e.source, e.line, e.imported) for e in wrong_way(edges)}
    assert bad == {("run/folder.py", 2, "engine"), ("engine/trainer.py", 1, "testing")}
    found = sorted(sorted(c) for c in cycles(edges))
    assert found == [["engine", "engine", "run"], ["report", "report", "sweep"]]


# ------------------------------------------------------------------------------------------------
# Checkpoints: what pickle would import when loading one.


def pickled_modules(data: bytes) -> set[str]:
    """The modules a pickle names (``GLOBAL`` / ``STACK_GLOBAL`` / ``INST``), memo included."""
    modules, strings, memo = set(), [], {}
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("GLOBAL", "INST"):
            modules.add(arg.split(" ")[0])
        elif isinstance(arg, str) and "UNICODE" in op.name:
            strings.append(arg)
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
            memo[arg] = strings[-1]
        elif op.name == "MEMOIZE" and strings:
            memo[len(memo)] = strings[-1]
        elif op.name in ("BINGET", "LONG_BINGET", "GET") and arg in memo:
            strings.append(memo[arg])
        elif op.name == "STACK_GLOBAL":
            modules.add(strings[-2])
    return modules


def test_pickled_modules_sees_a_core_class():
    import pickle

    from core.errors import UserError

    assert "core.errors" in pickled_modules(pickle.dumps([UserError("x"), UserError("y")]))


def test_a_toy_checkpoint_names_no_core_module(run_toy):
    """An old run resumes after modules move only if its checkpoint pickles no core class."""
    result = run_toy("trainer.max_steps=2", "trainer.ckpt_every_n_steps=1")
    states = sorted((Path(result.run_dir) / "checkpoints").rglob("*"))
    pickles = {}
    for path in (p for p in states if p.is_file() and zipfile.is_zipfile(p)):
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if name.endswith(".pkl"):
                    pickles[f"{path.name}:{name}"] = pickled_modules(archive.read(name))
    assert pickles, f"no pickle found in {states}"
    named = {
        k: sorted(m for m in v if m.split(".")[0] in ("core", "__main__"))
        for k, v in pickles.items()
    }
    named = {k: v for k, v in named.items() if v}
    assert not named, f"checkpoint files that pickle core classes: {named}"


# -- size: what a reader takes in at once -------------------------------------------------------

PACKAGES = CORE.parents[2]  # packages/ of the workspace
MAX_FUNCTION_LINES = 60
TASK_PACKAGE_LINES = 2000
"""A task package's ``src`` (every line: code, docstrings, comments): small enough to read whole;
what it shares with another task belongs in core."""


def long_functions(root: Path) -> list[str]:
    """``file:line name (N lines)`` of every function under ``root`` longer than
    ``MAX_FUNCTION_LINES`` (from its ``def`` line to its last line, docstring included)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append(f"{path}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_in_core_or_a_task_package_is_over_60_lines():
    sources = sorted(PACKAGES.glob("*/src"))
    assert len(sources) >= 4, sources
    assert [f for src in sources for f in long_functions(src)] == []


def test_each_task_package_stays_within_its_line_budget():
    sizes = {
        src.parent.name: sum(
            len(p.read_text(encoding="utf-8").splitlines()) for p in src.rglob("*.py")
        )
        for src in sorted(PACKAGES.glob("*/src"))
        if src.parent.name != "core"
    }
    assert {"summarization", "lora_llm", "qwen_vl"} <= set(sizes), sizes
    assert {k: v for k, v in sizes.items() if v >= TASK_PACKAGE_LINES} == {}, sizes


def test_the_size_checks_find_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "big.py").write_text(f"def big():\n{body}\n")
    assert long_functions(tmp_path) == [f"{tmp_path / 'big.py'}:1 big (61 lines)"]
