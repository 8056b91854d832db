"""Every module's ``python -m`` self-check runs and passes, and none writes into the repository.

The checks are found, not listed: every ``packages/*/src/**.py`` with a top-level
``if __name__ == "__main__":``, every package ``__main__.py``, and every maintainer script
``packages/*/tools/*.py`` with such a guard (run by its path: ``python packages/x/tools/y.py``;
its module name in the results is ``x.tools.y``). What to run is read from the
module itself, from a comment on its guard line (in a ``__main__.py``: anywhere in the file)::

    if __name__ == "__main__":  # self-check: python -m core.parallel.fsdp (own process: Fabric ...)

- the words after the module name, up to a remark in parentheses, are the check's arguments
  (``python packages/lora_llm/tools/tiny_tokenizer.py --check``); without the comment a module runs
  with no arguments;
- ``own process`` in the remark runs the check in a process of its own, for a check that cannot
  share one: it starts ranks (``core.parallel.fsdp``: Fabric re-runs ``python -m
  core.parallel.fsdp`` as rank 1 and
  the process group stays set up for the rest of the process).

All the other checks run one after another in ONE subprocess (``self_checks_driver.py``): a
process per check would import torch, Lightning and transformers ~50 times (15-20 s each on the
2-core machine, ~15 minutes); in one process the imports are paid once. Signal handlers, cwd,
argv, environment, warning filters and logging are put back between checks (measured: all of
them pass there, ``core.engine.signals`` included). The own-process checks run beside the driver
(``core.parallel.fsdp``: two interpreters), so the wall time is about the longer of the two: this
test
took 85 s on the 2-core machine at a load of 2-6 (8 minutes at a load of 13). Each check runs
in an empty temporary working folder, offline.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("self_checks_driver.py")
GUARD = re.compile(r"""^if __name__ == ["']__main__["']:(.*)$""", re.MULTILINE)
COMMENT = re.compile(r"#\s*self-check:\s*python (?:-m )?([\w./]+)(.*)$", re.MULTILINE)


@dataclass(frozen=True)
class SelfCheck:
    """One module's self-check: ``python -m module *args``."""

    module: str
    """Dotted module name (a package for a ``__main__.py``)."""
    args: tuple[str, ...]
    """Its command-line arguments."""
    own_process: bool
    """Whether it must run in a process of its own."""
    path: str | None = None
    """A maintainer script's path relative to the repository (run by path, not by ``-m``)."""


def _named(words: str) -> str:
    """The module name a comment's ``python -m a.b`` or ``python packages/x/tools/y.py`` names."""
    if not words.endswith(".py"):
        return words
    parts = Path(words).with_suffix("").parts
    return ".".join(parts[1:] if parts[0] == "packages" else parts)


def _from_comment(module: str, text: str, path: str | None = None) -> SelfCheck:
    """The check of ``module`` as its ``# self-check: python -m ...`` comment in ``text`` (a guard
    line or a ``__main__.py``) states it; no arguments when there is no such comment."""
    for match in COMMENT.finditer(text):
        if _named(match.group(1)) == module:
            words, remark = match.group(2).strip(), ""
            if "(" in words:
                words, remark = words.split("(", 1)
            return SelfCheck(module, tuple(words.split()), "own process" in remark, path)
    return SelfCheck(module, (), False, path)


def _main_sources(repo: Path) -> list[tuple[str, str]]:
    """``(module, text)`` of every module of ``repo/packages/*/src`` with a ``__main__`` guard
    (text: the guard line) or a ``__main__.py`` (text: the file; module: its package)."""
    found = []
    for src in sorted(repo.glob("packages/*/src")):
        for path in sorted(src.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = path.relative_to(src).with_suffix("").parts
            text = path.read_text(encoding="utf-8")
            if parts[-1] == "__main__":
                found.append((".".join(parts[:-1]), text))
            elif parts[-1] != "__init__" and (guard := GUARD.search(text)):
                found.append((".".join(parts), guard.group(0)))
    return found


def _tool_sources(repo: Path) -> list[tuple[str, str, str]]:
    """``(module, guard line, path)`` of every ``packages/<pkg>/tools/*.py`` with a guard;
    module: ``<pkg>.tools.<name>``."""
    found = []
    for path in sorted(repo.glob("packages/*/tools/*.py")):
        if guard := GUARD.search(path.read_text(encoding="utf-8")):
            relative = path.relative_to(repo)
            found.append((_named(str(relative)), guard.group(0), relative.as_posix()))
    return found


def discover(repo: Path = REPO) -> list[SelfCheck]:
    """Every module of ``repo/packages/*/src`` with a ``__main__`` guard or a ``__main__.py``,
    then every maintainer script of ``repo/packages/*/tools`` with a guard."""
    modules = [_from_comment(module, text) for module, text in _main_sources(repo)]
    return modules + [_from_comment(m, text, path) for m, text, path in _tool_sources(repo)]


CHECKS = discover()
SHARED = [c for c in CHECKS if not c.own_process]
OWN = [c for c in CHECKS if c.own_process]


def _env() -> dict[str, str]:
    """The children's environment: offline, without SLURM or launch variables, data caches in
    the test's temporary folder (see :func:`core.testing.toy.child_env`)."""
    from core.testing.toy import child_env

    return child_env()


def _failure(check: SelfCheck, result: dict[str, Any]) -> str:
    """What a failing check printed, under the command that runs it alone."""
    command = " ".join(["python", check.path or f"-m {check.module}", *check.args])
    return f"`{command}` failed:\n{result['output'][-6000:]}"


def _load_driver() -> Any:
    """``self_checks_driver.py`` as a module (for its repository snapshots)."""
    spec = importlib.util.spec_from_file_location("self_checks_driver", DRIVER)
    driver = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(driver)
    return driver


def _start_alone(check: SelfCheck, work: Path) -> tuple[subprocess.Popen, Path]:
    """Start ``python -m module *args`` in a folder of its own; its output goes to a file."""
    folder = work / f"alone-{check.module}"
    folder.mkdir()
    log = folder.with_suffix(".log")
    with log.open("wb") as sink:
        child = subprocess.Popen(
            [sys.executable, *([str(REPO / check.path)] if check.path else ["-m", check.module])]
            + list(check.args),
            cwd=folder,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=_env() | {"QWEN_VL_CACHE": str(folder / "qwen-vl-cache")},
        )
    return child, log


def _run_shared(work: Path) -> dict[str, dict[str, Any]]:
    """Run the :data:`SHARED` checks in one driver process; a check the driver did not finish
    gets the driver's own output."""
    results = work / "results.jsonl"
    checks = [{"module": c.module, "args": list(c.args), "path": c.path} for c in SHARED]
    done = subprocess.run(
        [sys.executable, str(DRIVER), str(results), str(work), str(REPO)],
        input=json.dumps(checks),
        capture_output=True,
        text=True,
        env=_env() | {"QWEN_VL_CACHE": str(work / "qwen-vl-cache")},
        timeout=800,
    )
    out: dict[str, dict[str, Any]] = {}
    lines = results.read_text(encoding="utf-8").splitlines() if results.exists() else []
    for record in map(json.loads, lines):
        out[record["module"]] = record
    for module, record in out.items():
        if record.get("started"):  # the driver died inside this check
            died = f"driver exit code {done.returncode}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
            out[module] = {"ok": False, "output": died, "changed": [], "seconds": None}
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """``{module: {"ok", "seconds", "output", "changed"}}`` of every check.

    The :data:`OWN` checks run at the same time as the driver (two cores: the wall time is about
    the longer of the two, not their sum); their ``changed`` is what changed in the repository
    while they ran, so a file the driver's checks wrote shows there too (and names itself).
    """
    work = tmp_path_factory.mktemp("self-checks")
    driver = _load_driver()
    before, start = driver.snapshot(REPO), time.perf_counter()
    alone = {c.module: _start_alone(c, work) for c in OWN}
    out = _run_shared(work)
    for module, (child, log) in alone.items():
        try:
            code = child.wait(timeout=max(1.0, 800 - (time.perf_counter() - start)))
        except subprocess.TimeoutExpired:
            child.kill()
            code = f"killed after {time.perf_counter() - start:.0f} s"
        out[module] = {
            "ok": code == 0,
            "seconds": round(time.perf_counter() - start, 2),
            "output": log.read_text(encoding="utf-8", errors="replace") + f"\nexit code {code}",
            "changed": driver.changed_files(before, driver.snapshot(REPO)),
        }
    timing = ", ".join(f"{m} {r['seconds']}" for m, r in out.items() if r["seconds"] is not None)
    print(f"self-check seconds: {timing}")
    return out


@pytest.mark.slow  # subprocesses; the task modules' self-checks train a few steps
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.module)
def test_self_check(check: SelfCheck, results: dict[str, dict[str, Any]]) -> None:
    """``python -m module`` passes and leaves the repository as it was."""
    assert check.module in results, f"the driver never reached {check.module}"
    result = results[check.module]
    assert result["ok"], _failure(check, result)
    assert not result["changed"], f"python -m {check.module} wrote in the repo: {result['changed']}"


def test_every_self_check_comment_names_its_own_module() -> None:
    """A comment naming another module (left behind by a move) would be ignored, and the check
    would run without its arguments or outside its own process: refused here."""
    stale = [
        f"{module}: {match.group(0)}"
        for module, text in _main_sources(REPO) + [t[:2] for t in _tool_sources(REPO)]
        for match in COMMENT.finditer(text)
        if _named(match.group(1)) != module
    ]
    assert not stale, "self-check comments that name another module:\n" + "\n".join(stale)


def test_discovery_reads_the_comments(tmp_path: Path) -> None:
    """Arguments and ``own process`` come from the comment; a module without one runs bare; an
    ``__init__`` guard is no check (``python -m pkg`` runs ``pkg/__main__.py``)."""
    src = tmp_path / "packages" / "demo" / "src" / "demo"
    src.mkdir(parents=True)
    (src / "__init__.py").write_text('if __name__ == "__main__":\n    pass\n')
    (src / "plain.py").write_text('x = 1\n\nif __name__ == "__main__":\n    print(x)\n')
    (src / "tool.py").write_text(
        'if __name__ == "__main__":  # self-check: python -m demo.tool --check -n 2\n    pass\n'
    )
    (src / "ranks.py").write_text(
        "if __name__ == '__main__':  # self-check: python -m demo.ranks (own process: ranks)\n"
    )
    (src / "lib.py").write_text('"""No guard here: if __name__ == "__main__": in a docstring."""\n')
    tools = tmp_path / "packages" / "demo" / "tools"
    tools.mkdir()
    (tools / "make.py").write_text(
        'if __name__ == "__main__":  # self-check: python packages/demo/tools/make.py --check\n'
    )
    (src / "sub").mkdir()
    (src / "sub" / "__main__.py").write_text('"""Demo."""\n# self-check: python -m demo.sub x\n')
    assert discover(tmp_path) == [
        SelfCheck("demo.plain", (), False),
        SelfCheck("demo.ranks", (), True),
        SelfCheck("demo.sub", ("x",), False),
        SelfCheck("demo.tool", ("--check", "-n", "2"), False),
        SelfCheck("demo.tools.make", ("--check",), False, "packages/demo/tools/make.py"),
    ]
    assert len(CHECKS) >= 40, CHECKS  # the repository's own: ~50
