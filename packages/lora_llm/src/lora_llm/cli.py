"""Commands of ``lora_llm``: core's ``train`` (with ``--dry-run``; ``estimate`` is its older
name), ``evaluate`` and ``infer`` (declared in ``SPEC``), ``merge`` (core's
:mod:`core.commands.merge`, declared in ``MERGE``) and ``prepare`` (the data exactly as ``train``
reads it, written out). Scripts: ``lora-llm-train``, ``lora-llm-prepare``, ``lora-llm-merge``;
every command also runs as ``python -m lora_llm.cli <command> ...``.

Self-check: ``python -m lora_llm.cli`` (no arguments).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from core.commands.infer import InferSpec
from core.commands.merge import Loaded, MergeSpec
from core.commands.spec import EvaluateSpec, TaskSpec
from core.commands.train import parse_train_args
from core.errors import UserError, user_errors_exit_2
from core.run.outputs import guard_folder, mark_folder, write_jsonl, write_text
from core.task.truncation import add_option
from lora_llm.config import DEFAULT_PRESET, PRESETS, PRESETS_DIR, DataConfig, LoraLLMConfig

TRAIN_HELP = (
    "LoRA / QLoRA fine-tuning of a causal LM (peft + bitsandbytes). "
    "Add --dry-run to print parameters, trainable parameters and the estimated GPU memory without "
    "loading weights."
)


def _base_arguments(parser: argparse.ArgumentParser) -> None:
    """``--base`` and ``--quant``: the base model under the adapter and how it is loaded."""
    parser.add_argument("--base", help=MergeSpec.base_help)
    parser.add_argument(
        "--quant",
        choices=["auto", "4", "8", "none"],
        default="auto",
        help="load the base in 4/8 bits; auto: as in training",
    )


def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """``evaluate``'s own flags: the base, ``--max-new-tokens`` and ``--max-input-tokens``."""
    _base_arguments(parser)
    parser.add_argument(
        "--max-new-tokens", type=int, default=128, help="tokens to generate at most (default 128)"
    )
    add_option(
        parser,
        "the model's positions less --max-new-tokens; at most data.max_length less "
        "data.min_response_tokens",
    )


def _check_evaluate(args: argparse.Namespace) -> None:
    """Refuse a negative ``--max-new-tokens``."""
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: use 0 (no generation) or more.")


def estimate(argv: list[str] | None = None) -> int:
    """``estimate [-c PRESET] [key=value ...] [--json]``: ``train --dry-run`` under its older name
    (parameters and training memory, no weights loaded); returns the exit code."""
    return SPEC.dry_run(list(sys.argv[1:] if argv is None else argv))


# -- prepare ---------------------------------------------------------------------------------


def prepare_parser() -> argparse.ArgumentParser:
    """Arguments of ``prepare``."""
    parser = argparse.ArgumentParser(
        prog="lora-llm-prepare",
        description="Check and tokenize instruction / chat data; write processed JSONL and a "
        "statistics report.",
        epilog="example: lora-llm-prepare -c tiny --data my_data.jsonl --out prepared/ "
        "data.max_length=512",
    )
    preset = f"preset or YAML file (default: {DEFAULT_PRESET})"
    parser.add_argument(
        "-c", "--config", metavar="PRESET|FILE", default=DEFAULT_PRESET, help=preset
    )
    for flag, what, key in (("--data", "training", "train"), ("--val-data", "validation", "val")):
        help_text = f"{what} data (replaces data.{key}_files)"
        parser.add_argument(flag, nargs="+", metavar="FILE", help=help_text)
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    overwrite = (
        "write into an --out folder that holds other files (train.jsonl / val.jsonl / "
        "stats.json are replaced)"
    )
    parser.add_argument("--overwrite", action="store_true", help=overwrite)
    overrides = "config overrides, e.g. data.max_length=512"
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=overrides)
    return parser


@user_errors_exit_2
def prepare(argv: list[str] | None = None) -> int:
    """``prepare [-c PRESET] [--data FILE ...] [--val-data FILE ...] --out DIR [key=value ...]``.

    Reads and checks the records exactly as ``train`` would (same tokenizer, template, length
    policy, split), and writes ``train.jsonl`` / ``val.jsonl`` (one sample per line: source,
    template, token counts, decoded text, ``input_ids`` and ``labels``; ``train`` accepts these
    files as pre-tokenized data) and ``stats.json`` (counts, length percentiles, truncation);
    returns the exit code."""
    args = prepare_parser().parse_args(sys.argv[1:] if argv is None else argv)
    files = {"train": args.data, "val": args.val_data}
    overrides = [f"data.{k}_files={json.dumps(v)}" for k, v in files.items() if v]
    overrides = [*args.overrides, *overrides]
    cfg, _ = parse_train_args(
        ["-c", args.config, *overrides],
        prog="prepare",
        description="",
        config_cls=LoraLLMConfig,
        presets_dir=PRESETS,
    )
    inputs = [
        (Path(f), "--data")
        for f in cfg.data.train_files + cfg.data.val_files
        if not str(f).startswith("sample:")
    ]
    guard_folder(args.out, "--out", "lora-llm-prepare", inputs, overwrite=args.overwrite)
    task = SPEC.make_task(cfg)
    task.setup()
    mark_folder(args.out, "lora-llm-prepare")
    write_prepared(args.out, task)
    return 0


def write_prepared(out: Path, task: Any) -> None:
    """``train.jsonl`` / ``val.jsonl`` and ``stats.json`` of a set-up task into ``out``, and the
    statistics on stdout."""
    cfg, tokenizer = task.cfg, task.tokenizer
    counts = {"train": write_examples(out / "train.jsonl", task.train_data.examples, tokenizer)}
    if task.val_data is not None:
        counts["val"] = write_examples(out / "val.jsonl", task.val_data.examples, tokenizer)
    stats = {split: s.summary(cfg.data.max_length) for split, s in task.stats.items()}
    report = {
        "tokenizer": tokenizer.name_or_path,
        "template": cfg.data.template,
        "chat_source": task.encoder.chat_source,
        **stats,
    }
    write_text(out / "stats.json", json.dumps(report, indent=1, ensure_ascii=False))
    for split, s in task.stats.items():
        print(s.describe(split))
    print(
        f"wrote {', '.join(f'{n} {k} samples' for k, n in counts.items())} and stats.json to {out}"
    )


def write_examples(path: Path, examples: list[dict[str, Any]], tokenizer: Any) -> int:
    """Write encoded examples as JSON lines (with their decoded text) atomically; how many."""
    keys = ("source", "style", "prompt_tokens", "response_tokens", "cut_tokens")
    rows = [
        {
            **{k: e[k] for k in keys},
            "text": tokenizer.decode(e["input_ids"]),
            "input_ids": e["input_ids"],
            "labels": e["labels"],
        }
        for e in examples
    ]
    return write_jsonl(path, rows)


# -- infer -----------------------------------------------------------------------------------


def _infer_arguments(parser: argparse.ArgumentParser) -> None:
    """``infer``'s own flags: ``--context``, the base and how it is loaded."""
    parser.add_argument("--context", default="", help="the 'input' field that goes with --prompt")
    _base_arguments(parser)


def _check_infer(args: argparse.Namespace) -> None:
    """Refuse ``--out`` without ``--data``."""
    if args.out is not None and args.data is None:
        raise UserError("--out goes with --data (a file of prompts); --prompt prints its answer.")


def read_prompts(args: argparse.Namespace) -> list[Any]:
    """The :class:`lora_llm.data.Record` of ``--prompt`` (with ``--context``), or those of
    ``--data``; ``UserError`` for an unreadable ``--data`` or one without records."""
    from lora_llm.data import Record, read_records

    if args.data is None:
        return [Record(source="--prompt", instruction=args.prompt, input=args.context)]
    records, _ = read_records(str(args.data), DataConfig(), for_inference=True, key="--data")
    if not records:
        raise UserError(f"--data '{args.data}' holds no records.")
    return records


class Answerer:
    """Base + adapter (from ``infer``'s parsed ``args``: model, base, quant, device, sampling
    flags) answering records prompted as in training; prompts longer than the limit are cut
    (their start and their template's end) and counted in :attr:`cut`."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from core.commands.infer import prompt_truncation, sampling_settings
        from core.commands.model_io import inference_device
        from lora_llm.task import load_for_generation

        self.model, self.tokenizer, self.encoder, self.base = load_for_generation(
            args.model, args.base, args.quant, inference_device(args.device)
        )
        self.cut = prompt_truncation(
            self.model, self.tokenizer, args.max_input_tokens, args.max_new_tokens
        )
        torch.manual_seed(args.seed)
        self.sampling = dict(
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            **sampling_settings(args),
        )

    def __call__(self, batch: list[Any]) -> list[str]:
        """Generated texts for records."""
        from core.task.response_encoder import PROMPT_TAIL
        from core.task.textbatch import continuations

        prompts = [self.cut.apply(self.encoder.prompt_ids(r), PROMPT_TAIL) for r in batch]
        return continuations(self.model, self.tokenizer, prompts, **self.sampling)


def answer_row(record: Any, text: str) -> dict[str, Any]:
    """The output row of a record: its source, its messages or instruction / input (and
    reference), and the generated text."""
    row: dict[str, Any] = {"source": record.source}
    if record.messages is not None:
        row["messages"] = record.messages
    else:
        row.update(instruction=record.instruction, input=record.input)
        if record.output:
            row["reference"] = record.output
    row["generated"] = text
    return row


def _typed(line: str) -> Any:
    """The record of an instruction typed on the terminal."""
    from lora_llm.data import Record

    return Record(source="terminal", instruction=line)


# -- merge -----------------------------------------------------------------------------------


def _merge_input(args: argparse.Namespace) -> Loaded:
    """Base + adapter in 16/32 bits (never a 4/8-bit checkpoint: merging into quantized weights
    corrupts them), and the ``--probe`` instruction prompted as in training."""
    import torch

    from core.commands.merge import check_not_quantized_checkpoint, merge_dtype
    from core.commands.model_io import inference_device
    from lora_llm.config import ModelConfig
    from lora_llm.data import Record
    from lora_llm.model import load_adapter_model
    from lora_llm.task import adapter_setup, trained_encoder

    _, settings, base, tokenizer = adapter_setup(args.adapter, args.base)
    check_not_quantized_checkpoint(base)
    device = inference_device(args.device)
    dtype = merge_dtype(args.dtype, device)
    model = load_adapter_model(
        args.adapter, base, ModelConfig(name=base, dtype=dtype), None, device
    )
    encoder = trained_encoder(tokenizer, settings)
    probe = [encoder.prompt_ids(Record(source="--probe", instruction=args.probe))]
    return Loaded(model, tokenizer, torch.tensor(probe, device=device), base, dtype)


MERGE = MergeSpec(
    prog="lora-llm-merge",
    load=_merge_input,
    probe="Give three tips for staying healthy.",
    probe_help="instruction whose logits are compared",
)


def merge(argv: list[str] | None = None) -> int:
    """``merge --adapter DIR --out DIR [--base NAME_OR_DIR] [--dtype ...]``: merge, save, verify
    (:mod:`core.commands.merge`). Returns the exit code."""
    return MERGE.command(argv)


SPEC = TaskSpec(
    name="lora_llm",
    config_cls=LoraLLMConfig,
    presets=PRESETS_DIR,
    default_preset=DEFAULT_PRESET,
    task="lora_llm.task:LoraLLMTask",
    estimator="lora_llm.memory:estimate",
    render="lora_llm.memory:render",
    description=TRAIN_HELP,
    evaluate=EvaluateSpec(
        description="Held-out loss, perplexity and answer quality (ROUGE-L, exact match) of a "
        "LoRA adapter; several processes with trainer.devices=N.",
        epilog="The config comes from -c, else from the config.yaml of the run that wrote "
        "--model, else the default preset. Prints the metrics as one JSON line; the answers "
        "({source, prediction, reference, loss}) go to --out, or, for a run's final/, to "
        "<run>/eval/<name>.jsonl. --max-new-tokens 0: loss and perplexity only.",
        model_help="adapter folder (a run's final/)",
        data_help="instruction or chat records with reference responses (JSONL / JSON)",
        split_help="val: the run's held-out records (data.val_files, or the seeded data.val_size "
        "share) (default)",
        out_help="write each record's answer, reference and loss here (JSONL)",
        splits={"val": "val"},
        split_error="lora_llm has one held-out split, val; or give --data FILE.",
        marker="adapter_config.json",
        what="an adapter folder (a run's final/)",
        arguments=_evaluate_arguments,
        check=_check_evaluate,
    ),
    infer=InferSpec(
        description="Generate text with a base model + trained LoRA adapter.",
        epilog=(
            "examples:\n  infer --model runs/001_x/final --prompt 'Give three tips for staying "
            "healthy.'\n"
            "  infer --model runs/001_x/final --data prompts.jsonl --out answers.jsonl --greedy\n"
            "  infer --model runs/001_x/final            # interactive, on a terminal"
        ),
        raw_epilog=True,
        model_help="adapter folder (a run's final/)",
        data_help="JSONL / JSON of instruction records (instruction, input) or chat records "
        "(messages)",
        prompt_help="an instruction to answer",
        out_help="write JSONL here instead of stdout (with --data)",
        missing="Give --prompt TEXT or --data FILE.jsonl (the interactive mode needs a terminal).",
        read=read_prompts,
        load=Answerer,
        row=answer_row,
        single="generated",
        limit_help="the model's positions less --max-new-tokens",
        max_new_tokens=256,
        sampling=True,
        batch_size=8,
        device_choices=("auto", "cpu", "cuda"),
        arguments=_infer_arguments,
        check=_check_infer,
        check_model=False,
        terminal=_typed,
        terminal_label="instruction",
        banner=lambda args, answer: (
            f"Adapter {args.model} on {answer.base}. Type an instruction; an empty line quits."
        ),
    ),
)

train = SPEC.train
evaluate = SPEC.evaluate_command
infer = SPEC.infer_command


COMMANDS = {
    "train": train,
    "evaluate": evaluate,
    "infer": infer,
    "prepare": prepare,
    "merge": merge,
    "estimate": estimate,
}
"""Commands found through the ``core.tasks`` entry point (``train``, ``evaluate`` and ``infer`` are
core's shared names; the package's own scripts carry its name: ``lora-llm-prepare``, ...)."""


if __name__ == "__main__":  # self-check: every command's --help, the tiny preset's estimate
    from core.commands.spec import main

    def _estimate_offline() -> None:
        assert estimate(["-c", "tiny"]) == 0

    main(COMMANDS, "lora_llm.cli", _estimate_offline)
