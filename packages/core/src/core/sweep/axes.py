"""The grid of a sweep: axes and fixed overrides split from a command line, the points of their
cartesian product and their folder names (see :mod:`core.sweep`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from core.cli import user_errors_exit_2
from core.errors import UserError
from core.report import STOPPED, compare_sweep_text, flatten
from core.runs import RUN_DIR_PATTERN, experiment_numbers, lock_state, new_run_dir

DEFAULT_MAX_POINTS = 32
"""A grid with more points than this needs ``--max-points N`` (a typo can multiply a grid)."""

SWEEP_FILE = "sweep.yaml"
# Keys the sweep sets itself for every point; an axis or override of them would fight it.
RESERVED_KEYS = ("run.dir", "run.name", "logger.wandb_group")
SEED_KEY = "trainer.seed"

TrainFn = Callable[[Sequence[str]], int]


# --------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Axis:
    """One swept key and its values, as written on the command line.

    Attributes:
        key: dotted config key, e.g. ``optim.lr``.
        values: the value texts, e.g. ``["1e-3", "1e-4"]`` (parsed as YAML by ``train``).
    """

    key: str
    values: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        """``{"key": ..., "values": [...]}`` for ``sweep.yaml``."""
        return {"key": self.key, "values": list(self.values)}


@dataclass(frozen=True)
class Point:
    """One point of the grid.

    Attributes:
        index: 0-based position in the grid (also its SLURM array task id).
        values: ``{key: value text}`` in axis order.
        dir_name: the point's run folder name inside the sweep folder.
    """

    index: int
    values: dict[str, str]
    dir_name: str

    @property
    def overrides(self) -> list[str]:
        """The point's ``key=value`` overrides, in axis order."""
        return [f"{key}={value}" for key, value in self.values.items()]


@dataclass
class SweepSpec:
    """What a sweep command asks for; two commands with equal specs are the same sweep.

    Attributes:
        task: the task package whose ``train`` runs every point.
        preset: ``-c`` as given (a YAML path made absolute), or None for the task's default.
        overrides: the fixed ``key=value`` overrides of every point.
        axes: the swept keys (the seed axis of ``--seeds`` included, last).
        seeds: ``--seeds N`` or None.
        name: ``--name`` (folder suffix and W&B group), or an empty string.
    """

    task: str
    preset: str | None
    overrides: list[str]
    axes: list[Axis]
    seeds: int | None = None
    name: str = ""

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``sweep.yaml``."""
        return {
            "task": self.task,
            "preset": self.preset,
            "overrides": list(self.overrides),
            "axes": [a.as_dict() for a in self.axes],
            "seeds": self.seeds,
            "name": self.name,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepSpec:
        """Inverse of :meth:`as_dict`."""
        return cls(
            task=data["task"],
            preset=data.get("preset"),
            overrides=list(data.get("overrides") or []),
            axes=[Axis(a["key"], tuple(str(v) for v in a["values"])) for a in data["axes"]],
            seeds=data.get("seeds"),
            name=data.get("name") or "",
        )

    @property
    def base_args(self) -> list[str]:
        """``train`` arguments shared by every point: ``[-c PRESET] key=value ...``."""
        return (["-c", self.preset] if self.preset else []) + list(self.overrides)


def split_values(text: str) -> list[str]:
    """Split an override's value at top-level commas (not inside brackets, braces or quotes).

    Args:
        text: the part after ``=``, e.g. ``"[q,v],[q,k,v]"``.

    Returns:
        The value texts, stripped: ``["[q,v]", "[q,k,v]"]``; one item without a top-level comma.

    Raises:
        UserError: unbalanced brackets or quotes.

    >>> split_values("1e-3,1e-4")
    ['1e-3', '1e-4']
    >>> split_values("[q_proj,v_proj],[q_proj]")
    ['[q_proj,v_proj]', '[q_proj]']
    >>> split_values("'a,b',c")
    ["'a,b'", 'c']
    """
    items: list[str] = []
    depth, quote, start = 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
            if depth < 0:
                break
        elif char == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    if depth != 0 or quote:
        raise UserError(
            f"The value '{text}' has unbalanced {'quotes' if quote else 'brackets'}; "
            "write lists as [a,b] and separate the values of an axis with commas, e.g. "
            "key=[a,b],[c]."
        )
    items.append(text[start:].strip())
    return items


def split_overrides(items: Sequence[str]) -> tuple[list[str], list[Axis]]:
    """Sort command-line ``key=value`` items into fixed overrides and axes.

    Args:
        items: the positional arguments, e.g. ``["trainer.max_steps=10", "optim.lr=1e-3,1e-4"]``.

    Returns:
        ``(fixed overrides, axes)``, both in command-line order.

    Raises:
        UserError: an item without ``=``, an axis with an empty or repeated value, a key given
            twice, or a key the sweep sets itself.
    """
    fixed: list[str] = []
    axes: list[Axis] = []
    seen: dict[str, str] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(
                f"'{item}' is not an override of the form key=value or an axis key=v1,v2 "
                "(e.g. optim.lr=1e-4,3e-4); presets go after -c."
            )
        if key in seen:
            raise UserError(
                f"Config key '{key}' is given twice ('{seen[key]}' and '{item}'); give one "
                "key=value or one axis key=v1,v2,... per key."
            )
        seen[key] = item
        if key in RESERVED_KEYS:
            raise UserError(
                f"'{item}': the sweep sets {key} itself for every point (run.dir = the point's "
                "folder, logger.wandb_group = the sweep's name); drop it. Use --name to name "
                "the sweep and run.root=DIR for where its folder goes."
            )
        values = split_values(raw)
        if len(values) == 1:
            fixed.append(f"{key}={raw}")
            continue
        if not any(values):
            raise UserError(
                f"Sweep axis '{item}' has no values; give at least two, e.g. {key}=1e-4,3e-4."
            )
        empty = [i + 1 for i, v in enumerate(values) if not v]
        if empty:
            raise UserError(
                f"Sweep axis '{item}' has an empty value (item {empty[0]} of {len(values)}); "
                f"remove the stray comma, e.g. {key}={','.join(v for v in values if v)}."
            )
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise UserError(
                f"Sweep axis '{item}' repeats the value {repeated[0]!r}; every point would run "
                "twice. Give each value once."
            )
        axes.append(Axis(key, tuple(values)))
    return fixed, axes


def seed_axis(base_seed: int, count: int) -> Axis:
    """The ``trainer.seed`` axis of ``--seeds count``: ``base_seed``, ``base_seed + 1``, ..."""
    return Axis(SEED_KEY, tuple(str(base_seed + i) for i in range(count)))


def _label(key: str, axes: Sequence[Axis]) -> str:
    """Short name of an axis in folder names: the last key part when that is unique."""
    leaf = key.rsplit(".", 1)[-1]
    return leaf if sum(a.key.rsplit(".", 1)[-1] == leaf for a in axes) == 1 else key


def point_dir_name(index: int, values: dict[str, str], axes: Sequence[Axis], width: int) -> str:
    """The folder name of a point: its index, then ``label=value`` per axis, file-name safe.

    >>> point_dir_name(3, {"optim.lr": "1e-3", "lora.r": "8"}, [Axis("optim.lr", ()),
    ...     Axis("lora.r", ())], 3)
    '003_lr=1e-3_r=8'
    >>> point_dir_name(0, {"m.t": "[q_proj,v_proj]"}, [Axis("m.t", ())], 3)
    '000_t=q_proj-v_proj'
    """
    parts = []
    for key, value in values.items():
        safe = re.sub(r"[^A-Za-z0-9._+-]+", "-", value).strip("-.") or "x"
        parts.append(f"{_label(key, axes)}={safe}")
    # The index keeps names unique and sorted even when long names are cut.
    return f"{index:0{width}d}_" + "_".join(parts)[:120]


def grid(axes: Sequence[Axis]) -> list[Point]:
    """The cartesian product of the axes (the last axis varies fastest).

    Args:
        axes: the axes in command-line order (seeds last).

    Returns:
        One :class:`Point` per combination.
    """
    combos = list(itertools.product(*(a.values for a in axes)))
    width = max(3, len(str(len(combos) - 1)))
    points = []
    for index, combo in enumerate(combos):
        values = {a.key: v for a, v in zip(axes, combo, strict=True)}
        points.append(Point(index, values, point_dir_name(index, values, axes, width)))
    return points


# --------------------------------------------------------------------------------------------
# Checking the command with the task's own `train --print-config`
# --------------------------------------------------------------------------------------------


def resolved_config(train: TrainFn, args: Sequence[str]) -> tuple[dict[str, Any] | None, str]:
    """Run the task's ``train ARGS --print-config`` in this process and capture what it says.

    Why: the task's own parser knows its config class, presets and range checks, and its
    messages already name the closest valid key; nothing is trained or written.

    Args:
        train: the task's ``train`` command (``argv -> exit code``).
        args: ``train`` arguments (``-c``, overrides).

    Returns:
        ``(resolved config as nested data, "")`` when valid, else ``(None, error message)``.
    """
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = train([*args, "--print-config"])
        except SystemExit as exit_:  # argparse: an unknown flag
            code = exit_.code if isinstance(exit_.code, int) else 2
    if code != 0:
        message = " ".join(err.getvalue().split()).removeprefix("error: ")
        return None, message or f"train exited with code {code}"
    return yaml.safe_load(out.getvalue()) or {}, ""


def check_grid(
    train: TrainFn, spec: SweepSpec, points: Sequence[Point]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Check the base config, every axis value on its own, then every point.

    Args:
        train: the task's ``train`` command.
        spec: the sweep.
        points: its grid.

    Returns:
        ``(base config, [point config, ...])`` as nested data.

    Raises:
        UserError: the first problem, naming the axis or point and how to fix it.
    """
    base, error = resolved_config(train, spec.base_args)
    if base is None:
        raise UserError(
            f"The sweep's base config (-c {spec.preset or '(default)'} and the fixed overrides) "
            f"is not valid: {error} Fix it and run the sweep again; nothing was started."
        )
    for axis in spec.axes:
        typed: dict[str, Any] = {}  # the value each spelling resolves to, by spelling
        for value in axis.values:
            config, error = resolved_config(train, [*spec.base_args, f"{axis.key}={value}"])
            if config is not None:
                # Compare what the config parsed, not the text: 1e-3 and 0.001 are one point.
                resolved = flatten(config).get(axis.key, value)
                same = next((v for v, r in typed.items() if r == resolved), None)
                if same is not None:
                    raise UserError(
                        f"Sweep axis '{axis.key}={','.join(axis.values)}' gives one value twice: "
                        f"'{same}' and '{value}' are both {resolved!r}, so every point would run "
                        "twice. Give each value once; nothing was started."
                    )
                typed[value] = resolved
            if error:
                what = (
                    "names an unknown config key"
                    if "nknown config key" in error
                    else f"has a bad value {value!r}"
                )
                raise UserError(
                    f"Sweep axis '{axis.key}={','.join(axis.values)}' {what}: "
                    f"{error} Fix the axis (every key: train --help-keys) and run the sweep "
                    "again; nothing was started."
                )
    configs = []
    for point in points:
        config, error = resolved_config(train, [*spec.base_args, *point.overrides])
        if config is None:
            raise UserError(
                f"Sweep point {point.index} ({' '.join(point.overrides)}) is not a valid config: "
                f"{error} Change the axes so every combination is valid; nothing was started."
            )
        configs.append(config)
    return base, configs


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every key whose value differs between two nested configs."""
    a, b = flatten(old), flatten(new)
    return [
        f"{key}: {a.get(key)!r} -> {b.get(key)!r}"
        for key in sorted(set(a) | set(b))
        if a.get(key) != b.get(key)
    ]


# --------------------------------------------------------------------------------------------
# The sweep folder
# --------------------------------------------------------------------------------------------


@dataclass
class Sweep:
    """A sweep folder and what ``sweep.yaml`` says about it.

    Attributes:
        path: the sweep folder.
        spec: the command it was made from.
        base_config: the resolved base config (nested data).
        points: the grid.
    """

    path: Path
    spec: SweepSpec
    base_config: dict[str, Any]
    points: list[Point] = field(default_factory=list)

    @property
    def group(self) -> str:
        """The W&B group of every point: the sweep folder's name."""
        return self.path.name

    def point_dir(self, point: Point) -> Path:
        """The run folder of ``point`` (absolute)."""
        return self.path.resolve() / point.dir_name

    def train_args(self, point: Point) -> list[str]:
        """The ``train`` arguments of a point: always exactly the same for the same point."""
        return [*self.spec.base_args, *self.point_args(point)]

    def point_args(self, point: Point) -> list[str]:
        """The arguments that differ between points (SLURM: ``<sweep>/slurm/<index>.args``)."""
        return [
            *point.overrides,
            f"logger.wandb_group={self.group}",
            f"run.dir={self.point_dir(point)}",
        ]


def read_sweep(path: Path) -> Sweep:
    """Read ``<path>/sweep.yaml``.

    Raises:
        UserError: no sweep folder there.
    """
    path = Path(path)
    file = path / SWEEP_FILE
    if not file.is_file():
        raise UserError(
            f"'{path}' is not a sweep folder (no {SWEEP_FILE}); give a folder under "
            "<run.root>/sweeps/, e.g. runs/sweeps/001_20260101_120000."
        )
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
        spec = SweepSpec.from_dict(data)
        points = [Point(p["index"], dict(p["values"]), p["dir"]) for p in data["points"]]
    except (yaml.YAMLError, KeyError, TypeError) as err:
        raise UserError(f"'{file}' is not a sweep file this version can read ({err}).") from None
    return Sweep(path, spec, data.get("base_config") or {}, points)


def write_sweep(sweep: Sweep, argv: Sequence[str]) -> None:
    """Write ``sweep.yaml`` (once, when the sweep folder is made)."""
    data = {
        **sweep.spec.as_dict(),
        "command": ["sweep", *argv],
        "created": datetime.now().isoformat(timespec="seconds"),
        "base_config": sweep.base_config,
        "points": [
            {"index": p.index, "dir": p.dir_name, "values": dict(p.values)} for p in sweep.points
        ],
    }
    tmp = sweep.path / (SWEEP_FILE + ".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    os.replace(tmp, sweep.path / SWEEP_FILE)


def sweeps_root(base_config: dict[str, Any]) -> Path:
    """``<run.root>/sweeps`` of a base config."""
    return Path(base_config.get("run", {}).get("root") or "runs") / "sweeps"


def find_sweep(root: Path, spec: SweepSpec) -> Sweep | None:
    """The newest sweep folder under ``root`` made by the same command (same :class:`SweepSpec`)."""
    if not root.is_dir():
        return None
    folders = sorted(
        (p for p in root.iterdir() if p.is_dir() and RUN_DIR_PATTERN.match(p.name)),
        key=lambda p: int(p.name.split("_", 1)[0]),
        reverse=True,
    )
    for folder in folders:
        try:
            sweep = read_sweep(folder)
        except UserError:
            continue
        if sweep.spec.as_dict() == spec.as_dict():
            return sweep
    return None


def point_status(path: Path) -> str:
    """``pending`` (no folder yet), else the status in its ``summary.json`` (``completed``,
    ``interrupted``, ``failed``, ``running``; ``running`` without a live owner of its run lock is
    ``stopped (no live process)``: killed, it resumes like an interrupted point), or ``started``
    when it has none yet."""
    if not path.is_dir():
        return "pending"
    try:
        status = json.loads((path / "summary.json").read_text(encoding="utf-8"))["status"]
    except (OSError, ValueError, KeyError):
        return "started"
    return STOPPED if status == "running" and lock_state(path) != "live" else status


def next_sweep_path(root: Path, name: str) -> Path:
    """The folder a new sweep would get (for ``--dry-run``; nothing is claimed)."""
    number = max(experiment_numbers(root), default=0) + 1
    return root / (f"{number:03d}_{datetime.now():%Y%m%d_%H%M%S}" + (f"_{name}" if name else ""))


# --------------------------------------------------------------------------------------------
# Running the points locally
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# SLURM: one job array
# --------------------------------------------------------------------------------------------


def array_ranges(indices: Sequence[int]) -> str:
    """Compress array task ids for ``sbatch --array``.

    >>> array_ranges([0, 1, 2, 3])
    '0-3'
    >>> array_ranges([1, 3, 4, 5, 9])
    '1,3-5,9'
    """
    parts = []
    for _, run in itertools.groupby(enumerate(sorted(indices)), key=lambda p: p[1] - p[0]):
        ids = [i for _, i in run]
        parts.append(str(ids[0]) if len(ids) == 1 else f"{ids[0]}-{ids[-1]}")
    return ",".join(parts)


def sbatch_command(
    sweep: Sweep, todo: Sequence[Point], script: Path, sbatch_args: Sequence[str], parallel: int
) -> list[str]:
    """The ``sbatch`` command of a sweep's job array.

    Args:
        sweep: the sweep.
        todo: the points to run (their indices become the array task ids).
        script: the task's ``train.sbatch``.
        sbatch_args: the user's sbatch options (they win over the script's ``#SBATCH`` lines).
        parallel: at most this many array tasks at once (``%M``).

    Returns:
        The argument list; the point-specific arguments are read by ``launch.sh`` from
        ``<sweep>/slurm/<array task id>.args``.
    """
    cmd = ["sbatch", "--parsable", f"--array={array_ranges([p.index for p in todo])}%{parallel}"]
    if not any(a in ("-o", "--output") or a.startswith("--output=") for a in sbatch_args):
        cmd.append("--output=logs/%x_%A_%a.out")  # one log per array task: <job>_<array>_<index>
    return [*cmd, *sbatch_args, str(script), *sweep.spec.base_args]


def live_array_jobs(sweep: Sweep) -> list[str]:
    """Array jobs submitted for this sweep that SLURM still lists (queued or running)."""
    record = sweep.path / "slurm" / "submissions.jsonl"
    if not record.is_file() or shutil.which("squeue") is None:
        return []
    ids = {json.loads(line)["job_id"] for line in record.read_text().splitlines() if line.strip()}
    try:
        done = subprocess.run(
            ["squeue", "-h", "-o", "%F"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted(ids & set(done.stdout.split()))


def write_array_args(sweep: Sweep) -> Path:
    """Write ``<sweep>/slurm/<index>.args``, one ``train`` argument per line, for every point."""
    folder = sweep.path / "slurm"
    folder.mkdir(exist_ok=True)
    for point in sweep.points:
        text = "".join(arg + "\n" for arg in sweep.point_args(point))
        (folder / f"{point.index}.args").write_text(text, encoding="utf-8")
    return folder


def submit_array(
    sweep: Sweep, todo: Sequence[Point], script: Path, sbatch_args: Sequence[str], parallel: int
) -> int:
    """Submit the job array and record it in ``<sweep>/slurm/submissions.jsonl``.

    Returns:
        0 when sbatch accepted it, else sbatch's exit code.
    """
    args_dir = write_array_args(sweep)
    cmd = sbatch_command(sweep, todo, script, sbatch_args, parallel)
    if "--output=logs/%x_%A_%a.out" in cmd:
        # SLURM does not create the log's folder (a job whose log cannot be opened just fails);
        # it is relative to the job's working folder: --chdir / -D, else here.
        workdir = next((a.split("=", 1)[1] for a in sbatch_args if a.startswith("--chdir=")), None)
        if "-D" in sbatch_args[:-1]:
            workdir = sbatch_args[list(sbatch_args).index("-D") + 1]
        (Path(workdir or ".") / "logs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SWEEP_ARGS_DIR": str(args_dir.resolve())}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    if done.returncode != 0:
        print(done.stderr, end="", file=sys.stderr)
        _say(f"sbatch failed (exit code {done.returncode}); nothing was submitted")
        return done.returncode or 1
    job = done.stdout.strip().split(";")[0]
    with open(args_dir / "submissions.jsonl", "a", encoding="utf-8") as handle:
        record = {"job_id": job, "array": cmd[2], "time": time.time(), "command": cmd}
        handle.write(json.dumps(record) + "\n")
    _say(
        f"submitted job array {job} ({len(todo)} points, {cmd[2]}); logs in logs/ (one per array "
        f"task); watch with: squeue -j {job}; runs list {sweep.path}"
    )
    print(job)
    return 0


def find_sbatch_script(task_module: str | None, task: str) -> Path | None:
    """The task's ``train.sbatch``: ``packages/<task>/slurm/`` next to the task's sources in
    the workspace, else under the current folder."""
    candidates = []
    if task_module:
        module = sys.modules.get(task_module)
        if module is not None and getattr(module, "__file__", None):
            candidates.append(Path(module.__file__).resolve().parents[2] / "slurm" / "train.sbatch")
    candidates.append(Path.cwd() / "packages" / task / "slurm" / "train.sbatch")
    return next((c for c in candidates if c.is_file()), None)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def sweep_parser() -> argparse.ArgumentParser:
    """The ``sweep`` argument parser (everything after ``--slurm`` goes to sbatch)."""
    parser = argparse.ArgumentParser(
        prog="sweep",
        description="Run a grid of training runs (key=v1,v2 axes) locally one after another, or as "
        "one SLURM job array with --slurm. Running the same command again continues the sweep.",
        epilog="examples:\n"
        "  sweep -c tiny optim.lr=1e-3,3e-4 trainer.batch_size=8,16 --name lr-bs\n"
        "  sweep -c tiny optim.lr=1e-3,3e-4 --seeds 3 --dry-run\n"
        "  sweep -c bart_base optim.lr=1e-4,3e-4,1e-3 --slurm -p a100 --time=8:00:00\n"
        "  sweep --resume runs/sweeps/002_20260101_120000_lr-bs\n"
        "  runs compare runs/sweeps/002_20260101_120000_lr-bs\n\n"
        "--slurm must come last: what follows it goes to sbatch. A grid of more than "
        f"{DEFAULT_MAX_POINTS} points needs --max-points N.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-c", "--config", metavar="PRESET|FILE", help="a preset or a YAML file")
    parser.add_argument("--name", default="", help="suffix of the sweep folder; the W&B group")
    parser.add_argument("--seeds", type=int, metavar="N", help="repeat every point with N seeds")
    parser.add_argument(
        "--max-points", type=int, metavar="N", help=f"allow grids above {DEFAULT_MAX_POINTS} points"
    )
    parser.add_argument(
        "--max-parallel", type=int, metavar="M", help="--slurm: at most M array tasks at once (all)"
    )
    parser.add_argument("--resume", type=Path, metavar="DIR", help="continue this sweep folder")
    parser.add_argument("--new", action="store_true", help="a new sweep folder even if one matches")
    parser.add_argument("--dry-run", action="store_true", help="print points and commands only")
    parser.add_argument("--sbatch-script", type=Path, metavar="PATH", help="--slurm: the script")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value|key=v1,v2", help="overrides and axes"
    )
    return parser


def _spec_from_args(args: argparse.Namespace, task: str) -> tuple[SweepSpec, bool]:
    """The :class:`SweepSpec` of the command line (no seed axis yet) and whether it gave any."""
    preset = args.config
    # A YAML file is kept by absolute path: SLURM jobs may start in another folder.
    if preset and (preset.endswith((".yaml", ".yml")) or "/" in preset) and Path(preset).is_file():
        preset = str(Path(preset).resolve())
    fixed, axes = split_overrides(args.overrides)
    if args.name and not re.fullmatch(r"[A-Za-z0-9._-]+", args.name):
        raise UserError(
            f"--name {args.name!r}: use letters, digits, '-', '_' or '.' only (it becomes part "
            "of a folder name and the W&B group)."
        )
    given = bool(args.config or args.overrides or args.seeds or args.name)
    return SweepSpec(task, preset, fixed, axes, args.seeds, args.name), given


def _add_seeds(spec: SweepSpec, train: TrainFn) -> None:
    """Append the ``--seeds`` axis (base seed from the resolved base config)."""
    if not spec.seeds or spec.seeds == 1 or any(a.key == SEED_KEY for a in spec.axes):
        if spec.seeds and any(a.key == SEED_KEY for a in spec.axes):
            raise UserError(
                f"--seeds {spec.seeds} and the axis {SEED_KEY}=... both set the seeds; keep one."
            )
        return
    base, error = resolved_config(train, spec.base_args)
    if base is None:
        raise UserError(f"The sweep's base config is not valid: {error}")
    spec.axes.append(seed_axis(int(base["trainer"]["seed"]), spec.seeds))


def _check_size(spec: SweepSpec, max_points: int | None) -> int:
    """The number of points; raises ``UserError`` when it needs (a larger) ``--max-points``."""
    if not spec.axes:
        raise UserError(
            "Nothing to sweep: give at least one axis key=v1,v2 (e.g. optim.lr=1e-4,3e-4) or "
            "--seeds N; for a single run use train."
        )
    count = 1
    for axis in spec.axes:
        count *= len(axis.values)
    limit = max_points or DEFAULT_MAX_POINTS
    if count > limit:
        sizes = " x ".join(f"{len(a.values)} {a.key}" for a in spec.axes)
        raise UserError(
            f"The grid has {count} points ({sizes}), more than "
            + (f"--max-points {max_points}" if max_points else f"the limit of {limit}")
            + f"; if you mean it, add --max-points {count}, else give fewer values."
        )
    return count


def _open_sweep(
    args: argparse.Namespace, task: str, train: TrainFn, argv: Sequence[str], slurm: bool
) -> tuple[Sweep, bool]:
    """Find the sweep this command continues, or make the grid of a new one (folder made only
    when not ``--dry-run``). Returns ``(sweep, is new)``; every check happens before a folder
    exists (with ``slurm``: also that ``sbatch`` is there)."""
    spec, given = _spec_from_args(args, task)
    if args.resume is not None:
        if args.new:
            raise UserError("--resume DIR and --new contradict each other; give one.")
        sweep = read_sweep(args.resume)
        if sweep.spec.task != task:
            raise UserError(
                f"Sweep {args.resume} runs the {sweep.spec.task} task, not {task}; continue it "
                f"with 'uv run --package {sweep.spec.task} sweep --resume {args.resume}'."
            )
        if given:
            _add_seeds(spec, train)
            if spec.as_dict() != sweep.spec.as_dict():
                raise UserError(
                    f"Sweep {args.resume} was made by a different command "
                    f"({shlex.join(['sweep', *sweep.spec.base_args])} with axes "
                    f"{', '.join(a.key for a in sweep.spec.axes)}); give just --resume DIR to "
                    "continue it, or drop --resume to start a new sweep."
                )
        spec = sweep.spec
        found: Sweep | None = sweep
    else:
        _add_seeds(spec, train)
        found = None
    _check_size(spec, args.max_points)
    points = grid(spec.axes)
    base, _ = check_grid(train, spec, points)
    if slurm and not args.dry_run and shutil.which("sbatch") is None:
        raise UserError("--slurm: sbatch is not on PATH here; run the sweep on a SLURM login node.")
    if found is None and not args.new:
        found = find_sweep(sweeps_root(base), spec)
    if found is not None:
        if found.base_config != base:
            changes = config_changes(found.base_config, base)
            raise UserError(
                f"Sweep folder {found.path} was made from a different base config than this "
                f"command gives now ({len(changes)} key(s): {'; '.join(changes[:5])}). Its points "
                "would no longer be comparable; restore the preset / overrides, or start a new "
                "sweep with --new."
            )
        return found, False
    root = sweeps_root(base)
    path = next_sweep_path(root, spec.name) if args.dry_run else new_run_dir(root, spec.name)
    sweep = Sweep(path, spec, base, points)
    if not args.dry_run:
        write_sweep(sweep, argv)
    return sweep, True


def _print_plan(sweep: Sweep, new: bool) -> None:
    """The points and their status, for ``--dry-run`` and before a run."""
    state = "new" if new else "existing"
    print(f"sweep {sweep.path} ({state}): {len(sweep.points)} points of task {sweep.spec.task}")
    keys = [a.key for a in sweep.spec.axes]
    rows = [["#", "folder", *keys, "status"]]
    for point in sweep.points:
        status = "pending" if new else point_status(sweep.point_dir(point))
        rows.append([str(point.index), point.dir_name, *point.values.values(), status])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@user_errors_exit_2
def sweep_command(
    argv: Sequence[str] | None,
    *,
    task: str,
    train: TrainFn,
    train_cmd: Sequence[str],
    task_module: str | None = None,
) -> int:
    """Run the ``sweep`` command of a task.

    Args:
        argv: arguments after the program name (default ``sys.argv[1:]``).
        task: the task's name (recorded in ``sweep.yaml``).
        train: the task's ``train`` command, called in this process with ``--print-config`` to
            check every point.
        train_cmd: the command that starts the task's ``train`` in a new process (local points).
        task_module: the task's module (to find its ``slurm/train.sbatch``).

    Returns:
        Exit code: 0 done / submitted / stopped by a signal, 1 a point failed, 2 bad input.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    own, sbatch_args = argv, None
    if "--slurm" in argv:
        cut = argv.index("--slurm")
        own, sbatch_args = argv[:cut], argv[cut + 1 :]
        if "--dry-run" in sbatch_args:  # sbatch has no --dry-run: it is ours wherever it stands
            sbatch_args.remove("--dry-run")
            own.append("--dry-run")
    args = sweep_parser().parse_intermixed_args(own)
    for flag, value in (("--seeds", args.seeds), ("--max-points", args.max_points)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: give a number of 1 or more.")
    if args.max_parallel is not None and (args.max_parallel < 1 or sbatch_args is None):
        raise UserError(
            f"--max-parallel {args.max_parallel}: give 1 or more, with --slurm (locally the points "
            "run one after another)."
        )
    script = None
    if sbatch_args is not None:
        if any(a.startswith(("--array", "-a")) for a in sbatch_args):
            raise UserError(
                "The sweep sets sbatch's --array itself; drop it (use --max-parallel M)."
            )
        script = args.sbatch_script or find_sbatch_script(task_module, task)
        if script is None or not Path(script).is_file():
            raise UserError(
                f"--slurm needs the task's sbatch script, packages/{task}/slurm/train.sbatch: run "
                "the sweep from the workspace root, or give --sbatch-script PATH."
            )
    sweep, new = _open_sweep(args, task, train, argv, slurm=sbatch_args is not None)
    _print_plan(sweep, new)
    live = [] if new else live_array_jobs(sweep)
    if live:
        raise UserError(
            f"Job array {', '.join(live)} of sweep {sweep.path} is still queued or running "
            f"(squeue); wait for it, or scancel {' '.join(live)} first."
        )
    todo = [p for p in sweep.points if new or point_status(sweep.point_dir(p)) != "completed"]
    if sbatch_args is not None:
        parallel = args.max_parallel or max(len(todo), 1)
        if args.dry_run:
            args_dir = sweep.path.resolve() / "slurm"
            print("would submit (nothing was written or submitted):")
            command = sbatch_command(sweep, todo, Path(script), sbatch_args, parallel)
            print(f"  SWEEP_ARGS_DIR={shlex.quote(str(args_dir))} {shlex.join(command)}")
            for point in todo:
                print(f"  array task {point.index}: {shlex.join(sweep.point_args(point))}")
            return 0
        if not todo:
            _say(f"all {len(sweep.points)} points are completed; nothing to submit")
            return 0
        return submit_array(sweep, todo, Path(script), sbatch_args, parallel)
    if args.dry_run:
        print("would run, one after another (nothing was written or run):")
        for point in todo:
            print(f"  {shlex.join([*train_cmd, *sweep.train_args(point)])}")
        return 0
    code = run_local(sweep, train_cmd)
    if code == 0 and all(point_status(sweep.point_dir(p)) == "completed" for p in sweep.points):
        print(compare_sweep_text(sweep.path))
    return code
