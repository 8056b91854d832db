"""Run folders: ``runs/NNN_YYYYMMDD_HHMMSS[_name]/``, one per training run.

The experiment number ``NNN`` is the next free number under the runs root. Two jobs that start
at the same moment must not get the same number, so a number is *claimed* first by creating
``<root>/.claims/NNN`` with ``os.mkdir`` (atomic on local and network file systems); the loser of
a race simply tries the next number.

Under SLURM a requeued job keeps its job id and gets a higher ``SLURM_RESTART_COUNT``;
``<root>/.slurm/<job id>.json`` records the run folders the job created, so the requeued job
lands in the same folders and resumes them. A second ``train`` in the same job *incarnation*
(several seeds in one sbatch script, an ``salloc`` shell) gets a new folder (:func:`slurm_claim`).

A run folder being trained holds ``<run>/run.lock`` (:class:`RunLock`: pid, host, start time,
SLURM job and restart count, refreshed by a heartbeat); a second live writer is refused before it
writes anything, a dead owner's lock is taken over with a warning (:func:`lock_state`).

Self-check: ``python -m core.run.folder``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from core.errors import ConfigError, UserError
from core.run.storage import storage_errors

log = logging.getLogger(__name__)

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


def slurm_restart_count(env: dict[str, str] | None = None) -> int:
    """``SLURM_RESTART_COUNT``: how often SLURM has requeued this job (0 when unset or not a
    number: the job's first incarnation)."""
    env = dict(os.environ if env is None else env)
    try:
        return int(env.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        return 0


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
    # A lock alone (a run that died between taking it and writing config.yaml) is no user file.
    if not path.is_dir() or not any(p.name != LOCK_NAME for p in path.iterdir()):
        return
    if not is_run_folder(path):
        entries = sorted(p.name for p in path.iterdir() if p.name != LOCK_NAME)
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


class _RecordMutex:
    """Exclusive access to one job's ``.slurm`` record among the processes of that job (parallel
    ``srun`` steps share the job id): a folder made with ``os.mkdir`` (atomic on local and network
    file systems), removed on exit; one older than ``stale`` seconds is left by a killed process
    and is broken."""

    def __init__(self, record: Path, stale: float = 60.0, wait: float = 30.0) -> None:
        self.path = record.with_name(record.name + ".mutex")
        self.stale, self.wait = stale, wait

    def __enter__(self) -> _RecordMutex:
        deadline = time.monotonic() + self.wait
        while True:
            try:
                os.mkdir(self.path)
                return self
            except FileExistsError:
                try:
                    if time.time() - self.path.stat().st_mtime > self.stale:
                        os.rmdir(self.path)
                        continue
                except OSError:
                    continue  # released meanwhile
                if time.monotonic() > deadline:
                    raise UserError(
                        f"The SLURM run record {self.path.parent} stayed locked ({self.path}) for "
                        f"{self.wait:.0f} s; if no other train of this job is running, remove "
                        "that folder and start again."
                    ) from None
                time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        try:
            os.rmdir(self.path)
        except OSError:
            pass


def _read_slurm_entries(record: Path) -> list[dict[str, Any]]:
    """The runs a job's record lists, oldest first. A record written before restart counts were
    kept (``{"run_dir": ...}``) is one run of any command made by incarnation 0."""
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as err:
        log.warning("Ignoring the unreadable SLURM run record %s (%s)", record, err)
        return []
    if isinstance(data, dict) and isinstance(data.get("runs"), list):
        return [e for e in data["runs"] if isinstance(e, dict) and "run_dir" in e]
    if isinstance(data, dict) and "run_dir" in data:
        return [{"run_dir": data["run_dir"], "command": None, "restart": 0, "claimed": 0}]
    return []


def slurm_claim(
    root: Path,
    job: str,
    restart: int,
    command: str | None,
    task: str | None,
    name: str = "",
) -> RunDir:
    """The run folder of this ``train`` inside SLURM job ``job`` (restart count ``restart``).

    Which earlier run a requeued job continues: one recorded by an *earlier incarnation* of the
    job (restart count below ``restart``) with the same command line, the oldest not yet claimed
    by this incarnation. Matching by command line, not by position, keeps a script that trains
    several runs in a row right when it skips or reorders some after the requeue (e.g. it skips
    finished seeds); two runs with the same command line are matched in order. A ``train`` in
    the same incarnation as the recorded runs is never a requeue: it gets a new folder. Without
    a restart count SLURM did not requeue the job, so nothing is continued.

    Args:
        root: the runs root.
        job: :func:`slurm_job_key`.
        restart: :func:`slurm_restart_count`.
        command: this process's command line (None: matches any, as for old records).
        task: the task's name (a run of another task is never continued).
        name: run-name suffix of a new folder.

    Returns:
        ``RunDir(reason="slurm requeue")`` of the continued run, or a new folder (recorded).
    """
    record = _slurm_record(root, job)
    record.parent.mkdir(parents=True, exist_ok=True)
    with _RecordMutex(record):
        entries = _read_slurm_entries(record)
        found = _requeued_entry(entries, restart, command, task)
        if found is not None:
            found["claimed"] = restart
            run = RunDir(Path(found["run_dir"]), created=False, reason="slurm requeue")
        else:
            path = new_run_dir(root, name)
            entries.append(
                {
                    "run_dir": str(path.resolve()),
                    "command": command,
                    "restart": restart,
                    "claimed": restart,
                    "time": time.time(),
                }
            )
            run = RunDir(path, created=True, reason="new")
        tmp = record.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"job": job, "runs": entries}, indent=1), encoding="utf-8")
        os.replace(tmp, record)
    return run


def _requeued_entry(
    entries: list[dict[str, Any]], restart: int, command: str | None, task: str | None
) -> dict[str, Any] | None:
    """The first record entry a requeued ``train`` continues (see :func:`slurm_claim`): made by
    an earlier incarnation, not yet claimed by this one, same command line, its folder still
    there and of the same task. None: start a new run."""
    for entry in entries:
        path = Path(entry["run_dir"])
        if (
            int(entry.get("claimed", entry.get("restart", 0))) < restart
            and entry.get("command") in (None, command)
            and path.is_dir()
            and (task is None or run_task(path) in (task, None))
        ):
            return entry
    return None


def resolve_run_dir(
    root: Path,
    name: str = "",
    run_dir: Path | None = None,
    env: dict[str, str] | None = None,
    task: str | None = None,
    command: str | None = None,
) -> RunDir:
    """Choose (and if needed create) the run folder of this process's run.

    Order: an explicit ``run.dir`` (``latest`` = this task's newest under the root); else, under
    SLURM, the folder of the same run before the job was requeued (:func:`slurm_claim`: same job
    id, higher restart count, same command line); else a new numbered folder.

    Args:
        root: the runs root.
        name: optional run-name suffix.
        run_dir: ``run.dir`` from the config.
        env: environment to read SLURM variables from (default ``os.environ``).
        task: the task's name; an existing ``run.dir`` must be a run of it.
        command: this process's command line, to tell the runs of one SLURM job apart.

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
        return slurm_claim(root, job, slurm_restart_count(env), command, task, name)
    return RunDir(new_run_dir(root, name), created=True, reason="new")


# --------------------------------------------------------------------------------------------
# The lock of a run folder being trained
# --------------------------------------------------------------------------------------------

LOCK_NAME = "run.lock"
HEARTBEAT_SECONDS = 60.0
"""How often a lock's owner refreshes it (the lock file's modification time)."""
STALE_SECONDS = 900.0
"""A lock of another host not refreshed for this long is taken for a dead owner's (a process on
another host cannot be asked whether it lives; 15 heartbeats leave room for clock skew and a
slow shared file system)."""

_held: set[str] = set()  # lock files this process holds (a leaked one of our own pid is stale)


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), to tell a
    pid that was reused from the lock's owner; None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def read_lock(run: Path) -> dict[str, Any] | None:
    """The owner recorded in ``<run>/run.lock`` (``pid``, ``host``, ``since``, ``job``,
    ``restart``, ``heartbeat`` = the file's age source), or None without a lock. An unreadable
    lock reads as ``{}`` with its ``heartbeat`` (an owner that died while writing it)."""
    path = Path(run) / LOCK_NAME
    try:
        heartbeat = path.stat().st_mtime
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        try:
            return {"heartbeat": path.stat().st_mtime}
        except OSError:
            return None
    if not isinstance(data, dict):
        data = {}
    data["heartbeat"] = heartbeat
    return data


def owner_text(owner: dict[str, Any]) -> str:
    """``pid 123 on host n01 since 2026-12-04 19:02:11 (SLURM job 42, restart 0)``."""
    since = owner.get("since")
    when = datetime.fromtimestamp(since).strftime("%Y-%m-%d %H:%M:%S") if since else "?"
    job = (
        f" (SLURM job {owner['job']}, restart {owner.get('restart', 0)})"
        if owner.get("job")
        else ""
    )
    return f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')} since {when}{job}"


def owner_dead(
    owner: dict[str, Any], env: dict[str, str] | None = None, now: float | None = None
) -> str | None:
    """Why the lock's owner is no longer training, or None when it may still be.

    Dead: a requeue of the owner's SLURM job (same job key, higher restart count: SLURM ended
    the old incarnation); on this host, a pid that is gone (or reused by a process that started
    later); on another host, a heartbeat older than :data:`STALE_SECONDS`; a lock without an
    owner (died while writing it) older than a heartbeat.
    """
    now = time.time() if now is None else now
    age = now - float(owner.get("heartbeat", now))
    if "pid" not in owner or "host" not in owner:
        return (
            f"its lock names no owner and is {age:.0f} s old" if age > HEARTBEAT_SECONDS else None
        )
    job = slurm_job_key(env)
    if job is not None and owner.get("job") == job:
        if slurm_restart_count(env) > int(owner.get("restart") or 0):
            return "SLURM requeued its job"
    pid = int(owner["pid"])
    if owner["host"] == socket.gethostname():
        if pid == os.getpid():
            mine = str(Path(owner.get("path", "")))
            return None if mine in _held else "this process holds it no longer"
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "its process is gone"
        except PermissionError:
            pass  # alive, another user's
        start = _process_start(pid)
        if start is not None and owner.get("start") and start != owner["start"]:
            return "its process is gone (the pid now belongs to another process)"
        return None
    if age > STALE_SECONDS:
        return f"its heartbeat is {age / 60:.0f} min old"
    return None


def lock_state(run: Path, env: dict[str, str] | None = None) -> str:
    """``none`` (no lock), ``live`` (its owner may still be training) or ``dead``."""
    owner = read_lock(run)
    if owner is None:
        return "none"
    return "dead" if owner_dead(owner, env) else "live"


def _busy(run: Path, owner: dict[str, Any]) -> UserError:
    """The refusal of a second writer into ``run``, naming the live ``owner``."""
    return UserError(
        f"Run folder {run} is being trained by another process: {owner_text(owner)} (lock "
        f"{Path(run) / LOCK_NAME}). Two trainings into one folder would mix their checkpoints and "
        "records. Wait for it to end, stop it, or train into another run.dir; if that process is "
        "really gone, remove the lock file."
    )


def check_not_locked(run: Path, env: dict[str, str] | None = None) -> None:
    """Refuse ``run`` early (before anything is launched) while a live process trains it.

    :meth:`RunLock.acquire` checks again when the folder is opened (the owner may start later).

    Raises:
        UserError: naming the owner (pid, host, since when) and the lock file.
    """
    owner = read_lock(Path(run))
    if owner is not None and owner_dead(owner, env) is None:
        raise _busy(run, owner)


class RunLock:
    """``<run>/run.lock`` of the process training ``run`` (rank 0), with a heartbeat thread.

    Use :meth:`acquire`; :meth:`release` (also on exit of a ``with`` block) removes the lock and
    stops the heartbeat.
    """

    def __init__(self, run: Path, owner: dict[str, Any]) -> None:
        self.path = Path(run) / LOCK_NAME
        self.owner = owner
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)

    @classmethod
    def acquire(cls, run: Path, env: dict[str, str] | None = None) -> RunLock:
        """Take the lock of ``run`` (taking over a dead owner's, with a warning).

        Args:
            run: the run folder (it exists).
            env: environment to read SLURM variables from (default ``os.environ``).

        Returns:
            The held lock, heartbeat running.

        Raises:
            UserError: another live process holds it (its pid, host and start named); nothing
                was written into ``run``.
        """
        run = Path(run)
        path = run / LOCK_NAME
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.time(),
            "start": _process_start(os.getpid()),
            "job": slurm_job_key(env),
            "restart": slurm_restart_count(env),
            "path": str(path),
        }
        text = json.dumps(owner, indent=1)
        for _ in range(20):
            # Read first: a refused writer must not write anything into the folder.
            current = read_lock(run)
            if current is not None:
                why = owner_dead(current, env)
                if why is None:
                    raise _busy(run, current)
                with storage_errors("the run lock", path):
                    taken = _remove_if_unchanged(path, current)
                if taken:
                    log.warning(
                        "Taking over the lock of run folder %s from %s: %s.",
                        run,
                        owner_text(current),
                        why,
                    )
                continue
            with storage_errors("the run lock", path):
                created = _create_exclusive(path, text)
            if created:
                lock = cls(run, owner)
                _held.add(str(path))
                lock._thread.start()
                return lock
        raise UserError(f"Could not take the lock {path}: other processes keep changing it.")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except OSError as err:  # the run folder went away or its disk fails: warn, go on
                log.warning("Could not refresh the run lock %s: %s", self.path, err)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock (only if it is still this process's)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        _held.discard(str(self.path))
        current = read_lock(self.path.parent)
        if (
            current is not None
            and current.get("pid") == self.owner["pid"]
            and current.get("since") == self.owner["since"]
        ):
            try:
                self.path.unlink()
            except OSError as err:
                log.warning("Could not remove the run lock %s: %s", self.path, err)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _create_exclusive(path: Path, text: str) -> bool:
    """Write ``path`` with ``text`` only if it does not exist, atomically (a reader never sees
    it half-written): a temporary file hard-linked to ``path``. False when ``path`` exists."""
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _remove_if_unchanged(path: Path, seen: dict[str, Any]) -> bool:
    """Remove a dead owner's lock, unless another process replaced it meanwhile: moved aside
    first (only one mover wins), put back when it is no longer the lock that was judged dead."""
    aside = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    moved = _read_file(aside)
    if moved is not None and (moved.get("pid"), moved.get("since")) != (
        seen.get("pid"),
        seen.get("since"),
    ):
        try:
            os.link(aside, path)  # a new owner's lock: back where it was
        except OSError:
            pass
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True


def _read_file(path: Path) -> dict[str, Any]:
    """A lock file's JSON (``{}`` when unreadable)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


if __name__ == "__main__":  # self-check: python -m core.run.folder
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    with tempfile.TemporaryDirectory() as tmp:
        with ThreadPoolExecutor(8) as pool:
            paths = list(pool.map(lambda i: new_run_dir(Path(tmp), f"job{i}"), range(16)))
        numbers = sorted(int(p.name.split("_")[0]) for p in paths)
        assert numbers == list(range(1, 17)), numbers
        env = {"SLURM_JOB_ID": "4242"}
        first = resolve_run_dir(Path(tmp), env=env, command="train seed=1")
        second = resolve_run_dir(Path(tmp), env=env, command="train seed=1")
        assert first.created and second.created and first.path != second.path
        requeued = {**env, "SLURM_RESTART_COUNT": "1"}
        again = resolve_run_dir(Path(tmp), env=requeued, command="train seed=1")
        assert again.reason == "slurm requeue" and again.path == first.path
        assert resolve_run_dir(Path(tmp), env=requeued, command="train seed=1").path == second.path
        with RunLock.acquire(first.path):
            assert lock_state(first.path) == "live"
            try:
                RunLock.acquire(first.path, env={})
            except UserError:
                pass
        assert lock_state(first.path) == "none"
        import subprocess

        gone = subprocess.Popen(["true"])
        gone.wait()  # a pid that no longer runs: a killed owner
        dead = {"pid": gone.pid, "host": socket.gethostname(), "since": time.time()}
        (first.path / LOCK_NAME).write_text(json.dumps(dead))
        assert lock_state(first.path) == "dead"
        RunLock.acquire(first.path).release()  # taken over (with a warning), then released
        assert lock_state(first.path) == "none"
        print("16 concurrent runs got numbers 1..16; requeued job 4242 ->", again.path.name)
    print("core.run.folder: ok")
