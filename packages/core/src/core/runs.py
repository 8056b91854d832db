"""Run folders: ``runs/NNN_YYYYMMDD_HHMMSS[_name]/``, one per training run.

The experiment number ``NNN`` is the next free number under the runs root. Two jobs that start
at the same moment must not get the same number, so a number is *claimed* first by creating
``<root>/.claims/NNN`` with ``os.mkdir`` (atomic on local and network file systems); the loser of
a race simply tries the next number.

Under SLURM a requeued job keeps its job id; ``<root>/.slurm/<job id>`` records which run folder
the job created, so the requeued job lands in the same folder and resumes from it.

Self-check: ``python -m core.runs``.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from core.errors import ConfigError

RUN_DIR_PATTERN = re.compile(r"^(\d{3,})_(\d{8})_(\d{6})(?:_(.+))?$")


@dataclass(frozen=True)
class RunDir:
    """A run folder and how it was chosen.

    Attributes:
        path: the run folder.
        created: True when this call made the folder (a fresh run).
        reason: why this folder (``new``, ``run.dir``, ``latest``, ``slurm requeue``).
    """

    path: Path
    created: bool
    reason: str

    @property
    def checkpoints(self) -> Path:
        """``<run>/checkpoints``."""
        return self.path / "checkpoints"

    @property
    def final(self) -> Path:
        """``<run>/final``: the trained model in ``save_pretrained`` form."""
        return self.path / "final"


def slurm_job_key(env: dict[str, str] | None = None) -> str | None:
    """The id that stays the same when SLURM requeues a job (array jobs: ``<array id>_<task
    id>``)."""
    env = dict(os.environ if env is None else env)
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def experiment_numbers(root: Path) -> set[int]:
    """Numbers already used under ``root``: by run folders and by claims."""
    used: set[int] = set()
    if not root.is_dir():
        return used
    for entry in root.iterdir():
        match = RUN_DIR_PATTERN.match(entry.name)
        if match and entry.is_dir():
            used.add(int(match.group(1)))
    claims = root / ".claims"
    if claims.is_dir():
        used.update(int(p.name) for p in claims.iterdir() if p.name.isdigit())
    return used


def claim_number(root: Path) -> int:
    """Atomically claim the next free experiment number under ``root``.

    Returns:
        The claimed number (``<root>/.claims/<NNN>`` now exists).
    """
    claims = root / ".claims"
    claims.mkdir(parents=True, exist_ok=True)
    number = max(experiment_numbers(root), default=0) + 1
    while True:
        try:
            os.mkdir(claims / f"{number:03d}")
            return number
        except FileExistsError:  # another job took it a moment ago
            number += 1


def new_run_dir(root: Path, name: str = "", now: datetime | None = None) -> Path:
    """Create ``<root>/NNN_YYYYMMDD_HHMMSS[_name]`` with the next free number.

    Args:
        root: the runs root (created if missing).
        name: optional suffix.
        now: timestamp to use (default: now, local time).

    Returns:
        The new, empty run folder.
    """
    root = Path(root)
    number = claim_number(root)
    stamp = (now or datetime.now()).strftime("%Y%m%d_%H%M%S")
    path = root / (f"{number:03d}_{stamp}" + (f"_{name}" if name else ""))
    path.mkdir(parents=True, exist_ok=False)
    return path


def run_task(path: Path) -> str | None:
    """The task that made a run folder (from its ``manifest.json``), or None when it has none."""
    try:
        return json.loads((Path(path) / "manifest.json").read_text(encoding="utf-8")).get("task")
    except (OSError, ValueError, AttributeError):
        return None


def is_run_folder(path: Path) -> bool:
    """Whether ``path`` is a run folder written by the trainer (its record files are there)."""
    return (Path(path) / "manifest.json").is_file() and (Path(path) / "config.yaml").is_file()


def latest_run_dir(root: Path, name: str = "", task: str | None = None) -> Path | None:
    """The run folder with the highest number under ``root`` (with suffix ``name`` and made by
    ``task``, when given)."""
    best: tuple[int, Path] | None = None
    if not Path(root).is_dir():
        return None
    for entry in Path(root).iterdir():
        match = RUN_DIR_PATTERN.match(entry.name)
        if not match or not entry.is_dir():
            continue
        if name and match.group(4) != name:
            continue
        if task is not None and run_task(entry) != task:
            continue
        number = int(match.group(1))
        if best is None or number > best[0]:
            best = (number, entry)
    return best[1] if best else None


def check_run_dir(path: Path, task: str | None) -> None:
    """Accept ``run.dir`` only if it is new, an empty folder, or a run folder of ``task``.

    Raises:
        ConfigError: a file; a folder of other files (the user's); a run of another task.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f"Config key 'run.dir' = '{path}' is a file; a run folder is expected (a new or empty "
            "folder, or an earlier run)."
        )
    if not path.is_dir() or not any(path.iterdir()):
        return
    if not is_run_folder(path):
        entries = sorted(p.name for p in path.iterdir())
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ConfigError(
            f"Config key 'run.dir' = '{path}' holds files that are not a training run ({shown}); "
            "training there could "
            "replace them. Give a new or empty folder, or an earlier run folder (with config.yaml "
            "and manifest.json)."
        )
    owner = run_task(path)
    if task is not None and owner != task:
        raise ConfigError(
            f"Config key 'run.dir' = '{path}' is a run of the {owner} task, not of {task}; "
            "continuing it here would "
            f"change its record. Use '--package {owner}' to continue it, or give another run.dir."
        )


def _slurm_record(root: Path, job: str) -> Path:
    return Path(root) / ".slurm" / f"{job}.json"


def resolve_run_dir(
    root: Path,
    name: str = "",
    run_dir: Path | None = None,
    env: dict[str, str] | None = None,
    task: str | None = None,
) -> RunDir:
    """Choose (and if needed create) the run folder of this process's run.

    Order: an explicit ``run.dir`` (``latest`` = this task's newest under the root); else the
    folder that this SLURM job id made before being requeued; else a new numbered folder.

    Args:
        root: the runs root.
        name: optional run-name suffix.
        run_dir: ``run.dir`` from the config.
        env: environment to read SLURM variables from (default ``os.environ``).
        task: the task's name; an existing ``run.dir`` must be a run of it.

    Returns:
        The chosen :class:`RunDir`.

    Raises:
        ConfigError: ``run.dir=latest`` with no run folder of the task under the root; a
            ``run.dir`` that is a file, a folder of other files, or another task's run.
    """
    root = Path(root)
    if run_dir is not None:
        if str(run_dir) == "latest":
            found = latest_run_dir(root, name, task)
            if found is None:
                raise ConfigError(
                    "'run.dir=latest' found no run "
                    f"folder{f' of the {task} task' if task else ''} under '{root}'"
                    + (f" named '*_{name}'" if name else "")
                    + "; start a new run without run.dir, or give run.dir=PATH."
                )
            return RunDir(found, created=False, reason="latest")
        path = Path(run_dir)
        check_run_dir(path, task)
        existed = path.is_dir()
        path.mkdir(parents=True, exist_ok=True)
        return RunDir(path, created=not existed, reason="run.dir")
    job = slurm_job_key(env)
    if job is not None:
        record = _slurm_record(root, job)
        if record.is_file():
            path = Path(json.loads(record.read_text(encoding="utf-8"))["run_dir"])
            if path.is_dir() and (task is None or run_task(path) in (task, None)):
                return RunDir(path, created=False, reason="slurm requeue")
    path = new_run_dir(root, name)
    if job is not None:
        record = _slurm_record(root, job)
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(
            json.dumps({"run_dir": str(path.resolve()), "job": job, "time": time.time()}),
            encoding="utf-8",
        )
        os.replace(tmp, record)
    return RunDir(path, created=True, reason="new")


if __name__ == "__main__":  # self-check: python -m core.runs
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    with tempfile.TemporaryDirectory() as tmp:
        with ThreadPoolExecutor(8) as pool:
            paths = list(pool.map(lambda i: new_run_dir(Path(tmp), f"job{i}"), range(16)))
        numbers = sorted(int(p.name.split("_")[0]) for p in paths)
        assert numbers == list(range(1, 17)), numbers
        env = {"SLURM_JOB_ID": "4242"}
        first = resolve_run_dir(Path(tmp), env=env)
        again = resolve_run_dir(Path(tmp), env=env)
        assert first.created and not again.created and first.path == again.path
        print("16 concurrent runs got numbers 1..16; requeued job 4242 ->", again.path.name)
    print("core.runs: ok")
