"""The commands that use a trained model: ``evaluate`` written once for every task, and the
plumbing every task's ``infer`` shares (device and dtype, where the answers go).

:func:`evaluate_command` is the whole ``evaluate`` of a task declared by a
:class:`core.commands.spec.TaskSpec`: parse, check the model folder and the split, load the config
the
model was trained with, check the outputs, then on every rank
(:class:`core.engine.evaluation.Evaluator`)
the task's evaluation hooks (:class:`core.task.base.Task`: ``configure_for_model``,
``evaluation_inputs``, ``load_trained``, ``evaluation_set``, ``evaluation_row``,
``evaluation_scores``), and write the scores and records
(:func:`core.commands.train.write_evaluation`).
No command reaches into a task's attributes.

Self-check: ``python -m core.commands.model_io`` (device / dtype choice, the answer writer, the
removal of a half-written folder).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from core.commands.train import (
    add_model_arguments,
    check_model_dir,
    config_for_model,
    evaluation_outputs,
    parse_model_command,
    write_evaluation,
)
from core.errors import UserError, user_errors_exit_2
from core.task.base import EvaluationRun


def model_parser(
    prog: str, description: str, epilog: str, raw_epilog: bool, **helps: str | None
) -> argparse.ArgumentParser:
    """A parser with :func:`core.commands.train.add_model_arguments` (``helps``: its help texts);
    ``raw_epilog`` keeps the epilog's line breaks."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        **({"formatter_class": argparse.RawDescriptionHelpFormatter} if raw_epilog else {}),
    )
    add_model_arguments(parser, **helps)  # type: ignore[arg-type]
    return parser


def evaluate_parser(spec: Any) -> argparse.ArgumentParser:
    """The ``evaluate`` parser of a task (its :class:`core.commands.spec.EvaluateSpec` texts and
    flags)."""
    ev = spec.evaluate
    parser = model_parser(
        "evaluate",
        ev.description,
        ev.epilog,
        ev.raw_epilog,
        model_help=ev.model_help,
        data_help=ev.data_help,
        split_help=ev.split_help,
        out_help=ev.out_help,
    )
    if ev.arguments is not None:
        ev.arguments(parser)
    return parser


def parse_evaluate(spec: Any, argv: Sequence[str] | None) -> tuple[argparse.Namespace, str]:
    """Parse and check ``evaluate``'s arguments (nothing loaded yet).

    Returns:
        ``(arguments, split)``.

    Raises:
        UserError: a model folder the task cannot use, a bad flag of the task, an unknown split.
    """
    ev = spec.evaluate
    args = parse_model_command(evaluate_parser(spec), argv)
    check_model_dir(args.model, ev.marker, ev.what, task=spec.name, fits=ev.fits)
    if ev.check is not None:
        ev.check(args)
    split = args.split or ev.default_split
    if args.data is None and split not in ev.splits:
        raise UserError(f"--split {split!r}: {ev.split_error}")
    return args, split


@user_errors_exit_2
def evaluate_command(spec: Any, argv: Sequence[str] | None = None) -> int:
    """``evaluate --model DIR [--data FILE | --split NAME] [--out FILE] [-c ...] [key=value ...]``
    of the task ``spec`` declares: the task's metrics of a trained model on every rank
    (``trainer.devices=N``), printed as one JSON line; the records go to ``--out``, or, for a
    run's model, to ``<run>/eval/<name>.jsonl`` with the scores beside them.

    Returns:
        Exit code (0; 2 for a mistake the user can fix; 1 for a full or read-only disk).
    """
    args, split = parse_evaluate(spec, argv)
    cfg = config_for_model(
        args.model, args.config, args.overrides, spec.config_cls, spec.presets, spec.default_preset
    )
    task = spec.make_task(cfg)
    task.configure_for_model(args.model, args.overrides)
    name = args.data.stem if args.data is not None else spec.evaluate.splits[split]
    inputs = [(args.data, "--data"), *task.evaluation_inputs(args.data, split)]
    records_path, scores_path = evaluation_outputs(
        args.model, name, args.out, args.overwrite, inputs, cfg
    )
    from core.engine.evaluation import Evaluator
    from core.run.logs import transformers_quiet

    transformers_quiet()
    evaluator = Evaluator(cfg, task)
    module = task.load_trained(args.model, args, evaluator.fabric)
    dataset = task.evaluation_set(args.data, split, args, evaluator.is_global_zero)
    result = evaluator.run(evaluator.setup_model(module), dataset)
    if evaluator.is_global_zero:
        facts = EvaluationRun(
            args.model,
            args.data,
            split,
            evaluator.fabric.world_size,
            records_path,
            len(result.records),
        )
        rows = [task.evaluation_row(r) for r in result.records]
        write_evaluation(
            records_path, scores_path, rows, task.evaluation_scores(result.metrics, facts)
        )
    return 0


# --------------------------------------------------------------------------------------------
# infer: one device and dtype choice, one way to hand the answers out
# --------------------------------------------------------------------------------------------


def inference_device(choice: str | None = "auto") -> Any:
    """The ``torch.device`` of ``--device``: ``auto`` (or None) is CUDA when a GPU is visible,
    else the CPU; anything else as given.

    Raises:
        UserError: ``cuda`` when no CUDA GPU is visible.
    """
    import torch

    if choice in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible here; use --device cpu.")
    return torch.device(choice)


def inference_dtype(choice: str, device: Any) -> str:
    """The dtype name of ``--dtype``: ``auto`` is bfloat16 on a GPU that supports it, else
    float32; anything else as given."""
    import torch

    if choice != "auto":
        return choice
    cuda = str(device).startswith("cuda")
    return "bfloat16" if cuda and torch.cuda.is_bf16_supported() else "float32"


def emit_rows(rows: list[dict[str, Any]], out: Path | None, single: str | None, what: str) -> None:
    """Hand out the answers of ``infer``: to ``out`` as JSONL (a note on stderr), else the
    ``single`` field of the one answer to a ``--prompt`` as plain text, else one JSON line per
    row on stdout.

    Args:
        rows: one dict per answer.
        out: ``--out``, already checked (:func:`core.run.outputs.guard_file`), or None.
        single: the field printed alone (None: JSON lines).
        what: the rows, in words, for the note (``answers``, ``summaries``).
    """
    if out is not None:
        from core.run.outputs import write_jsonl

        write_jsonl(out, rows)
        print(f"wrote {len(rows)} {what} to {out}", file=sys.stderr)
    elif single is not None:
        print(rows[0][single])
    else:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))


@contextlib.contextmanager
def removed_if_half_made(out: Path, clear: bool = True) -> Iterator[None]:
    """Remove what a command wrote into the folder ``out`` when a full or read-only disk stops it
    (a :class:`core.run.storage.StorageError` inside), then raise again: a half-written model or
    data set must not look like a whole one.

    Args:
        out: the output folder.
        clear: when ``out`` existed before: empty it (True), or leave it as it is (False). A
            folder that did not exist is removed either way.
    """
    import shutil

    from core.run.storage import StorageError

    existed = out.is_dir()
    try:
        yield
    except StorageError:
        if not existed:
            shutil.rmtree(out, ignore_errors=True)
        elif clear:
            for child in out.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        raise


if __name__ == "__main__":  # self-check: python -m core.commands.model_io
    import io
    import tempfile

    assert inference_device("cpu").type == "cpu"
    assert inference_dtype("float16", "cpu") == "float16"
    assert inference_dtype("auto", inference_device("cpu")) == "float32"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        emit_rows([{"id": "a", "answer": "4"}], None, "answer", "answers")
        emit_rows([{"id": "a", "answer": "4"}, {"id": "b", "answer": "5"}], None, None, "answers")
    assert printed.getvalue().splitlines() == [
        "4",
        '{"id": "a", "answer": "4"}',
        '{"id": "b", "answer": "5"}',
    ]
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(io.StringIO()):
        emit_rows([{"id": "a"}], Path(tmp) / "out.jsonl", "id", "answers")
        assert (Path(tmp) / "out.jsonl").read_text().strip() == '{"id": "a"}'
        from core.run.storage import StorageError

        for made, clear in ((Path(tmp) / "new", True), (Path(tmp), False)):
            try:
                with removed_if_half_made(made, clear):
                    made.mkdir(exist_ok=True)
                    (made / "half.bin").write_bytes(b"1")
                    raise StorageError("disk full")
            except StorageError:
                pass
        assert not (Path(tmp) / "new").exists() and (Path(tmp) / "half.bin").exists()
    print("core.commands.model_io: ok")
