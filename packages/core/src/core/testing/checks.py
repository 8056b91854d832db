"""Helpers for the ``python -m`` self-checks of the task packages (a config tree checked, a refusal
checked, a few real training steps in a temporary folder), so each module's check states only
what is its own.

Self-check: ``python -m core.testing.checks`` (the toy config, a refusal, two training steps).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from core.config.loader import iter_keys, list_presets, load_config
from core.errors import UserError

QUIET = ("trainer.accelerator=cpu", "logger.progress_bar=false", "logger.plot=false")
"""Overrides of every self-check run: the CPU, no progress bar, no plots."""


def check_config(
    config_class: type, presets_dir: Path | None = None, default: str | None = None
) -> int:
    """Check a root config class: every key has a docstring, every preset in ``presets_dir``
    loads, the ``default`` preset exists.

    Returns:
        The number of keys.
    """
    keys = list(iter_keys(config_class))
    missing = [key for key, _, doc in keys if not doc]
    assert not missing, f"fields without a docstring: {missing}"
    for preset in list_presets(presets_dir):
        load_config(config_class, preset, [], presets_dir)
    assert default is None or (Path(presets_dir) / f"{default}.yaml").is_file(), default
    print(f"{config_class.__name__}: {len(keys)} keys, all documented; presets load")
    return len(keys)


def refused(call: Callable[[], Any], *words: str) -> str:
    """Run ``call``, which must raise a ``UserError`` (``ConfigError`` included) whose message
    holds each of ``words``.

    Returns:
        The message (printed, shortened).
    """
    try:
        call()
    except UserError as err:
        message = str(err)
    else:
        raise AssertionError(f"not refused: {words}")
    assert all(w in message for w in words), (words, message)
    print("refused as expected:", message[:90], "...")
    return message


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

    assert check_config(ToyConfig) > 50
    refused(lambda: load_config(ToyConfig, overrides=["run.name=a/b"]), "run.name", "'/'")
    with trained_briefly(ToyConfig, ToyTask, ["trainer.max_steps=2"]) as fit:
        assert fit.status == "completed" and fit.step == 2, (fit.status, fit.step)
        assert (Path(fit.run_dir) / "summary.json").is_file()
    print("core.testing.checks: ok")
