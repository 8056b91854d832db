"""``manifest.json``: everything needed to know how a run was made and to make it again.

Recorded: seed; Python, torch, CUDA / cuDNN and every installed distribution's version; the git
commit and whether the tree was dirty; the sha256 of ``uv.lock``; the sha256 of every data file
the task read; the metric implementation and version; the command line with secrets redacted;
host; SLURM variables; GPU names.

Secrets never reach the manifest: values of well-known secret variables (``HF_TOKEN``,
``WANDB_API_KEY``, ...) and values of ``*token*`` / ``*key*`` / ``*secret*`` / ``*password*``
arguments are replaced by ``***``.

Self-check: ``python -m core.run.manifest``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import re
import socket
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

SECRET_ENV_VARS = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HUGGINGFACE_TOKEN",
    "WANDB_API_KEY",
    "WANDB_KEY",
    "OPENAI_API_KEY",
    "AWS_SECRET_ACCESS_KEY",
)
_SECRET_WORD = re.compile(
    r"(token|secret|password|passwd|api[_-]?key|(^|[_.-])key$)", re.IGNORECASE
)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


_DATA_HASHES: dict[tuple[str, int, int, int], str] = {}


def data_file_sha256(path: Path) -> str | None:
    """:func:`sha256_file` of a data file, remembered while its size and modification time stay
    the same (a run hashes its data for ``manifest.json``, again for each checkpoint and at
    resume; large data files are read once). None when the file does not exist."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    key = (str(Path(path).absolute()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _DATA_HASHES:
        _DATA_HASHES[key] = sha256_file(Path(path))
    return _DATA_HASHES[key]


def secret_values(env: dict[str, str] | None = None) -> list[str]:
    """Values of secret environment variables (non-empty, at least 4 characters)."""
    env = dict(os.environ if env is None else env)
    names = set(SECRET_ENV_VARS) | {k for k in env if _SECRET_WORD.search(k)}
    return [env[n] for n in names if len(env.get(n, "")) >= 4]


def redact(text: str, env: dict[str, str] | None = None) -> str:
    """Replace every occurrence of a secret environment value in ``text`` by ``***``."""
    for value in sorted(secret_values(env), key=len, reverse=True):
        text = text.replace(value, "***")
    return text


def redact_argv(argv: Sequence[str], env: dict[str, str] | None = None) -> list[str]:
    """A command line with secrets replaced by ``***``.

    Handles ``--hf-token X``, ``--hf-token=X``, ``logger.wandb_key=X`` and any literal value of a
    secret environment variable.

    Args:
        argv: the command line, program first.
        env: environment to take secret values from (default ``os.environ``).

    Returns:
        A new list of the same length.
    """
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append("***")
            hide_next = False
            continue
        key, sep, _ = arg.partition("=")
        if sep and _SECRET_WORD.search(key.lstrip("-").rsplit(".", 1)[-1]):
            out.append(f"{key}=***")
            continue
        if arg.startswith("-") and not sep and _SECRET_WORD.search(arg.lstrip("-")):
            hide_next = True
        out.append(redact(arg, env))
    return out


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(start: Path | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the git checkout holding ``start`` (default: the current folder).

    Returns:
        ``{"commit": sha or None, "dirty": bool or None, "root": path or None}``.
    """
    for where in [Path(start or Path.cwd()), Path(__file__).resolve().parent]:
        root = _git(["rev-parse", "--show-toplevel"], where)
        if root:
            commit = _git(["rev-parse", "HEAD"], Path(root))
            status = _git(["status", "--porcelain", "--untracked-files=no"], Path(root))
            return {
                "commit": commit,
                "dirty": bool(status) if status is not None else None,
                "root": root,
            }
    return {"commit": None, "dirty": None, "root": None}


def find_lockfile(start: Path | None = None) -> Path | None:
    """The nearest ``uv.lock`` in ``start`` or a parent folder (then next to this package's
    source)."""
    for where in [Path(start or Path.cwd()).resolve(), Path(__file__).resolve().parent]:
        for folder in [where, *where.parents]:
            candidate = folder / "uv.lock"
            if candidate.is_file():
                return candidate
    return None


def installed_distributions() -> dict[str, str]:
    """``{distribution name: version}`` of everything importable in this environment, sorted."""
    versions: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata.get("Name")
        if name:
            versions[name] = dist.version
    return dict(sorted(versions.items(), key=lambda kv: kv[0].lower()))


def gpu_names() -> list[str]:
    """Names of the visible CUDA devices (empty without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def build_manifest(
    *,
    seed: int,
    data_files: Iterable[Path] = (),
    metrics: dict[str, Any] | None = None,
    argv: Sequence[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Collect the reproducibility record of a run.

    Args:
        seed: the run's seed.
        data_files: every data file the task read (hashed here).
        metrics: metric implementation and version, e.g. ``{"rouge": {"package": "rouge-score",
        ...}}``.
        argv: the command line (default ``sys.argv``); secrets are redacted.
        extra: more task-specific entries.

    Returns:
        A JSON-serialisable mapping.
    """
    import torch

    lock = find_lockfile()
    files = {}
    for path in data_files:
        path = Path(path)
        files[str(path)] = (
            {"sha256": data_file_sha256(path), "bytes": path.stat().st_size}
            if path.is_file()
            else None
        )
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "seed": seed,
        "command": redact_argv(list(sys.argv if argv is None else argv)),
        "cwd": str(Path.cwd()),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "gpus": gpu_names(),
        "git": git_state(),
        "uv_lock": {"path": str(lock), "sha256": sha256_file(lock)} if lock else None,
        "data_files": files,
        "metrics": metrics or {},
        "slurm": {k: redact(v) for k, v in sorted(os.environ.items()) if k.startswith("SLURM_")},
        "distributions": installed_distributions(),
        **(extra or {}),
    }


if __name__ == "__main__":  # self-check: python -m core.run.manifest
    import json

    env = {"HF_TOKEN": "hf_abcdef123456"}
    argv = [
        "train",
        "--hf-token",
        "hf_abcdef123456",
        "logger.api_key=zzz",
        "x=hf_abcdef123456",
        "trainer.max_steps=3",
    ]
    red = redact_argv(argv, env)
    assert red == [
        "train",
        "--hf-token",
        "***",
        "logger.api_key=***",
        "x=***",
        "trainer.max_steps=3",
    ], red
    manifest = build_manifest(seed=1, argv=["python", "-m", "core.run.manifest"])
    print(json.dumps({k: manifest[k] for k in ("python", "torch", "git", "uv_lock")}, indent=1))
    print(f"{len(manifest['distributions'])} distributions recorded")
    print("core.run.manifest: ok")
