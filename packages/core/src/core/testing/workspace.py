"""A copy of a uv workspace checkout to run commands in, so tests that change the workspace
(``new-task`` adds a package, edits the root ``pyproject.toml`` and ``uv.lock``) never touch the
checkout under test.

The copy holds what git tracks and the untracked files it does not ignore (the working tree as a
developer sees it, uncommitted edits included), and its own ``.venv`` from ``uv sync --frozen``
(hard links from uv's cache: seconds).

Self-check: ``python -m core.testing.workspace`` (copies a small git repository without syncing).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

LAUNCH_PREFIXES = ("SLURM_", "VIRTUAL_ENV", "CORE_TASK", "MASTER_", "UV_PROJECT")
"""Environment variables of this process's own launch that must not leak into a command run in
the copy (a venv, a task, a rendezvous or a uv project of the checkout under test)."""


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without :data:`LAUNCH_PREFIXES`, offline, unbuffered, plus
    ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCH_PREFIXES)}
    return env | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"} | extra


def copy_workspace(repo: Path, target: Path, sync: bool = True) -> Path:
    """Copy ``repo``'s files (tracked, and untracked but not ignored) into ``target`` and, with
    ``sync``, give the copy its own environment (``uv sync --frozen --all-packages``).

    Returns:
        ``target``.
    """
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=repo,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        source, dest = repo / name.decode(), target / name.decode()
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the working tree
        dest.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            dest.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, dest)
    if sync:
        subprocess.run(
            ["uv", "sync", "--frozen", "--all-packages", "-q"],
            cwd=target,
            env=clean_env(),
            check=True,
            capture_output=True,
        )
    return target


if __name__ == "__main__":  # self-check: python -m core.testing.workspace
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        repo, copy = Path(tmp) / "repo", Path(tmp) / "copy"
        (repo / "pkg").mkdir(parents=True)
        subprocess.run(["git", "init", "-q", str(repo)], check=True)
        (repo / ".gitignore").write_text("runs/\n")
        (repo / "pkg" / "tracked.py").write_text("x = 1\n")
        subprocess.run(["git", "-C", str(repo), "add", "."], check=True)
        (repo / "pkg" / "new.py").write_text("y = 2\n")  # untracked, not ignored: copied
        (repo / "runs").mkdir()
        (repo / "runs" / "big.bin").write_bytes(b"\0" * 10)  # ignored: left behind
        copy_workspace(repo, copy, sync=False)
        found = sorted(str(p.relative_to(copy)) for p in copy.rglob("*") if p.is_file())
        assert found == [".gitignore", "pkg/new.py", "pkg/tracked.py"], found
        print("copied:", found)
    print("core.testing.workspace: ok")
