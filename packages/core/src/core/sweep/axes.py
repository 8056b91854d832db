"""The grid of a sweep: the axes and fixed overrides of a command line, the points of their
cartesian product (last axis fastest) and the points' folder names.

Self-check: ``python -m core.sweep`` (runs this module's doctests).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from core.errors import UserError

# Keys the sweep sets itself for every point; an axis or override of them would fight it.
RESERVED_KEYS = ("run.dir", "run.name", "logger.wandb_group")
SEED_KEY = "trainer.seed"

TrainFn = Callable[[Sequence[str]], int]


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
