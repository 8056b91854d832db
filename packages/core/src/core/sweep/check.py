"""Checking a sweep before anything is created: every point's config is resolved with the task's
own ``train --print-config`` and must be valid and differ from the others.

Self-check: ``python -m core.sweep`` (refuses four wrong axes).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import yaml

from core.errors import UserError
from core.report import flatten
from core.sweep.axes import Point, SweepSpec, TrainFn


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
