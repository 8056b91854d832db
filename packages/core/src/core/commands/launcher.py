"""The shared command names ``train``, ``evaluate``, ``infer`` and ``sweep``, dispatched to a task.

Why this exists: in a uv workspace all members share one ``.venv/bin``. If every task package
declared its own ``train`` script, the last one installed would own ``.venv/bin/train`` and
``uv run --package summarization train`` could start the LoRA trainer; uninstalling one member
(``uv sync --package X`` is exact) would even delete the others' script. So only core declares
these names, and this module picks the task, in this order:

1. ``--task NAME`` as the first arguments, or the ``CORE_TASK`` environment variable;
2. the ``--package NAME`` of the ``uv run`` that started us (read from the parent processes'
   command lines), or the workspace member whose folder holds the current directory when
   ``uv run`` was given no ``--package`` (uv picks the project from the directory too);
3. the only installed task, when just one is installed (a task's own wheel outside the workspace).

Tasks register under the ``core.tasks`` entry-point group; the entry point names a module with
a ``COMMANDS`` mapping ``{"train": callable(argv) -> int, ...}``. The chosen task is exported in
``CORE_TASK`` so that processes the trainer spawns (DDP ranks) resolve it the same way.

``sweep`` is core's own command on top of the task's ``train`` (see :mod:`core.sweep`): it checks
every point with the task's ``train --print-config`` and runs each point as a ``train`` process.
``runs`` (:mod:`core.report`) needs no task.

Each task also has unambiguous scripts of its own (``summarization-train``, ...).
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from core.errors import fail

ENV_VAR = "CORE_TASK"


def installed_tasks() -> dict[str, Any]:
    """``{task name: entry point}`` for every installed task package."""
    return {ep.name: ep for ep in entry_points(group="core.tasks")}


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def _ancestor_cmdlines(max_depth: int = 6) -> list[list[str]]:
    """Command lines of the parent process, its parent, ... (nearest first)."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a dependency of core
        return []
    lines: list[list[str]] = []
    try:
        proc = psutil.Process(os.getpid()).parent()
        while proc is not None and len(lines) < max_depth:
            try:
                lines.append(proc.cmdline())
            except (psutil.AccessDenied, psutil.ZombieProcess):
                lines.append([])
            proc = proc.parent()
    except psutil.Error:
        pass
    return lines


def package_from_uv(cmdline: Sequence[str]) -> str | None:
    """The ``--package`` value of a ``uv run`` command line, or None.

    >>> package_from_uv(["uv", "run", "--package", "summarization", "train"])
    'summarization'
    >>> package_from_uv(["/usr/bin/uv", "run", "--frozen", "--package=lora_llm", "train"])
    'lora_llm'
    """
    if not cmdline or Path(cmdline[0]).name not in ("uv", "uv.exe") or "run" not in cmdline:
        return None
    args = list(cmdline[cmdline.index("run") + 1 :])
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg == "--package" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--package="):
            return arg.split("=", 1)[1]
    return None


def _project_dir_from_uv(cmdline: Sequence[str]) -> Path | None:
    """``--directory`` / ``--project`` of a ``uv run`` command line."""
    args = list(cmdline)
    for flag in ("--project", "--directory"):
        for i, arg in enumerate(args):
            if arg == flag and i + 1 < len(args):
                return Path(args[i + 1])
            if arg.startswith(flag + "="):
                return Path(arg.split("=", 1)[1])
    return None


def member_from_directory(start: Path, tasks: Sequence[str]) -> str | None:
    """The task whose package folder (a ``pyproject.toml`` naming it) holds ``start``.

    The search stops at the workspace root (a ``pyproject.toml`` with ``[tool.uv.workspace]``).
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    for folder in [start.resolve(), *start.resolve().parents]:
        pyproject = folder / "pyproject.toml"
        if not pyproject.is_file():
            continue
        try:
            data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, OSError, UnicodeDecodeError):
            continue
        name = _normalise(data.get("project", {}).get("name", ""))
        if name in tasks:
            return name
        if "workspace" in data.get("tool", {}).get("uv", {}):
            return None
    return None


def resolve_task(
    argv: list[str], tasks: dict[str, Any], command: str
) -> tuple[str | None, list[str], str]:
    """Pick the task for a shared command.

    Args:
        argv: arguments after the program name (``--task NAME`` is removed from it).
        tasks: installed tasks.
        command: the shared command (for messages).

    Returns:
        ``(task name or None, remaining argv, how it was chosen)``.
    """
    names = {_normalise(n): n for n in tasks}
    if len(argv) >= 2 and argv[0] == "--task":
        return _normalise(argv[1]), argv[2:], "--task"
    if argv and argv[0].startswith("--task="):
        return _normalise(argv[0].split("=", 1)[1]), argv[1:], "--task"
    if os.environ.get(ENV_VAR):
        return _normalise(os.environ[ENV_VAR]), argv, ENV_VAR
    for cmdline in _ancestor_cmdlines():
        package = package_from_uv(cmdline)
        if package:
            return _normalise(package), argv, "uv run --package"
        if cmdline and Path(cmdline[0]).name in ("uv", "uv.exe") and "run" in cmdline:
            base = _project_dir_from_uv(cmdline) or Path.cwd()
            member = member_from_directory(base, list(names))
            if member:
                return member, argv, "uv run in a member folder"
            break
    member = member_from_directory(Path.cwd(), list(names))
    if member:
        return member, argv, "current folder"
    if len(names) == 1:
        return next(iter(names)), argv, "only installed task"
    return None, argv, ""


def dispatch(command: str, argv: Sequence[str] | None = None) -> int:
    """Run shared ``command`` of the resolved task.

    Returns:
        The command's exit code; 2 when the task cannot be determined or lacks the command.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    tasks = installed_tasks()
    name, args, how = resolve_task(args, tasks, command)
    known = sorted(_normalise(n) for n in tasks)
    if name is None:
        return fail(
            f"'{command}' is shared by several task packages "
            f"({', '.join(known) or 'none installed'}) and "
            f"none was named. Run it as 'uv run --package <task> {command} ...', or '{command} "
            "--task <task> ...', "
            f"or set {ENV_VAR}=<task>."
        )
    if name not in known:
        return fail(
            f"Task '{name}' (from {how}) is not an installed task package. Installed: "
            f"{', '.join(known) or 'none'}. "
            "Sync it first: uv sync --package <task>."
        )
    entry = next(ep for n, ep in tasks.items() if _normalise(n) == name)
    module = importlib.import_module(entry.value)
    commands = getattr(module, "COMMANDS", {})
    if command == "sweep" and "sweep" not in commands and "train" in commands:
        os.environ[ENV_VAR] = name  # the points' train processes resolve the same task
        return _sweep(args, name, entry.value, commands["train"])
    if command not in commands:
        providers = [
            t
            for t, ep in tasks.items()
            if command in getattr(importlib.import_module(ep.value), "COMMANDS", {})
        ]
        return fail(
            f"The {name} package has no '{command}' command (its commands: "
            f"{', '.join(sorted(commands))}). "
            f"'{command}' belongs to: {', '.join(providers) or 'no installed task'}."
        )
    os.environ[ENV_VAR] = name  # DDP ranks spawned by the trainer re-run this script
    return int(commands[command](args) or 0)


def _sweep(argv: list[str], task: str, module: str, train_fn: Any) -> int:
    """Core's ``sweep`` for ``task``: points checked with ``train_fn``, run by the ``train`` script.

    Args:
        argv: the sweep's arguments.
        task: the resolved task name.
        module: the task's ``core.tasks`` module (its ``slurm/train.sbatch`` is found from it).
        train_fn: the task's ``train`` command.

    Returns:
        The sweep's exit code.
    """
    from core.sweep import sweep_command

    # The `train` script of this environment (next to its Python), so a point runs exactly
    # as `uv run --package <task> train` would, with its own DDP launch and signal handling.
    script = shutil.which("train", path=str(Path(sys.executable).parent)) or shutil.which("train")
    if script is None:
        return fail(
            "sweep cannot find the 'train' command of this environment next to "
            f"{sys.executable}; sync the workspace (uv sync --package {task}) and try again."
        )
    return sweep_command(
        argv, task=task, train=train_fn, train_cmd=[script, "--task", task], task_module=module
    )


def train() -> int:
    """``train``: the task's trainer (see the module docstring for how the task is chosen)."""
    return dispatch("train")


def evaluate() -> int:
    """``evaluate``: the task's evaluation command."""
    return dispatch("evaluate")


def infer() -> int:
    """``infer``: the task's inference command."""
    return dispatch("infer")


def sweep() -> int:
    """``sweep``: a grid of the task's ``train`` runs, locally or as a SLURM job array."""
    return dispatch("sweep")


if __name__ == "__main__":  # self-check: python -m core.commands.launcher
    import doctest

    doctest.testmod(verbose=False)
    print("installed tasks:", sorted(installed_tasks()))
    print("uv cmdline parse:", package_from_uv(["uv", "run", "--package", "qwen_vl", "train"]))
    print("core.commands.launcher: ok")
