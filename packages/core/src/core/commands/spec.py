"""The one declaration a task package makes: :class:`TaskSpec`.

A task package states once, in its ``cli.py``, what core needs to give it the shared commands::

    SPEC = TaskSpec(
        name="summarization",
        config_cls=SummarizationConfig,
        presets=PRESETS_DIR,                       # from the package's config.py
        default_preset=DEFAULT_PRESET,
        task="summarization.task:SummarizationTask",
        estimator="summarization.memory:estimate",
        render="summarization.memory:render",
        description="Fine-tune a seq2seq model ...",
        evaluate=EvaluateSpec(...),               # help texts, splits, the model folder's marker
        infer=InferSpec(...),                     # texts, flags, reading, loading, one row
    )
    train, evaluate, infer = SPEC.train, SPEC.evaluate_command, SPEC.infer_command

and gets ``train`` (with ``--dry-run``), ``evaluate`` and ``infer`` from core
(:mod:`core.commands.train`, :mod:`core.commands.model_io`, :mod:`core.commands.infer`). The task
class, the estimator and the renderer are named as ``module:attribute`` strings, imported only
when a command runs (``--help`` stays fast).

Self-check: ``python -m core.commands.spec`` (the toy task's spec: train --print-config and
--dry-run).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import user_errors_exit_2


def resolve(name: str) -> Any:
    """The object a ``module:attribute`` string names (imported now)."""
    module, _, attribute = name.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class EvaluateSpec:
    """What a task's ``evaluate`` command says and accepts (see :mod:`core.commands.model_io`).

    Attributes:
        description: ``--help`` description.
        epilog: ``--help`` epilog.
        model_help / data_help / split_help / out_help: help of ``--model``, ``--data``,
            ``--split`` and ``--out``.
        splits: accepted ``--split`` names -> the name of the evaluation (the first is the
            default).
        split_error: what follows ``--split 'x':`` when the name is not one of ``splits``.
        marker: the file a trained model folder of the task holds.
        what: what the task's model folder is, for messages.
        fits: whether a bare model folder's ``config.json`` is a model the task can use.
        arguments: adds the task's own flags to the parser.
        check: refuses the task's own flags' bad values (raises ``UserError``).
        raw_epilog: keep the epilog's line breaks.
    """

    description: str
    epilog: str
    model_help: str
    data_help: str
    split_help: str
    out_help: str
    splits: dict[str, str]
    split_error: str
    marker: str = "config.json"
    what: str = "a folder written by save_pretrained"
    fits: Callable[[dict], bool] | None = None
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
    check: Callable[[argparse.Namespace], None] | None = None
    raw_epilog: bool = False

    @property
    def default_split(self) -> str:
        """The split evaluated without ``--split`` or ``--data``."""
        return next(iter(self.splits))


@dataclass(frozen=True)
class TaskSpec:
    """A task package's declaration (see the module docstring).

    Attributes:
        name: the task's name (its ``core.tasks`` entry point, ``manifest.json``'s task).
        config_cls: the root config class (a :class:`core.config.schema.TrainConfig` subclass).
        presets: the folder of the package's YAML presets.
        default_preset: the preset of ``train`` without ``-c``.
        task: ``module:Class`` of the :class:`core.task.base.Task`.
        estimator: ``module:function`` ``cfg -> report`` of ``train --dry-run``.
        render: ``module:function`` ``report -> text`` of ``train --dry-run``.
        description: one line for ``train --help``.
        evaluate: the ``evaluate`` command's texts and checks (None: no ``evaluate``).
        infer: the ``infer`` command's texts, flags and task parts
            (:class:`core.commands.infer.InferSpec`; None: no ``infer``).
        train_prog: the program name in ``train --help``.
    """

    name: str
    config_cls: type
    presets: Path
    default_preset: str | None
    task: str
    estimator: str
    render: str
    description: str
    evaluate: EvaluateSpec | None = None
    infer: Any = None
    train_prog: str = field(default="train")

    def make_task(self, cfg: Any) -> Any:
        """The task for ``cfg`` (its module is imported now)."""
        return resolve(self.task)(cfg)

    def train(self, argv: Sequence[str] | None = None) -> int:
        """``train [-c PRESET|FILE] [key=value ...] [--print-config] [--dry-run]``: core's
        :func:`core.commands.train.train_command`, or with ``--dry-run`` the estimate of the config.

        Returns:
            Exit code (0: completed, or interrupted with a checkpoint; 2: a mistake in the input).
        """
        from core.commands.train import train_command

        args = list(sys.argv[1:] if argv is None else argv)
        if "--dry-run" in args:
            args.remove("--dry-run")
            return self.dry_run(args)
        return train_command(
            args,
            prog=self.train_prog,
            description=self.description,
            config_cls=self.config_cls,
            presets_dir=self.presets,
            make_task=self.make_task,
            default_preset=self.default_preset,
            task=self.name,
        )

    def dry_run(self, argv: list[str]) -> int:
        """``train --dry-run [-c PRESET] [key=value ...] [--json]``: parameters and estimated
        memory per GPU of the config (:func:`core.commands.estimate.dry_run_command`), no
        weights."""
        return _dry_run(self, argv)

    def evaluate_command(self, argv: Sequence[str] | None = None) -> int:
        """``evaluate --model DIR [--data FILE | --split NAME] [--out FILE]``: see
        :func:`core.commands.model_io.evaluate_command`."""
        from core.commands.model_io import evaluate_command

        return evaluate_command(self, argv)

    def infer_command(self, argv: Sequence[str] | None = None) -> int:
        """``infer --model DIR (--prompt TEXT | --data FILE) [--out FILE]``: see
        :func:`core.commands.infer.infer_command`."""
        return self.infer.command(self.name, argv)


@user_errors_exit_2
def _dry_run(spec: TaskSpec, argv: list[str]) -> int:
    """See :meth:`TaskSpec.dry_run`."""
    from core.commands.estimate import dry_run_command

    return dry_run_command(
        argv,
        config_cls=spec.config_cls,
        presets_dir=spec.presets,
        default_preset=spec.default_preset,
        estimate=resolve(spec.estimator),
        render=resolve(spec.render),
    )


def check_helps(commands: dict[str, Callable[..., int]]) -> None:
    """Self-check of a ``cli.py``: every command's ``--help`` exits 0; prints its first line."""
    import contextlib
    import io

    for name, command in commands.items():
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            try:
                command(["--help"])
            except SystemExit as exit_:
                assert exit_.code in (0, None), f"{name} --help exited {exit_.code}"
        print(f"{name:>9} --help: {buffer.getvalue().splitlines()[0]}")


def main(
    commands: dict[str, Callable[..., int]], name: str, check: Callable[[], None] | None = None
) -> None:
    """The ``__main__`` of every task's ``cli.py``: ``python -m <task>.cli COMMAND [args]`` runs
    the command (what the tests and DDP ranks run; ``sys.argv`` stays as it is, so a rank starts
    again with the same command line); without arguments, the module's self-check: every
    command's ``--help`` (:func:`check_helps`), then ``check`` (the module's own), then
    ``<name>: ok``.

    Raises:
        SystemExit: always, with the command's exit code.
    """
    if len(sys.argv) > 1:
        command = sys.argv[1]
        if command not in commands:
            sys.exit(f"unknown command '{command}'; commands: {', '.join(commands)}")
        sys.exit(commands[command](sys.argv[2:]))
    check_helps(commands)
    if check is not None:
        check()
    print(f"{name}: ok")
    sys.exit(0)


if __name__ == "__main__":  # self-check: python -m core.commands.spec
    import contextlib
    import io
    import json

    from core.testing.toy import ToyConfig

    def _toy_estimate(cfg: Any) -> dict[str, Any]:
        return {"max_steps": cfg.trainer.max_steps}

    toy = TaskSpec(
        name="toy",
        config_cls=ToyConfig,
        presets=Path(__file__).parent / "no_presets",
        default_preset=None,
        task="core.testing.toy:ToyTask",
        estimator="__main__:_toy_estimate",
        render="builtins:repr",
        description="the toy task",
    )
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert toy.train(["trainer.max_steps=7", "--print-config"]) == 0
    assert "max_steps: 7" in printed.getvalue(), printed.getvalue()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert toy.train(["--dry-run", "trainer.max_steps=3", "--json"]) == 0
    assert json.loads(printed.getvalue()) == {"max_steps": 3}, printed.getvalue()
    with contextlib.redirect_stderr(io.StringIO()):
        assert toy.train(["--dry-run", "no_such_key=1"]) == 2
    check_helps({"train": toy.train})
    print("core.commands.spec: ok")
