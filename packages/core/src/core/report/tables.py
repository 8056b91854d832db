"""The tables of ``runs list`` and ``runs compare``: cells of rows and seed groups, cut to the
terminal's width, rendered as a text table, Markdown, CSV or JSON.

Self-check: ``python -m core.report`` (lists two runs and compares them as Markdown).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.errors import UserError
from core.report.rows import (
    Group,
    RunRow,
    _read_yaml,
    differing_keys,
    is_sweep,
    ranked,
    seed_groups,
    split_name,
    sweep_rows,
)

FORMATS = ("table", "md", "csv", "json")
KEY_CELL_WIDTH = 24
"""On a terminal, a differing key's column is at most this wide (``--wide``: no limit)."""


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
