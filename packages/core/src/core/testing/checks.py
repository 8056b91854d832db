"""Helpers for the ``python -m`` self-checks of the task packages: a few real training steps in a
temporary folder, so each module's check states only what is its own.

Self-check: ``python -m core.testing.checks`` (the toy task, two steps).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from core.config.loader import load_config

QUIET = ("trainer.accelerator=cpu", "logger.progress_bar=false", "logger.plot=false")
"""Overrides of every self-check run: the CPU, no progress bar, no plots."""


@contextlib.contextmanager
def trained_briefly(
    config_class: type,
    task_class: Callable[[Any], Any],
    overrides: Sequence[str],
    preset: str | None = None,
    presets_dir: Path | None = None,
    prepare: Callable[[Path], None] | None = None,
) -> Iterator[Any]:
    """Train a task with the real :class:`core.engine.trainer.Trainer` in a temporary folder.

    Args:
        config_class: the task's root config class.
        task_class: builds the task from the config.
        overrides: ``key=value`` overrides after :data:`QUIET` and ``run.root``; ``{tmp}`` in
            one stands for the temporary folder.
        preset, presets_dir: the preset to start from (None: the config's defaults).
        prepare: called with the temporary folder before the config is loaded (write data).

    Yields:
        The ``FitResult`` (``status``, ``step``, ``metrics``, ``run_dir``); the folder is removed
        when the block ends. Prints the status, step, metrics and the files of ``final/``.
    """
    from core.engine.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        if prepare is not None:
            prepare(Path(tmp))
        given = [o.replace("{tmp}", tmp) for o in overrides]
        cfg = load_config(config_class, preset, [f"run.root={tmp}", *QUIET, *given], presets_dir)
        result = Trainer(cfg, task_class(cfg), argv=["self-check"]).fit()
        print(result.status, result.step, {k: round(v, 4) for k, v in result.metrics.items()})
        final = Path(result.run_dir) / "final"
        print("final/:", sorted(p.name for p in final.iterdir()) if final.is_dir() else None)
        yield result


if __name__ == "__main__":  # self-check: python -m core.testing.checks
    from core.testing.toy import ToyConfig, ToyTask

    with trained_briefly(ToyConfig, ToyTask, ["trainer.max_steps=2"]) as fit:
        assert fit.status == "completed" and fit.step == 2, (fit.status, fit.step)
        assert (Path(fit.run_dir) / "summary.json").is_file()
    print("core.testing.checks: ok")
