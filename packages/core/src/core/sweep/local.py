"""Running the points of a sweep locally, one ``train`` process after another, under a lock,
with signals passed on to the running point.

Self-check: ``python -m core.sweep`` (covers this module).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.errors import UserError
from core.sweep.folder import Sweep, point_status


def _die_with_parent() -> None:
    """In the child before ``exec``: get SIGTERM when the sweep process dies (Linux), so a
    killed sweep never leaves a training run behind; it checkpoints and stops instead."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the child outlives a SIGKILLed sweep
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


class _Forwarder:
    """While active, SIGINT / SIGTERM / SIGUSR1 / SIGHUP to the sweep stop it after the current
    point: the first one is forwarded to the running ``train`` (SIGINT as SIGTERM, so the run
    checkpoints), a second one as SIGINT (the trainer then stops at once)."""

    SIGNALS = tuple(
        getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGHUP") if hasattr(signal, n)
    )

    def __init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received.append(signum)
        if self.child is None or self.child.returncode is not None:
            return
        if len(self.received) == 1:
            forward = (
                signal.SIGTERM
                if signum in (signal.SIGINT, getattr(signal, "SIGHUP", -1))
                else signum
            )
        else:
            forward = signal.SIGINT
        with contextlib.suppress(ProcessLookupError):
            self.child.send_signal(forward)

    def __enter__(self) -> _Forwarder:
        for sig in self.SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    @property
    def name(self) -> str:
        """The first signal received, e.g. ``SIGTERM``."""
        return signal.Signals(self.received[0]).name if self.received else ""


@contextlib.contextmanager
def sweep_lock(path: Path):
    """Hold ``<sweep>/.lock`` while the sweep runs locally, so two copies never run one point.

    Raises:
        UserError: another live process on this host holds it.
    """
    lock = path / ".lock"
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                holder = {}
            alive = holder.get("host") == me["host"] and _pid_alive(holder.get("pid"))
            if alive or holder.get("host") not in (None, me["host"]):
                raise UserError(
                    f"Sweep {path} is already running (process {holder.get('pid')} on "
                    f"{holder.get('host')}, see {lock}); wait for it, or stop it first. If that "
                    "process is gone, delete the lock file."
                ) from None
            lock.unlink(missing_ok=True)  # a crashed sweep on this host left it behind
            continue
        with os.fdopen(fd, "w") as handle:
            json.dump(me, handle)
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _pid_alive(pid: Any) -> bool:
    """Whether a process with this id exists on this host."""
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _say(message: str) -> None:
    """A progress line of the sweep (stderr, like the trainer's log)."""
    print(f"[sweep] {message}", file=sys.stderr, flush=True)


def set_aside_unstarted(folder: Path) -> None:
    """A point folder without ``config.yaml`` / ``manifest.json`` and checkpoints (the run was
    killed while it was being created; ``train`` would not take it as a run folder) is renamed,
    so the point starts afresh in a new folder; nothing is deleted."""
    written = (folder / "config.yaml").is_file() and (folder / "manifest.json").is_file()
    if not folder.is_dir() or written or (folder / "checkpoints").exists():
        return
    target = folder.with_name(f"{folder.name}.unstarted-{int(time.time())}")
    os.replace(folder, target)
    _say(f"{folder.name} had no config.yaml (killed while starting): moved to {target.name}")


def run_local(sweep: Sweep, train_cmd: Sequence[str], env: dict[str, str] | None = None) -> int:
    """Run the points that are not completed, one after another, each as a ``train`` process.

    Args:
        sweep: the sweep (its folder exists).
        train_cmd: the command that runs the task's ``train`` (arguments are appended).
        env: environment of the ``train`` processes (default: this process's).

    Returns:
        0 when every point completed or the sweep was stopped by a signal (run it again to
        continue), 2 when a point reported a mistake in the input, 1 when a point failed.
    """
    failed: list[str] = []
    total = len(sweep.points)
    with sweep_lock(sweep.path), _Forwarder() as forward:
        for point in sweep.points:
            folder = sweep.point_dir(point)
            status = point_status(folder)
            if forward.received:  # a signal between two points: start no other
                _say(f"stopped by {forward.name} before point {point.index + 1}/{total}")
                return 0
            if status == "completed":
                _say(f"point {point.index + 1}/{total} {point.dir_name}: completed, skipped")
                continue
            set_aside_unstarted(folder)
            how = "starting" if not folder.exists() else f"resuming ({status})"
            _say(f"point {point.index + 1}/{total} {point.dir_name}: {how}")
            cmd = [*train_cmd, *sweep.train_args(point)]
            posix = os.name == "posix"
            forward.child = subprocess.Popen(
                cmd,
                env=env,
                # Its own session: a Ctrl-C in the terminal reaches only the sweep, which passes
                # it on once as SIGTERM (checkpoint and stop) instead of twice.
                start_new_session=posix,
                preexec_fn=_die_with_parent if posix and sys.platform.startswith("linux") else None,
            )
            if forward.received:  # arrived while the process was being started
                forward.child.send_signal(signal.SIGTERM)
            code = forward.child.wait()
            forward.child = None
            status = point_status(folder)
            if forward.received or status == "interrupted":
                by = forward.name or "a signal to the training process"
                _say(
                    f"stopped by {by} during point {point.index + 1}/{total} ({status}); run the "
                    f"same command again, or sweep --resume {sweep.path}, to continue"
                )
                return 0
            if code == 2:
                _say(f"point {point.index + 1} reported a mistake in the input (above): stopping")
                return 2
            if code != 0 or status != "completed":
                _say(f"point {point.index + 1}/{total} {point.dir_name} failed (exit code {code})")
                failed.append(point.dir_name)
    if failed:
        _say(f"{len(failed)} of {total} points failed: {', '.join(failed)}; run again to retry")
        return 1
    _say(f"all {total} points completed: {sweep.path}")
    return 0
