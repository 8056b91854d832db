"""Move core's flat modules into layer subpackages and rewrite every reference to them.

The one table below (``MOVES``) is the layout: old module under ``core/`` -> new module. Run from
anywhere inside the checkout, on the tree *before* the move (or after it: a second run changes
nothing)::

    uv run --frozen python tools/layer_core.py          # move, rewrite, write the __init__ files
    uv run --frozen python tools/layer_core.py --check  # only list what it would move

What it does, in order:

1. Inventory ``packages/core/src/core``: a flat module or a folder of modules that the table does
   not know stops the script with its name (extend ``MOVES`` or ``KEPT_PACKAGES``); a module whose
   old and new file both exist stops it too. Entries whose old file is absent are skipped.
2. Relative imports in the flat modules become absolute (``from .x import y`` ->
   ``from core.x import y``), so step 4 maps them like any other.
3. ``git mv`` every present old file to its new place.
4. Rewrite every text file git knows (``.py .md .sh .sbatch .toml .yaml ...``; CHANGELOGs, which
   record the past, are left alone): ``from core import x``, ``import core.x``, ``core.x.attr``
   in code and in strings (monkeypatch targets, ``python -m core.x``, ``core.x:main`` entry
   points) and paths ``core/x.py``. A name already in its new form is left alone, which is what
   makes a second run a no-op.
5. Write each layer's ``__init__.py``: what the layer is, its public names in ``__all__`` (the
   names that code outside the layer imports from it, found in the tree), loaded on first use.
   ``core/testing/__main__.py`` keeps ``python -m core.testing`` working.
6. ``ruff check --select I --fix`` and ``ruff format`` on the Python files it changed (import
   order moves with the new names); then ``ruff check`` lists what is left (long lines).

The layer order that ``packages/core/tests/test_layers.py`` enforces is ``LAYERS`` below.
"""

from __future__ import annotations

import argparse
import ast
import functools
import io
import re
import shutil
import subprocess
import sys
import textwrap
import tokenize
from pathlib import Path

# ------------------------------------------------------------------------------------------------
# The table: old module (a file under core/) -> new module (dotted, under core). Identity entries
# are modules that stay where they are. Order does not matter.
MOVES: dict[str, str] = {
    # errors: what goes wrong and how it ends (exit codes); imported by every layer.
    "errors": "errors",
    # config: the schema (dataclasses) and the loader (YAML, presets, key=value overrides).
    "config": "config.loader",
    "settings": "config.schema",
    # nn: torch building blocks without engine state.
    "loss": "nn.loss",
    "optim": "nn.optim",
    "padding": "nn.padding",
    "acceleration": "nn.acceleration",
    "debug": "nn.debug",
    # run: what a run leaves on disk (below parallel: checkpoint.py hashes with manifest and checks
    # free space with storage, and the strategy writes through checkpoint.py).
    "storage": "run.storage",
    "manifest": "run.manifest",
    "runs": "run.folder",
    "logs": "run.logs",
    "outputs": "run.outputs",
    "plots": "run.plots",
    # parallel: how one job spreads over ranks, and the checkpoint files it saves across them
    # (fsdp.py and strategy.py write through checkpoint.py; checkpoint.py gathers through
    # collectives).
    "distributed": "parallel.collectives",
    "reproducibility": "parallel.seeding",
    "checkpoint": "parallel.checkpoint",
    "strategy": "parallel.strategy",
    "fsdp": "parallel.fsdp",
    # task: the contract a task package fulfils and the pieces it builds on.
    "task": "task.base",
    "records": "task.records",
    "hub": "task.hub",
    "metrics": "task.metrics",
    "truncation": "task.truncation",
    # engine: the Fabric loop and its collaborators.
    "trainer": "engine.trainer",
    "batches": "engine.batches",
    "meter": "engine.meter",
    "train_state": "engine.state",
    "run_record": "engine.record",
    "evaluation": "engine.evaluation",
    "data": "engine.sampler",
    "signals": "engine.signals",
    # sweep/ and report/: their own subpackages (or still flat modules: then they stay flat).
    "sweep": "sweep",
    "report": "report",
    # commands: the argparse halves of the console scripts. estimate.py is here because its
    # dry_run() is the `train --dry-run` command (it parses the train arguments).
    "cli": "commands.train",
    "model_io": "commands.model_io",
    # spec: what a task package declares once and the commands it gets from that declaration.
    "spec": "commands.spec",
    "launcher": "commands.launcher",
    "estimate": "commands.estimate",
    # testing: the toy task and subprocess helpers; `python -m core.testing` runs the toy task.
    "testing": "testing.toy",
}

# Folders under core/ that are no layer of the table but are known: they stay as they are.
KEPT_PACKAGES = {"sweep", "report", "slurm", "testing"}

# The layers, lowest first: a module may import from its own layer and the layers before it.
# Layers in one tuple share a rank and must not import each other in a cycle.
LAYERS: list[tuple[str, ...]] = [
    ("errors",),
    ("config",),
    ("nn",),
    ("run",),
    ("parallel",),
    ("task",),
    ("engine",),
    ("sweep", "report"),
    ("commands",),
]
# testing/ is outside the order: it may import every layer, and no layer imports it (a module's
# `if __name__ == "__main__":` self-check may).

DOCS: dict[str, str] = {
    "config": "Configuration: the typed schema of every config group (``schema``) and the loader "
    "that fills it from presets, YAML files and ``key=value`` overrides (``loader``).",
    "nn": "Torch building blocks without engine state: the token loss, optimizers and schedules, "
    "padding, fused kernels and compilation, shape debugging.",
    "run": "What a run leaves on disk: the run folder and its lock, the manifest, logs and "
    "metrics, the output guard, plots, free-space checks and the run record.",
    "parallel": "How one job spreads over ranks: collectives, seeding, the Fabric strategy, FSDP2, "
    "and the atomic, verified checkpoints written across the ranks.",
    "task": "The task contract (``base.Task``) and what a task package builds on: records "
    "readers, the model hub, metrics, input truncation.",
    "engine": "The training engine: the Fabric loop (``trainer``) and its collaborators, the "
    "sharded sampler, signal handling and evaluation.",
    "commands": "The argparse halves of the console scripts: ``train`` (and ``--dry-run``), "
    "the model commands, the launcher that dispatches ``train`` / ``evaluate`` / ``infer`` / "
    "``sweep`` to the task asked for. Nothing in core imports this layer.",
    "testing": "The toy task and the helpers of the test suites. ``python -m core.testing train "
    "...`` trains the toy task. Nothing in core imports this package outside a self-check.",
}

RUN_AS_PACKAGE = {"testing"}
"""Old modules whose ``python -m core.<name>`` keeps its name (the package has a __main__)."""

TEXT_SUFFIXES = {".py", ".md", ".sh", ".sbatch", ".toml", ".yaml", ".yml", ".cfg", ".ini", ".txt"}
SKIP_NAMES = {"CHANGELOG.md", "uv.lock"}
# Written for the new layout, with old names on purpose (the script's own test and the map).
SKIP_PATHS = {"tools/layer_core.py", "packages/core/tests/test_layers.py", "docs/architecture.md"}
SELF = Path(__file__).resolve()
WIDTH = 100
GENERATED = "Generated by ``tools/layer_core.py``"
DOCSTRING_QUOTES = ('"""', "'''")


class LayoutError(SystemExit):
    """The tree holds something the table does not know; the message names it."""


def repo_root() -> Path:
    """The checkout that holds this script."""
    out = subprocess.run(
        ["git", "rev-parse", "--show-toplevel"],
        cwd=SELF.parent,
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip())


def core_dir(root: Path) -> Path:
    return root / "packages" / "core" / "src" / "core"


def new_path(core: Path, new: str) -> Path:
    """``core/<a>/<b>.py`` of a dotted new module."""
    return core.joinpath(*new.split(".")).with_suffix(".py")


def layer_packages() -> set[str]:
    """The subpackages that the table creates (first part of every dotted new name)."""
    return {new.split(".")[0] for new in MOVES.values() if "." in new}


def inventory(core: Path) -> list[tuple[str, Path, Path]]:
    """``(old, old file, new file)`` for every present flat module that moves.

    Raises:
        LayoutError: a module or folder the table does not know, or an old and a new file both
            present.
    """
    unknown = sorted(
        p.stem for p in core.glob("*.py") if p.name != "__init__.py" and p.stem not in MOVES
    )
    known_dirs = layer_packages() | KEPT_PACKAGES
    for folder in sorted(p for p in core.iterdir() if p.is_dir() and p.name != "__pycache__"):
        if folder.name not in known_dirs and any(folder.rglob("*.py")):
            unknown.append(folder.name + "/")
    if unknown:
        raise LayoutError(
            f"core modules not in the table of {SELF.name}: {', '.join(unknown)}; add them to MOVES"
        )
    moves = []
    for old, new in sorted(MOVES.items()):
        source, target = core / f"{old}.py", new_path(core, new)
        if old == new or not source.is_file():
            continue
        if target.exists():
            raise LayoutError(f"both {source} and {target} exist; merge them by hand first")
        moves.append((old, source, target))
    return moves


# ------------------------------------------------------------------------------------------------
# Rewriting references.

RELATIVE = re.compile(r"^([ \t]*)from \.(\w*) import ", re.MULTILINE)
FROM_CORE = re.compile(r"^([ \t]*)from core import ([^\n(]+)$", re.MULTILINE)


def absolute_imports(text: str) -> str:
    """``from .x import y`` / ``from . import x`` in a flat core module -> ``from core...``."""
    return RELATIVE.sub(
        lambda m: f"{m.group(1)}from core{'.' + m.group(2) if m.group(2) else ''} import ", text
    )


def split_from_core(text: str, active: dict[str, str]) -> str:
    """``from core import fsdp, x as y`` -> one ``from core.<package> import <module>`` line per
    moved module (the others stay in a ``from core import`` line)."""

    def one(match: re.Match[str]) -> str:
        indent, names = match.group(1), match.group(2)
        kept, lines = [], []
        for part in (p.strip() for p in names.split(",") if p.strip()):
            name, _, alias = (s.strip() for s in part.partition(" as "))
            new = active.get(name, name)
            if new == name or "." not in new:
                kept.append(part)
                continue
            package, module = new.rsplit(".", 1)
            bound = alias or name
            suffix = "" if bound == module else f" as {bound}"
            lines.append(f"{indent}from core.{package} import {module}{suffix}")
        if kept:
            lines.insert(0, f"{indent}from core import {', '.join(kept)}")
        return "\n".join(lines)

    return FROM_CORE.sub(one, text)


def submodules_of(package: str) -> set[str]:
    """The module names the table puts into ``core.<package>``."""
    return {new.split(".", 1)[1] for new in MOVES.values() if new.startswith(package + ".")} | {
        "__main__"
    }


def rewrite_dotted(text: str, active: dict[str, str]) -> str:
    """``core.<old>`` -> ``core.<new>`` wherever it is a whole dotted name; a name already
    pointing into a new package (``core.config.loader``) stays."""
    for old, new in sorted(active.items()):
        inside = submodules_of(old)  # old names that are also new package names: config, task...
        pattern = re.compile(rf"(?<![\w.])core\.{old}(?![\w])(\.\w+)?")

        def one(match: re.Match[str], old: str = old, new: str = new, inside=inside) -> str:
            rest = match.group(1) or ""
            if rest and rest[1:] in inside:
                return match.group(0)
            before = match.string[max(0, match.start() - 8) : match.start()]
            if old in RUN_AS_PACKAGE and not rest and re.search(r"-m[\s\"',]+$", before):
                return match.group(0)  # python -m core.testing: the package's __main__
            return f"core.{new}{rest}"

        text = pattern.sub(one, text)
        text = re.sub(rf"(?<!\w)core/{old}\.py\b", f"core/{new.replace('.', '/')}.py", text)
    return text


def text_files(root: Path) -> list[Path]:
    """Every text file git tracks or would track (ignored files such as .venv excluded)."""
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=root,
        capture_output=True,
        check=True,
    )
    names = [p for p in out.stdout.decode().split("\0") if p and p not in SKIP_PATHS]
    return [
        root / p
        for p in names
        if Path(p).suffix in TEXT_SUFFIXES
        and Path(p).name not in SKIP_NAMES
        and (root / p).is_file()
    ]


def prose_lines(text: str) -> dict[int, int]:
    """``line number (1-based) -> column where its prose starts`` for the lines of Python source
    that are comments or inside a docstring (the ones :func:`rewrap` may break)."""
    prose: dict[int, int] = {}
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError):
        return prose
    for tok in tokens:
        if tok.type == tokenize.COMMENT:
            prose[tok.start[0]] = tok.start[1]
        elif tok.type == tokenize.STRING and tok.line.lstrip().startswith(DOCSTRING_QUOTES):
            prose[tok.start[0]] = tok.start[1]  # a docstring: its first line is prose too
        if tok.type == tokenize.STRING and tok.end[0] > tok.start[0]:
            prose[tok.start[0]] = tok.start[1]
            for row in range(tok.start[0] + 1, tok.end[0] + 1):
                prose[row] = 0
    return prose


def rewrap(text: str, suffix: str) -> str:
    """Break the comment and docstring lines that a longer module name pushed past ``WIDTH``
    (only lines naming ``core.`` or ``core/``; code is ruff format's job)."""
    if suffix == ".md":
        return text
    lines = text.split("\n")
    if suffix == ".py":
        prose = prose_lines(text)
    else:
        prose = {i + 1: ln.index("#") for i, ln in enumerate(lines) if ln.lstrip().startswith("#")}
    out = []
    for number, line in enumerate(lines, start=1):
        start = prose.get(number)
        if start is None or len(line) <= WIDTH or not re.search(r"core[./]", line):
            out.append(line)
            continue
        indent = " " * (len(line) - len(line.lstrip()))
        if line[start:].lstrip().startswith("#"):
            lead = indent + "# "
        elif line.lstrip().startswith("- "):
            lead = indent + "  "
        else:
            lead = indent
        while len(line) > WIDTH:
            cut = line.rfind(" ", start + 1, WIDTH + 1)
            if cut < 0 or not line[:cut].strip():
                break
            out.append(line[:cut].rstrip())
            line, start = lead + line[cut + 1 :].lstrip(), len(lead)
        out.append(line)
    return "\n".join(out)


def active_moves(core: Path) -> dict[str, str]:
    """The entries to rewrite: old file still there (before the move) or new file there (after
    it). An entry with neither (``testing`` made a package by other means) is left alone."""
    return {
        old: new
        for old, new in MOVES.items()
        if old != new and ((core / f"{old}.py").is_file() or new_path(core, new).is_file())
    }


def rewrite_tree(root: Path, active: dict[str, str]) -> list[Path]:
    """Apply :func:`split_from_core`, :func:`rewrite_dotted` and :func:`rewrap` to every text
    file; returns the changed files."""
    changed = []
    generated = [core_dir(root) / package / "__init__.py" for package in layer_packages()]
    generated = {path for path in generated if ours(path)}
    for path in text_files(root):
        if path in generated:
            continue  # written anew by write_inits
        text = path.read_text(encoding="utf-8")
        new = rewrite_dotted(
            split_from_core(text, active) if path.suffix == ".py" else text, active
        )
        if new != text:
            path.write_text(rewrap(new, path.suffix), encoding="utf-8")
            changed.append(path)
    return changed


# ------------------------------------------------------------------------------------------------
# The __init__ files.


def public_names(root: Path, core: Path, package: str) -> dict[str, str]:
    """``name -> module`` for every name that code outside ``core.<package>`` imports from one of
    its modules (a name found in two modules is left out: import it from its module)."""
    prefix = f"core.{package}."
    found: dict[str, set[str]] = {}
    for path in text_files(root):
        if path.suffix != ".py" or core / package in path.parents:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(prefix):
                module = node.module[len(prefix) :]
                if "." in module:
                    continue
                for alias in node.names:
                    if alias.name != "*" and not alias.name.startswith("_"):
                        found.setdefault(alias.name, set()).add(module)
    modules = {p.stem for p in (core / package).glob("*.py")}
    return {
        name: next(iter(homes))
        for name, homes in sorted(found.items())
        if len(homes) == 1 and name not in modules
    }


def init_text(package: str, names: dict[str, str]) -> str:
    """The ``__init__.py`` of ``core.<package>``."""
    modules = sorted(set(names.values()))
    fill = functools.partial(textwrap.fill, width=WIDTH, break_on_hyphens=False)
    lines = ['"""' + fill(DOCS[package], initial_indent="   ")[3:], ""]
    lines += [fill("Modules: " + ", ".join(f"``{m}``" for m in modules) + "."), ""]
    lines += [
        fill(
            f"Public names (``from core.{package} import X`` loads X's module on first use; "
            "importing the package alone loads nothing):"
        ),
        "",
    ]
    for module in modules:
        members = ", ".join(n for n, m in names.items() if m == module)
        lines.append(fill(f"- ``{module}``: {members}", subsequent_indent="  "))
    lines += [
        "",
        fill(GENERATED + "; the names are those imported from outside the layer."),
        '"""',
        "",
        "from core import lazy_exports",
        "",
        "_HOME = {",
        *(f'    "{n}": "{m}",' for n, m in names.items()),
        "}",
        "__all__ = sorted(_HOME)",
        "__getattr__ = lazy_exports(__name__, _HOME)",
        "",
    ]
    return "\n".join(lines)


TESTING_MAIN = '''"""``python -m core.testing train|evaluate ...``: the toy task's commands (see
:mod:`core.testing.toy`, which runs the same way as ``python -m core.testing.toy``)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("core.testing.toy", run_name="__main__", alter_sys=True)
'''

CORE_INIT_DOC = '''"""core: the training engine shared by every task package.

One subpackage a layer; a layer imports only from the layers before it
(``packages/core/tests/test_layers.py`` checks it, ``docs/architecture.md`` draws it)::

    errors -> config -> nn -> run -> parallel -> task -> engine -> sweep, report -> commands
    (testing may import anything; nothing in core imports commands or testing)

Read in this order: ``config.schema`` (config groups) -> ``task.base`` (what a task provides) ->
``engine.trainer`` (the Fabric loop) -> ``parallel.checkpoint`` / ``run`` (what a run writes) ->
``commands`` (the command-line contract).

Importing ``core`` itself is cheap; torch loads with the submodules that need it.
"""
'''

LAZY = '''

def lazy_exports(package: str, home: dict[str, str]):
    """``__getattr__`` for a layer's ``__init__``: ``home`` maps each public name to its module
    in ``package``, imported the first time the name is asked for."""
    import importlib

    def __getattr__(name: str):
        if name in home:
            return getattr(importlib.import_module(f"{package}.{home[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__

'''


def write_core_init(core: Path) -> None:
    """core/__init__.py: the layered reading order as docstring, ``__version__`` kept, and
    :func:`lazy_exports` for the layers' ``__init__`` files."""
    path = core / "__init__.py"
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text)
    body = tree.body[1:] if ast.get_docstring(tree) is not None else tree.body
    lines = text.splitlines()
    keep = [ln for n in body if not _is_lazy(n) for ln in lines[n.lineno - 1 : n.end_lineno]]
    keep = [ln for ln in keep if not ln.startswith('if __name__ == "__main__"')]
    path.write_text(CORE_INIT_DOC + "\n" + "\n".join(keep) + "\n" + LAZY, encoding="utf-8")


def _is_lazy(node: ast.stmt) -> bool:
    """The parts of core/__init__.py this script writes itself (kept out of the copy)."""
    if isinstance(node, ast.FunctionDef) and node.name == "lazy_exports":
        return True
    return isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)


def ours(path: Path) -> bool:
    """Whether ``path`` is absent or was written by this script (an ``__init__.py`` or
    ``__main__.py`` that someone wrote by hand is never overwritten)."""
    if not path.is_file():
        return True
    text = path.read_text(encoding="utf-8")
    return GENERATED in text or text == TESTING_MAIN


def write_inits(root: Path, core: Path) -> list[Path]:
    """Each layer's __init__.py and testing/__main__.py; returns the files written."""
    written = []
    for package in sorted(layer_packages()):
        folder, path = core / package, core / package / "__init__.py"
        if not folder.is_dir():
            continue
        if not ours(path):
            print(f"kept {path.relative_to(root)}: not written by this script")
            continue
        path.write_text(init_text(package, public_names(root, core, package)), encoding="utf-8")
        written.append(path)
    main = core / "testing" / "__main__.py"
    if (core / "testing" / "toy.py").is_file() and ours(main):
        main.write_text(TESTING_MAIN, encoding="utf-8")
        written.append(main)
    return written


# ------------------------------------------------------------------------------------------------


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True)


def ruff(root: Path, files: list[Path]) -> None:
    """Sort the imports the new names moved and format; then report what is still flagged."""
    py = [str(f) for f in files if f.suffix == ".py" and f.is_file()]
    if not py:
        return
    exe = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    subprocess.run([exe, "check", "--select", "I", "--fix", "--quiet", *py], cwd=root)
    subprocess.run([exe, "format", "--quiet", *py], cwd=root, check=True)
    subprocess.run([exe, "check", "--quiet", *py], cwd=root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only list the moves")
    args = parser.parse_args(argv)
    root = repo_root()
    core = core_dir(root)
    moves = inventory(core)
    for _old, source, target in moves:
        print(f"{source.relative_to(root)} -> {target.relative_to(root)}")
    if args.check:
        return 0
    active = active_moves(core)
    for _, source, _ in moves:
        text = source.read_text(encoding="utf-8")
        source.write_text(absolute_imports(text), encoding="utf-8")
    for _, source, target in moves:
        target.parent.mkdir(parents=True, exist_ok=True)
        tracked = subprocess.run(
            ["git", "ls-files", "--error-unmatch", str(source)], cwd=root, capture_output=True
        )
        if tracked.returncode == 0:
            git(root, "mv", str(source), str(target))
        else:  # a module not committed yet moves all the same
            source.rename(target)
    changed = rewrite_tree(root, active)
    write_core_init(core)
    written = write_inits(root, core)
    git(root, "add", *(str(p) for p in [*written, core / "__init__.py"]))
    ruff(root, [*changed, *written, core / "__init__.py"])
    print(f"{len(moves)} modules moved, {len(changed)} files rewritten, {len(written)} written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
