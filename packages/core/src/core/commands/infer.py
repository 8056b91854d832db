"""``infer`` written once for every task: a task declares an :class:`InferSpec` (its texts, its
own flags and checks, how to read prompts, how to load a model that answers them, one output row)
and gets the command::

    infer --model DIR (--prompt TEXT | --data FILE.jsonl) [--out FILE] [--overwrite]
          [--max-new-tokens N] [--batch-size N] [--device ...] [--dtype ...] [sampling flags]
          [--max-input-tokens N] [-c PRESET|FILE] [key=value ...]

What every task's ``infer`` does alike lives here: the generation and input / output flags, the
checks before any loading (the model folder, a prompt or a file of them, ``--out`` never onto an
input), reading the prompts, the interactive loop on a terminal, one truncation note, and where the
answers go (:func:`core.commands.model_io.emit_rows`). What a task does its own way is the
:class:`Answerer` it loads: a callable from records to generated texts, counting what it cuts.

Self-check: ``python -m core.commands.infer`` (a word-reversing answerer through the whole
command: --prompt, --data with --out, the guard, the interactive loop, the truncation note).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from core.commands.model_io import emit_rows, model_parser
from core.commands.train import check_model_dir, parse_model_command
from core.errors import UserError, user_errors_exit_2
from core.run.outputs import guard_file
from core.task.truncation import Truncation, add_option, input_limit, model_limit


class Answerer(Protocol):
    """A loaded model answering records (what :attr:`InferSpec.load` returns).

    Attributes:
        cut: the prompts cut to the input limit, noted once after the answers.
    """

    cut: Truncation

    def __call__(self, records: list[Any]) -> list[str]:
        """The generated text of every record, in order."""
        ...


@dataclass(frozen=True)
class InferSpec:
    """What a task's ``infer`` says, accepts and does (see the module docstring).

    Attributes:
        prog: the program name in usage lines and messages.
        description / epilog: ``--help`` texts (``raw_epilog``: keep the epilog's line breaks).
        model_help / data_help / prompt_help / out_help: help of the shared flags.
        missing: the message when neither ``--prompt`` nor ``--data`` is given (and no terminal
            for the interactive mode).
        read: ``args -> records`` of ``--data`` or ``--prompt`` (raises ``UserError``).
        load: ``args -> Answerer``, the model loaded once.
        row: ``(record, text) -> dict``, one output row.
        single: the row's field ``--prompt`` prints alone.
        what: the rows, in words (``wrote 3 answers to ...``).
        limit_help: what ``--max-input-tokens`` is when not given.
        max_new_tokens: default of ``--max-new-tokens`` (None: no such flag).
        batch_size: default of ``--batch-size`` (None: no such flag); ``batch_what``: what a
            batch holds, for its help.
        device_default / device_choices: ``--device``'s default and its accepted values (None:
            any device name).
        dtype: whether there is a ``--dtype`` flag.
        sampling: whether there are sampling flags (:func:`add_sampling_arguments`).
        arguments: adds the task's own flags.
        check: refuses the task's own flags' bad values, before any loading.
        inputs: ``args -> [(path, flag)]``, more inputs ``--out`` must not overwrite.
        fits / marker / model_what: the check of ``--model`` (``check_model``: whether to check).
        terminal: ``line -> record`` of the interactive mode (None: no interactive mode);
            ``terminal_label``: its input prompt; ``banner``: ``(args, answerer) -> text`` said
            once on stderr.
    """

    description: str
    epilog: str
    model_help: str
    data_help: str
    prompt_help: str
    out_help: str
    missing: str
    read: Callable[[argparse.Namespace], list[Any]]
    load: Callable[[argparse.Namespace], Answerer]
    row: Callable[[Any, str], dict[str, Any]]
    single: str
    limit_help: str
    what: str = "answers"
    prog: str = "infer"
    raw_epilog: bool = False
    max_new_tokens: int | None = None
    batch_size: int | None = None
    batch_what: str = "prompts"
    device_default: str | None = "auto"
    device_choices: Sequence[str] | None = None
    dtype: bool = False
    sampling: bool = False
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
    check: Callable[[argparse.Namespace], None] | None = None
    inputs: Callable[[argparse.Namespace], list[tuple[Path, str]]] | None = None
    check_model: bool = True
    fits: Callable[[dict], bool] | None = None
    marker: str = "config.json"
    model_what: str = "a folder written by save_pretrained"
    terminal: Callable[[str], Any] | None = None
    terminal_label: str = "prompt"
    banner: Callable[[argparse.Namespace, Any], str] | None = None

    def command(self, task: str, argv: Sequence[str] | None = None) -> int:
        """``infer`` of the task named ``task``: see :func:`infer_command`."""
        return infer_command(self, task, argv)


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """``--greedy``, ``--temperature``, ``--top-p``, ``--top-k``, ``--repetition-penalty`` and
    ``--seed`` (see :func:`sampling_settings`)."""
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument(
        "--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)"
    )
    parser.add_argument(
        "--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)"
    )
    parser.add_argument(
        "--top-k", type=int, default=50, help="sample among the k most likely tokens (default 50)"
    )
    parser.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="> 1 discourages repeats (default 1.0)",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")


def sampling_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The ``generate`` keyword arguments of the sampling flags (``do_sample`` unless
    ``--greedy``)."""
    return dict(
        do_sample=not args.greedy,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
    )


def infer_parser(spec: InferSpec) -> argparse.ArgumentParser:
    """The ``infer`` parser of a task: the shared flags, then the task's own."""
    parser = model_parser(
        spec.prog,
        spec.description,
        spec.epilog,
        spec.raw_epilog,
        model_help=spec.model_help,
        data_help=spec.data_help,
        prompt_help=spec.prompt_help,
        out_help=spec.out_help,
    )
    if spec.arguments is not None:
        spec.arguments(parser)
    if spec.max_new_tokens is not None:
        parser.add_argument(
            "--max-new-tokens",
            type=int,
            default=spec.max_new_tokens,
            help=f"most tokens to generate (default {spec.max_new_tokens})",
        )
    if spec.sampling:
        add_sampling_arguments(parser)
    if spec.batch_size is not None:
        parser.add_argument(
            "--batch-size",
            type=int,
            default=spec.batch_size,
            help=f"{spec.batch_what} per generate() call (default {spec.batch_size})",
        )
    _add_device_arguments(parser, spec)
    add_option(parser, spec.limit_help)
    return parser


def add_device_argument(
    parser: argparse.ArgumentParser,
    default: str | None = "auto",
    choices: Sequence[str] | None = None,
) -> None:
    """``--device``: ``auto`` (or None) is CUDA when available
    (:func:`core.commands.model_io.inference_device`); ``choices`` limits the names (None: any
    device name, ``cuda:1`` too)."""
    parser.add_argument(
        "--device",
        default=default,
        choices=choices,
        help="cpu, cuda, cuda:1, ... (default: cuda when available)"
        if choices is None
        else "default: CUDA when available",
    )


def _add_device_arguments(parser: argparse.ArgumentParser, spec: InferSpec) -> None:
    """``--device`` (and ``--dtype``) as the spec declares them."""
    add_device_argument(parser, spec.device_default, spec.device_choices)
    if spec.dtype:
        parser.add_argument(
            "--dtype",
            choices=["auto", "bfloat16", "float16", "float32"],
            default="auto",
            help="weights dtype (default: bfloat16 on a GPU that supports it, else float32)",
        )


def check_infer(spec: InferSpec, task: str, args: argparse.Namespace) -> bool:
    """Refuse what ``infer`` cannot run with, before any loading: a model folder of another
    kind, neither ``--prompt`` nor ``--data`` (off a terminal), a temperature of 0 without
    ``--greedy``, the task's own bad values, an ``--out`` onto an input or another file.

    Returns:
        Whether to answer interactively (neither ``--prompt`` nor ``--data``, on a terminal).
    """
    if spec.check_model:
        check_model_dir(args.model, spec.marker, spec.model_what, task=task, fits=spec.fits)
    interactive = args.prompt is None and args.data is None
    if interactive and (spec.terminal is None or not sys.stdin.isatty()):
        raise UserError(spec.missing)
    if spec.sampling and args.temperature <= 0 and not args.greedy:
        raise UserError("--temperature must be positive (or use --greedy).")
    if spec.check is not None:
        spec.check(args)
    if args.out is not None:
        inputs = [(args.data, "--data"), *(spec.inputs(args) if spec.inputs else [])]
        guard_file(args.out, "--out", inputs, args.overwrite)
    return interactive


@user_errors_exit_2
def infer_command(spec: InferSpec, task: str, argv: Sequence[str] | None = None) -> int:
    """``infer --model DIR (--prompt TEXT | --data FILE) [--out FILE]`` of a task: check, read
    the prompts, load the model once, answer, note what was cut, hand out the answers
    (:func:`core.commands.model_io.emit_rows`; ``--prompt`` prints its answer alone). Without
    ``--prompt`` / ``--data`` on a terminal (where the task has one): the interactive loop.

    Returns:
        Exit code (0; 2 for a mistake the user can fix; 1 for a full or read-only disk).
    """
    from core.run.logs import transformers_quiet

    args = parse_model_command(infer_parser(spec), argv)
    interactive = check_infer(spec, task, args)
    transformers_quiet()
    records = [] if interactive else spec.read(args)
    answer = spec.load(args)
    if interactive:
        assert spec.terminal is not None  # check_infer refuses interactive without it
        banner = spec.banner(args, answer) if spec.banner is not None else ""
        interact(answer, spec.terminal, spec.terminal_label, banner)
        return 0
    rows = [spec.row(r, t) for r, t in zip(records, answer(records), strict=True)]
    answer.cut.report()
    single = args.prompt is not None
    emit_rows(rows, None if single else args.out, spec.single if single else None, spec.what)
    return 0


def interact(answer: Answerer, record: Callable[[str], Any], label: str, banner: str) -> None:
    """Answer lines typed on the terminal until an empty line (or end of input); a note for each
    line that was cut.

    Args:
        answer: the loaded model.
        record: ``line -> record``.
        label: the input prompt (``label> ``).
        banner: said once on stderr first (empty: nothing).
    """
    if banner:
        print(banner, file=sys.stderr)
    while True:
        try:
            line = input(f"{label}> ").strip()
        except EOFError:
            break
        if not line:
            break
        cut = answer.cut
        answer.cut = Truncation(cut.limit, cut.origin, cut.what)  # a note for each cut line
        text = answer([record(line)])[0]
        answer.cut.report()
        print(text)


def prompt_truncation(
    model: Any,
    tokenizer: Any,
    option: int | None,
    reserve: int,
    trained: int | None = None,
    trained_key: str = "",
) -> Truncation:
    """The :class:`core.task.truncation.Truncation` of ``infer``'s prompts: ``--max-input-tokens``,
    else the smaller of what the model was trained with and its positions less ``reserve``.

    Args:
        model: the loaded model (its ``config`` gives the positions).
        tokenizer: its tokenizer (``model_max_length``).
        option: ``--max-input-tokens`` (None: not given).
        reserve: the tokens to generate.
        trained: the input length of training (None: unknown); ``trained_key``: its name.

    Raises:
        UserError: ``--max-input-tokens`` below 1 or above what the model takes.
    """
    hard = model_limit(getattr(model, "config", None), tokenizer, reserve=reserve)
    limit, origin = input_limit(option, trained, hard, trained_key)
    return Truncation(limit, origin, "prompts")


def trained_setting(model_dir: Path, section: str, key: str) -> int | None:
    """A positive integer setting (``data.max_length``, ...) of the run whose ``final/`` (or
    checkpoint) ``model_dir`` is; None for a model folder of its own or a run without the key."""
    from core.commands.train import run_of_model
    from core.config.loader import read_yaml

    run = run_of_model(model_dir)
    if run is None or not (run / "config.yaml").is_file():
        return None
    value = (read_yaml(run / "config.yaml").get(section) or {}).get(key)
    return value if isinstance(value, int) and value > 0 else None


def read_prompt_rows(path: Path, field: str, hint: str) -> list[tuple[str, dict[str, Any], str]]:
    """``(id, row, where)`` of every row of an ``infer --data`` file: a JSON object with a
    non-empty text ``field``; the id is the row's ``id``, else its line number.

    Args:
        path: the ``--data`` file (JSONL / JSON).
        field: the text field every row needs (``prompt``, ...).
        hint: what else a row may hold, for the message (``(and optionally 'images': [paths])``).

    Raises:
        UserError: an unreadable file, or a row without the text (file and line named).
    """
    from core.task.records import read_all

    rows = []
    for record in read_all(path, "--data", what="questions", allow_folders=False):
        row = record.value
        if (
            not isinstance(row, dict)
            or not isinstance(row.get(field), str)
            or not row[field].strip()
        ):
            raise UserError(f"{record.where}: each row needs a non-empty text '{field}' {hint}.")
        rows.append((str(row.get("id", record.line)), row, record.where))
    return rows


if __name__ == "__main__":  # self-check: python -m core.commands.infer
    import contextlib
    import io
    import json
    import tempfile

    class _Reverse:
        """Answers with the prompt's words reversed; prompts are cut to 3 words."""

        def __init__(self, args: argparse.Namespace) -> None:
            self.cut = prompt_truncation(None, None, args.max_input_tokens, 0, 3, "the default")

        def __call__(self, records: list[str]) -> list[str]:
            return [" ".join(reversed(self.cut.apply(r.split()))) for r in records]

    reverse = InferSpec(
        description="Reverse the words of prompts.",
        epilog="",
        model_help="any folder",
        data_help="JSONL of {prompt}",
        prompt_help="one prompt",
        out_help="JSONL",
        missing="Give --prompt TEXT or --data FILE.",
        read=lambda a: (
            [a.prompt]
            if a.prompt is not None
            else [row["prompt"] for _, row, _ in read_prompt_rows(a.data, "prompt", "")]
        ),
        load=_Reverse,
        row=lambda record, text: {"prompt": record, "answer": text},
        single="answer",
        limit_help="3 words",
        check_model=False,
    )
    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "q.jsonl", Path(tmp) / "a.jsonl"
        data.write_text('{"prompt": "a b"}\n{"prompt": "one two three four"}\n', encoding="utf-8")
        base = ["--model", tmp, "--data", str(data), "--out"]
        printed, said = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(said):
            assert reverse.command("toy", ["--model", tmp, "--prompt", "x y"]) == 0
            assert reverse.command("toy", [*base, str(out)]) == 0
            assert reverse.command("toy", [*base, str(data)]) == 2  # never onto its input
        answers = [json.loads(line)["answer"] for line in out.read_text().splitlines()]
    assert printed.getvalue() == "y x\n", printed.getvalue()
    assert answers == ["b a", "three two one"], answers
    assert "1 of 2 prompts were longer than 3 tokens" in said.getvalue(), said.getvalue()
    assert "is the input file of --data" in said.getvalue(), said.getvalue()
    print("core.commands.infer: ok")
