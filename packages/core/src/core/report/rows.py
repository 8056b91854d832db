"""Reading run folders and sweeps into rows (config, summary, last logged step, live or
stopped), and comparing rows: the differing keys, the ranking, the seed groups.

Self-check: ``python -m core.report`` (runs this module's doctests and compares two runs).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from core.errors import UserError
from core.run.folder import RUN_DIR_PATTERN, lock_state, run_task

# Differs between any two runs by construction (each run's own folder): never a "differing key".
IGNORED_KEYS = ("run.dir",)
SEED_KEY = "trainer.seed"
STOPPED = "stopped (no live process)"
"""Status shown for a run whose summary says ``running`` but whose training process is gone."""


@dataclass
class RunRow:
    """What one run folder says about itself.

    Attributes:
        path: the run folder.
        number: its number (``007``; a sweep point's index ``003``).
        name: the rest of its name (the run name, or a point's ``key=value`` part).
        status: ``completed``, ``interrupted``, ``failed``, ``running``, ``stopped (no live
            process)`` (``running`` in its summary, but its process is gone), ``corrupt`` (an
            unreadable ``summary.json``), ``started`` (no summary yet) or ``pending`` (a sweep
            point that has not started).
        step: optimizer steps done; None when unknown.
        total_steps: steps planned.
        metric: the monitored metric (``checkpoint.monitor``), e.g. ``val/loss``.
        best: its best value, or None.
        best_step: the step of the best value.
        mode: ``min`` or ``max``: which direction is better.
        wall_seconds: the run's wall time (the training time over all sessions when that is
            longer, as for a resumed run, whose ``wall_seconds`` covers its last session only).
        config: the run's config, flattened to ``{"optim.lr": 0.001, ...}``.
        values: a sweep point's axis values as written on the command line.
        sweep: the sweep folder of a point, else None.
        task: the task that made the run (its ``manifest.json``; a sweep's ``sweep.yaml``).
        problem: what is wrong with its records (a corrupt ``summary.json``, by path), or None.
    """

    path: Path
    number: str
    name: str
    status: str
    step: int | None = None
    total_steps: int | None = None
    metric: str | None = None
    best: float | None = None
    best_step: int | None = None
    mode: str = "min"
    wall_seconds: float | None = None
    config: dict[str, Any] = field(default_factory=dict)
    values: dict[str, str] = field(default_factory=dict)
    sweep: Path | None = None
    task: str | None = None
    problem: str | None = None

    @property
    def label(self) -> str:
        """``number name`` for legends."""
        return f"{self.number} {self.name}".strip()

    def cell(self, key: str) -> Any:
        """The value of config ``key`` in this run (a sweep point's axis value as written)."""
        return self.values.get(key, self.config.get(key))


@dataclass
class Group:
    """Runs that differ only in ``trainer.seed``.

    Attributes:
        key: ``{config key: value}`` shared by the runs (seed excluded).
        rows: the runs.
    """

    key: dict[str, Any]
    rows: list[RunRow]

    @property
    def values(self) -> list[float]:
        """The best metric of every run that has one."""
        return [r.best for r in self.rows if r.best is not None]

    @property
    def mean(self) -> float | None:
        """Mean of :attr:`values`, or None."""
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation of :attr:`values` (None below two values)."""
        return statistics.stdev(self.values) if len(self.values) > 1 else None


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings to dotted keys.

    >>> flatten({"optim": {"lr": 0.1, "betas": [0.9, 0.99]}, "seed": 1})
    {'optim.lr': 0.1, 'optim.betas': [0.9, 0.99], 'seed': 1}
    """
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}."))
    return out


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON file as a mapping; an empty mapping when it is missing or half-written."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_yaml(path: Path) -> dict[str, Any]:
    """A YAML file as a mapping; an empty mapping when it is missing or unreadable."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def split_name(folder: str) -> tuple[str, str]:
    """``(number, name)`` of a run folder (``007_20260101_120000_lr`` -> ``("007", "lr")``)
    or of a sweep point (``003_lr=1e-3`` -> ``("003", "lr=1e-3")``)."""
    match = RUN_DIR_PATTERN.match(folder)
    if match:
        return match.group(1), match.group(4) or ""
    number, _, rest = folder.partition("_")
    return (number, rest) if number.isdigit() else ("", folder)


def is_run(path: Path) -> bool:
    """Whether ``path`` is a run folder (the trainer wrote ``config.yaml`` or ``summary.json``)."""
    return (path / "config.yaml").is_file() or (path / "summary.json").is_file()


def is_sweep(path: Path) -> bool:
    """Whether ``path`` is a sweep folder (it has ``sweep.yaml``)."""
    return (path / "sweep.yaml").is_file()


def load_run(path: Path, config: dict[str, Any] | None = None) -> RunRow:
    """Read one run folder.

    Args:
        path: the run folder (it may not exist yet: a pending sweep point).
        config: flat config to use when the folder has no ``config.yaml`` yet.

    Returns:
        Its :class:`RunRow`.
    """
    path = Path(path)
    number, name = split_name(path.name)
    summary, problem = _read_summary(path / "summary.json")
    flat = flatten(_read_yaml(path / "config.yaml")) or dict(config or {})
    best = summary.get("best") or {}
    seconds = [s for s in (summary.get("wall_seconds"), summary.get("train_seconds")) if s]
    status = summary.get("status") or ("started" if path.is_dir() else "pending")
    if problem is not None:
        status = "corrupt"
    elif status == "running" and lock_state(path) != "live":
        status = STOPPED  # killed (SIGKILL, node failure): no process will ever update it
    step = summary.get("global_step")
    if status in ("running", STOPPED):
        # summary.json is written at the start and the end only: where a live or killed run
        # got to is the last step it logged.
        step = max(step or 0, _last_logged_step(path / "metrics.jsonl") or 0)
    return RunRow(
        path=path,
        number=number,
        name=name,
        status=status,
        step=step,
        total_steps=summary.get("total_steps"),
        metric=best.get("metric") or flat.get("checkpoint.monitor"),
        best=best.get("value"),
        best_step=best.get("step"),
        mode=flat.get("checkpoint.mode") or "min",
        wall_seconds=max(seconds) if seconds else None,
        config=flat,
        task=run_task(path),
        problem=problem,
    )


def _last_logged_step(path: Path, tail_bytes: int = 65536) -> int | None:
    """The ``step`` of the last whole record of a ``metrics.jsonl`` (read from its end only, so
    a long run's file costs the same), or None."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - tail_bytes))
            lines = handle.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            continue  # a torn last line, or the cut first line of the tail
        if isinstance(step, int):
            return step
    return None


def _read_summary(path: Path) -> tuple[dict[str, Any], str | None]:
    """A run's ``summary.json`` and what is wrong with it: ``({}, None)`` when it is missing (a
    run that has not written one yet), ``({}, "<path> is corrupt (...)")`` when it cannot be
    read as a JSON object (the trainer replaces it atomically, so that is damage)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, None
    except (OSError, ValueError) as err:
        return {}, f"{path} is corrupt ({err})"
    if not isinstance(data, dict):
        return {}, f"{path} is corrupt (not a JSON object)"
    return data, None


def sweep_rows(path: Path) -> list[RunRow]:
    """One :class:`RunRow` per point of a sweep, pending points included.

    Raises:
        UserError: ``path`` has no readable ``sweep.yaml``.
    """
    data = _read_yaml(path / "sweep.yaml")
    if not data.get("points"):
        raise UserError(f"'{path}' has no readable sweep.yaml with points; is it a sweep folder?")
    base = flatten(data.get("base_config") or {})
    task = data.get("task")
    rows = []
    for point in data["points"]:
        values = {k: str(v) for k, v in point["values"].items()}
        # A point that has not started has no config.yaml: its config is the base plus its values.
        planned = {**base, **{k: yaml.safe_load(v) for k, v in values.items()}}
        row = load_run(path / point["dir"], planned)
        row.values, row.sweep = values, path
        row.task = row.task or task
        rows.append(row)
    return rows


def list_runs(root: Path) -> list[RunRow]:
    """The run folders directly under ``root``, by number (a sweep folder: its points)."""
    if is_sweep(root):
        return sweep_rows(root)
    folders = [p for p in root.iterdir() if p.is_dir() and is_run(p)]
    rows = [load_run(p) for p in folders]
    return sorted(rows, key=lambda r: (int(r.number) if r.number.isdigit() else math.inf, r.name))


def collect(paths: Sequence[Path]) -> list[RunRow]:
    """Runs of the ``runs compare`` arguments: a run folder is one run, a sweep all its points.

    Raises:
        UserError: a path that is neither.
    """
    rows: list[RunRow] = []
    for path in paths:
        path = Path(path)
        if is_sweep(path):
            rows.extend(sweep_rows(path))
        elif is_run(path):
            rows.append(load_run(path))
        else:
            what = "does not exist" if not path.exists() else "is neither a run folder nor a sweep"
            raise UserError(
                f"'{path}' {what} (a run folder has config.yaml / summary.json, a sweep folder "
                "sweep.yaml); see them with: runs list runs"
            )
    return rows


def differing_keys(rows: Sequence[RunRow]) -> list[str]:
    """Config keys whose value differs between the runs (a key missing from one run counts),
    except :data:`IGNORED_KEYS`; a sweep's axes first, then in config order."""
    if len(rows) < 2:
        return []
    order: dict[str, None] = {}
    for row in rows:  # a sweep's axes first, in their order; then config order
        order.update(dict.fromkeys(row.values))
    for row in rows:
        order.update(dict.fromkeys(row.config))
    missing = object()
    keys = []
    for key in order:
        if key in IGNORED_KEYS:
            continue
        first = rows[0].config.get(key, missing)
        if any(row.config.get(key, missing) != first for row in rows[1:]):
            keys.append(key)
    return keys


def ranked(rows: Sequence[RunRow]) -> list[RunRow]:
    """Rows sorted by their best metric, best first (``mode`` of the first run with one);
    rows without a value last, in their order. Runs of several metrics (``--mixed``) are ranked
    per metric, the metrics in their order of appearance."""
    scored = [r for r in rows if r.best is not None]
    order = {m: i for i, m in enumerate(dict.fromkeys(r.metric for r in scored))}
    sign = {}
    for r in scored:
        sign.setdefault(r.metric, -1.0 if r.mode == "max" else 1.0)
    return sorted(scored, key=lambda r: (order[r.metric], sign[r.metric] * r.best)) + [
        r for r in rows if r.best is None
    ]


def check_comparable(rows: Sequence[RunRow]) -> None:
    """Refuse to rank runs of different tasks or monitored metrics against each other.

    Raises:
        UserError: the tasks / metrics found, with the runs of each.
    """
    for what, attr in (("tasks", "task"), ("monitored metrics", "metric")):
        kinds: dict[str, list[str]] = {}
        for r in rows:
            if getattr(r, attr):
                kinds.setdefault(getattr(r, attr), []).append(r.number or r.path.name)
        if len(kinds) > 1:
            found = "; ".join(f"{k}: {', '.join(v)}" for k, v in kinds.items())
            raise UserError(
                f"runs compare: these runs are of {len(kinds)} different {what} ({found}); "
                "their best values do not rank against each other. Compare runs of one "
                f"{what[:-1]}, or add --mixed to list them together (each metric ranked on "
                "its own)."
            )


def seed_groups(rows: Sequence[RunRow], keys: Sequence[str]) -> list[Group]:
    """Group runs that differ only in ``trainer.seed``; ranked by mean best metric.

    Args:
        rows: the runs.
        keys: the differing keys (``trainer.seed`` among them when there are seeds).

    Returns:
        The groups; empty when no group has more than one run.
    """
    if SEED_KEY not in keys:
        return []
    shared = [k for k in keys if k != SEED_KEY]
    groups: dict[str, Group] = {}
    for row in rows:
        key = {k: row.cell(k) for k in shared}
        groups.setdefault(json.dumps(key, default=str), Group(key, [])).rows.append(row)
    if all(len(g.rows) == 1 for g in groups.values()):
        return []
    sign = -1.0 if rows and rows[0].mode == "max" else 1.0
    return sorted(
        groups.values(), key=lambda g: (g.mean is None, sign * g.mean if g.mean is not None else 0)
    )
