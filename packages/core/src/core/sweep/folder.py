"""The sweep folder: ``sweep.yaml`` (command, base config, axes, points) and the status of each
point's run folder.

Self-check: ``python -m core.sweep`` (covers this module).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from core.errors import UserError
from core.report import STOPPED
from core.run.folder import RUN_DIR_PATTERN, experiment_numbers, lock_state
from core.sweep.axes import Point, SweepSpec

SWEEP_FILE = "sweep.yaml"


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
