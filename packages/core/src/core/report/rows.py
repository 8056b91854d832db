"""Reading run folders and sweeps into rows, and comparing them (see :mod:`core.report`)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import shutil
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from core.cli import user_errors_exit_2
from core.errors import UserError
from core.logs import read_metrics
from core.outputs import guard_file
from core.runs import RUN_DIR_PATTERN, lock_state, run_task
from core.storage import StorageError, storage_errors

FORMATS = ("table", "md", "csv", "json")
# Differs between any two runs by construction (each run's own folder): never a "differing key".
IGNORED_KEYS = ("run.dir",)
SEED_KEY = "trainer.seed"
PNG_MARK = "core.report runs compare"
"""PNG ``Software`` text of the plots ``runs compare`` writes (only those are ever replaced)."""
STOPPED = "stopped (no live process)"
"""Status shown for a run whose summary says ``running`` but whose training process is gone."""
KEY_CELL_WIDTH = 24
"""On a terminal, a differing key's column is at most this wide (``--wide``: no limit)."""


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


# --------------------------------------------------------------------------------------------
# Reading runs and sweeps
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Comparing
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def _seconds(value: float | None) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    if value is None:
        return "-"
    value = int(round(value))
    if value < 60:
        return f"{value}s"
    if value < 3600:
        return f"{value // 60}m{value % 60:02d}s"
    return f"{value // 3600}h{value % 3600 // 60:02d}m"


def _value(value: Any) -> str:
    """A config value for a table cell."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _metric(value: float | None) -> str:
    """A metric value for a table cell."""
    return "-" if value is None else f"{value:.4f}"


def run_records(rows: Sequence[RunRow], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Rows as plain records (the ``json`` format, and the cells of the others)."""
    return [
        {
            "number": r.number,
            "name": r.name,
            "path": str(r.path),
            "status": r.status,
            "step": r.step,
            "total_steps": r.total_steps,
            "metric": r.metric,
            "best": r.best,
            "best_step": r.best_step,
            "wall_seconds": r.wall_seconds,
            "task": r.task,
            "problem": r.problem,
            "config": {k: r.cell(k) for k in keys},
        }
        for r in rows
    ]


def run_table(
    rows: Sequence[RunRow], keys: Sequence[str], exact: bool = False
) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the runs table: number, name, status, steps, best metric, its step,
    wall time, then one column per differing key.

    Args:
        rows: the runs.
        keys: the differing config keys.
        exact: full-precision numbers and wall time in seconds (for CSV), not rounded for reading.
    """
    metrics = sorted({r.metric for r in rows if r.metric})
    header = [
        "#",
        "run",
        "status",
        "steps",
        "best" if len(metrics) > 1 else f"best {metrics[0] if metrics else ''}".strip(),
        "best step",
        "wall",
        *keys,
    ]
    cells = []
    for r in rows:
        steps = "-" if r.step is None else f"{r.step}/{r.total_steps or '?'}"
        value = repr(r.best) if exact and r.best is not None else _metric(r.best)
        if len(metrics) > 1 and r.best is not None:
            value = f"{r.metric}={value}"
        wall = (
            ("" if r.wall_seconds is None else f"{r.wall_seconds:.1f}")
            if exact
            else _seconds(r.wall_seconds)
        )
        cells.append(
            [
                r.number,
                r.name or r.path.name,
                r.status,
                steps,
                value,
                "-" if r.best_step is None else str(r.best_step),
                wall,
                *(_value(r.cell(k)) for k in keys),
            ]
        )
    return header, cells


def group_table(groups: Sequence[Group]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the seed-group table: shared values, seeds, mean ± std, runs."""
    keys = list(groups[0].key) if groups else []
    metric = next((r.metric for g in groups for r in g.rows if r.metric), "metric")
    header = [*keys, "seeds", f"best {metric} mean ± std", "runs"]
    cells = []
    for g in groups:
        score = _metric(g.mean) + (f" ± {g.std:.4f}" if g.std is not None else "")
        runs = ",".join(r.number for r in g.rows)
        # seeds: runs with a best value / runs in the group (pending or failed runs show here)
        cells.append(
            [*(_value(g.key[k]) for k in keys), f"{len(g.values)}/{len(g.rows)}", score, runs]
        )
    return header, cells


def render(header: Sequence[str], cells: Sequence[Sequence[str]], fmt: str) -> str:
    """A table as aligned text (``table``), Markdown (``md``) or CSV (``csv``)."""
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(cells)
        return out.getvalue().rstrip("\n")
    if fmt == "md":
        escape = [[c.replace("|", "\\|") for c in row] for row in [header, *cells]]
        lines = ["| " + " | ".join(row) + " |" for row in escape]
        lines.insert(1, "|" + "|".join("---" for _ in header) + "|")
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *cells]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cut(text: str, width: int) -> str:
    """``text`` shortened to ``width`` characters, ending in ``…`` when cut."""
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def fit_table(
    header: Sequence[str], cells: Sequence[Sequence[str]], n_keys: int, width: int
) -> tuple[list[str], list[list[str]], str | None]:
    """Cut a runs table (from :func:`run_table`) to ``width`` characters of aligned text.

    Each differing key's column is cut to :data:`KEY_CELL_WIDTH`; then the last key columns are
    left out until the table fits; then the run name is shortened.

    Args:
        header: the header.
        cells: the rows.
        n_keys: how many of the last columns are differing keys (those may be cut or left out).
        width: the terminal's width.

    Returns:
        ``(header, cells, note)``: the note names the left-out keys (None when none were).
    """
    fixed = len(header) - n_keys
    names = list(header[fixed:])
    header = [*header[:fixed], *(_cut(h, KEY_CELL_WIDTH) for h in names)]
    cells = [[*row[:fixed], *(_cut(c, KEY_CELL_WIDTH) for c in row[fixed:])] for row in cells]

    def total(head: Sequence[str], rows: Sequence[Sequence[str]]) -> int:
        columns = range(len(head))
        return sum(max(len(r[i]) for r in [head, *rows]) for i in columns) + 2 * (len(head) - 1)

    left_out: list[str] = []
    while len(header) > fixed and total(header, cells) > width:
        left_out.insert(0, names[len(header) - fixed - 1])
        header, cells = header[:-1], [r[:-1] for r in cells]
    excess = total(header, cells) - width
    if excess > 0:  # the run name (column 1) gives way last
        name_width = max(len(r[1]) for r in [header, *cells])
        keep = max(name_width - excess, 8)
        header = [header[0], _cut(header[1], keep), *header[2:]]
        cells = [[r[0], _cut(r[1], keep), *r[2:]] for r in cells]
    note = None
    if left_out:
        note = _cut(
            f"({len(left_out)} more differing keys not shown, --wide shows them: "
            f"{', '.join(left_out)})",
            width,
        )
    return header, cells, note


def compare_output(rows: Sequence[RunRow], fmt: str, png: Path | None = None) -> str:
    """The ``runs compare`` text: runs ranked by the monitored metric, plus the seed groups.

    Args:
        rows: the runs.
        fmt: one of :data:`FORMATS`.
        png: the plot written, if any (named in the output).

    Returns:
        The text to print.
    """
    keys = differing_keys(rows)
    rows = ranked(rows)
    groups = seed_groups(rows, keys)
    if fmt == "json":
        return json.dumps(
            {
                "metric": next((r.metric for r in rows if r.metric), None),
                "mode": rows[0].mode if rows else None,
                "differing_keys": keys,
                "runs": run_records(rows, keys),
                "groups": [
                    {
                        "config": g.key,
                        "runs": [r.number for r in g.rows],
                        "n": len(g.values),
                        "mean": g.mean,
                        "std": g.std,
                    }
                    for g in groups
                ],
                "png": str(png) if png else None,
            },
            indent=1,
            default=str,
        )
    header, cells = run_table(rows, keys, exact=fmt == "csv")
    if fmt == "csv" and groups:
        # One table: each run carries its seed group's mean and std.
        of = {id(r): g for g in groups for r in g.rows}
        header = [*header, "group mean", "group std", "group n"]
        cells = [
            [*c, repr(of[id(r)].mean), repr(of[id(r)].std), str(len(of[id(r)].values))]
            for c, r in zip(cells, rows, strict=True)
        ]
    parts = [render(header, cells, fmt)]
    if groups and fmt != "csv":
        parts.append(("\n" if fmt == "md" else "") + "over seeds:")
        parts.append(render(*group_table(groups), fmt))
    if png is not None and fmt != "csv":
        parts.append(f"curves: {png}")
    if fmt != "csv":
        parts.extend(f"corrupt: {r.problem}" for r in rows if r.problem)
    return "\n".join(parts)


def compare_sweep_text(path: Path) -> str:
    """The ranked table of a sweep's points (printed when a local sweep ends)."""
    return compare_output(sweep_rows(Path(path)), "table")


def sweep_list_rows(root: Path) -> tuple[list[str], list[list[str]], list[dict[str, Any]]]:
    """One row per sweep folder under ``root``: number, name, task, points done / all, best."""
    header = ["#", "sweep", "task", "completed", "best point", "best"]
    cells, records = [], []
    folders = (
        [p for p in sorted(root.iterdir()) if p.is_dir() and is_sweep(p)] if root.is_dir() else []
    )
    for folder in folders:
        try:
            rows = sweep_rows(folder)
        except UserError:
            continue
        task = _read_yaml(folder / "sweep.yaml").get("task", "?")
        done = sum(r.status == "completed" for r in rows)
        top = ranked(rows)[0] if rows else None
        number, name = split_name(folder.name)
        best = f"{top.metric}={top.best:.4f}" if top and top.best is not None else "-"
        cells.append(
            [
                number,
                name or folder.name,
                task,
                f"{done}/{len(rows)}",
                top.name if top else "-",
                best,
            ]
        )
        records.append(
            {
                "path": str(folder),
                "task": task,
                "completed": done,
                "points": len(rows),
                "best_point": top.name if top else None,
                "best": top.best if top else None,
            }
        )
    return header, cells, records


# --------------------------------------------------------------------------------------------
# The plot
# --------------------------------------------------------------------------------------------


def _ours(path: Path) -> bool:
    """Whether the PNG at ``path`` was written by ``runs compare``."""
    try:
        from PIL import Image

        with Image.open(path) as image:
            return image.info.get("Software") == PNG_MARK
    except Exception:  # noqa: BLE001 - not a readable PNG: certainly not ours
        return False


def plot_compare(
    rows: Sequence[RunRow], out: Path, title: str = "", overwrite: bool = False
) -> Path | None:
    """Overlay the runs' training loss, validation loss and monitored metric over steps.

    Args:
        rows: the runs (one colour each, the same in every panel).
        out: the PNG to write.
        title: figure title.
        overwrite: replace ``out`` even if ``runs compare`` did not write it (``--overwrite``).

    Returns:
        ``out``, or None when no run has logged anything yet.

    Raises:
        UserError: ``out`` exists and was not written by ``runs compare`` (without
            ``overwrite``), or is a file the runs are read from; ``out`` does not end in .png.
    """
    # core.outputs' guard: never over a file the toolkit did not write; its own plot it may
    # replace (the PNG carries PNG_MARK), so running the same comparison again just works.
    inputs = [(r.path / name, "a run") for r in rows for name in ("metrics.jsonl", "summary.json")]
    guard_file(out, "--png", inputs, overwrite=overwrite or (out.is_file() and _ours(out)))
    if out.suffix.lower() != ".png":
        raise UserError(
            f"--png {out}: the plot is a PNG image, so its name must end in .png (e.g. "
            f"--png {out.with_suffix('.png')}); nothing was written."
        )
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    metrics = [r.metric for r in rows if r.metric]
    monitor = max(set(metrics), key=metrics.count) if metrics else None
    panels = ["train/loss", "val/loss"] + ([monitor] if monitor and monitor != "val/loss" else [])
    series: dict[str, list[tuple[RunRow, list[int], list[float]]]] = {p: [] for p in panels}
    for row in rows:
        records = read_metrics(row.path / "metrics.jsonl")
        for panel in panels:
            points = [
                (r["step"], r[panel]) for r in records if isinstance(r.get(panel), (int, float))
            ]
            if points:
                series[panel].append((row, [s for s, _ in points], [v for _, v in points]))
    panels = [p for p in panels if series[p]]
    if not panels:
        return None
    colours = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20")
    colour = {id(r): colours(i % colours.N) for i, r in enumerate(rows)}
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(8, 2.8 * len(panels)), sharex=True, squeeze=False
    )
    for ax, panel in zip(axes[:, 0], panels, strict=True):
        for row, xs, ys in series[panel]:
            marker = "o" if len(xs) < 30 else None
            ax.plot(
                xs, ys, marker=marker, markersize=3, color=colour[id(row)], label=row.label[:48]
            )
        ax.set_ylabel(panel)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="best", fontsize=7, ncol=1 if len(rows) <= 8 else 2)
    axes[-1, 0].set_xlabel("optimizer step")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    # Into a temporary file beside it, then renamed: a full disk leaves the old plot or none,
    # never half a PNG.
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with storage_errors("the comparison plot", out):
            out.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(tmp, dpi=110, format="png", metadata={"Software": PNG_MARK})
            os.replace(tmp, out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out


def default_png(paths: Sequence[Path], rows: Sequence[RunRow]) -> Path:
    """Where ``runs compare`` puts its PNG: ``<sweep>/compare.png`` for one sweep, else
    ``compare_<numbers>.png`` next to the first run."""
    if len(paths) == 1 and is_sweep(Path(paths[0])):
        return Path(paths[0]) / "compare.png"
    numbers = [r.number or r.path.name for r in rows[:6]] + (["etc"] if len(rows) > 6 else [])
    return Path(paths[0]).parent / f"compare_{'_'.join(numbers)}.png"


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def runs_parser() -> argparse.ArgumentParser:
    """The ``runs`` argument parser: sub-commands ``list`` and ``compare``."""
    parser = argparse.ArgumentParser(
        prog="runs",
        description="List and compare training runs and sweeps (read from their run folders).",
        epilog="examples:\n"
        "  runs list                         # every run under runs/, and the sweeps\n"
        "  runs list runs/sweeps/003_20260101_120000_lr\n"
        "  runs compare runs/001_20260101_120000 runs/002_20260101_130000 --format md\n"
        "  runs compare runs/sweeps/003_20260101_120000_lr --format json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{list,compare}")
    listing = sub.add_parser("list", help="one row per run under ROOT (default runs)")
    listing.add_argument("root", nargs="?", type=Path, default=Path("runs"), metavar="ROOT")
    listing.add_argument("--format", choices=FORMATS, default="table")
    listing.add_argument(
        "--wide", action="store_true", help="do not cut the table to the terminal's width"
    )
    compare = sub.add_parser("compare", help="a table and a PNG of several runs or sweeps")
    compare.add_argument("paths", nargs="+", type=Path, metavar="RUN_OR_SWEEP")
    compare.add_argument("--format", choices=FORMATS, default="table")
    compare.add_argument("--png", type=Path, help="where to write the plot (default: see --help)")
    compare.add_argument("--no-png", action="store_true", help="write no plot")
    compare.add_argument(
        "--overwrite", action="store_true", help="replace a --png file runs compare did not write"
    )
    compare.add_argument(
        "--mixed",
        action="store_true",
        help="compare runs of different tasks or monitored metrics (each metric ranked apart)",
    )
    return parser


def terminal_width() -> int | None:
    """The width to fit ``runs list`` to: ``COLUMNS``, else the terminal's; None when the output
    goes to a pipe or file (nothing is cut there)."""
    width = shutil.get_terminal_size(fallback=(0, 0)).columns
    return width if width > 0 else None


def list_command(root: Path, fmt: str, width: int | None = None) -> str:
    """The ``runs list`` text: one table per task (its own differing keys) when several tasks
    share the root, cut to ``width`` characters (``table`` format only).

    Args:
        root: the runs root or a sweep folder.
        fmt: one of :data:`FORMATS`.
        width: the terminal width to fit; None: no limit (``--wide``, a pipe).

    Raises:
        UserError: ``root`` is not a folder.
    """
    if not root.is_dir():
        raise UserError(
            f"'{root}' is not a folder of runs; give the runs root (run.root, default runs) or a "
            "sweep folder: runs list runs/sweeps/NNN_..."
        )
    rows = list_runs(root)
    groups: dict[str | None, list[RunRow]] = {}
    for row in rows:
        groups.setdefault(row.task, []).append(row)
    keys = differing_keys(rows)
    sweep_header, sweep_cells, sweep_records = sweep_list_rows(root / "sweeps")
    if fmt == "json":
        return json.dumps(
            {"differing_keys": keys, "runs": run_records(rows, keys), "sweeps": sweep_records},
            indent=1,
            default=str,
        )
    if fmt == "csv" or len(groups) < 2:
        groups = {None: rows}  # one table (CSV: one header for all rows)
    parts = []
    for task, members in groups.items():
        if len(groups) > 1:
            parts.append(("\n" if parts and fmt == "md" else "") + f"task {task or '?'}:")
        keys = differing_keys(members)
        header, cells = run_table(members, keys, exact=fmt == "csv")
        note = None
        if fmt == "table" and width is not None:
            header, cells, note = fit_table(header, cells, len(keys), width)
        parts.append(render(header, cells, fmt))
        if note:
            parts.append(note)
    if not rows:
        parts = [f"no runs in {root}"]
    for row in rows:
        if row.problem and fmt != "csv":
            parts.append(f"corrupt: {row.problem}")
    if sweep_cells and fmt != "csv":
        parts.append(("\n" if fmt == "md" else "") + f"sweeps in {root / 'sweeps'}:")
        parts.append(render(sweep_header, sweep_cells, fmt))
    return "\n".join(parts)


@user_errors_exit_2
def main(argv: Sequence[str] | None = None) -> int:
    """``runs list|compare ...``; see the module docstring.

    Returns:
        Exit code: 0, or 2 for a path that is not a run, a sweep or a runs root.
    """
    args = runs_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command == "list":
        print(list_command(args.root, args.format, None if args.wide else terminal_width()))
        return 0
    rows = collect(args.paths)
    if not args.mixed:
        check_comparable(rows)
    png, note = None, ""
    if not args.no_png:
        out = args.png or default_png(args.paths, rows)
        names = ", ".join(Path(p).name for p in args.paths)
        title = f"runs compare: {len(rows)} runs of {names[:90]}"
        try:
            png = plot_compare(rows, out, title=title, overwrite=args.overwrite)
        except StorageError as err:
            if args.png is not None:
                raise  # the user asked for that file: not writing it is a failure
            # The default place is beside the runs, which may be a read-only archive: the
            # table is what was asked for, so print it and say where no plot went.
            note = f"note: no plot written ({err}) Give --png PATH elsewhere, or --no-png."
    print(compare_output(rows, args.format, png))
    if note:
        print(" ".join(note.split()), file=sys.stderr)
    return 0
