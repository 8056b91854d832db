"""Commands of the ``lora_llm`` package: ``train``, ``evaluate``, ``infer``, ``prepare``, ``merge``,
``estimate``.

::

    uv run --package lora_llm train -c tiny trainer.max_steps=20          # QLoRA on the CPU,
    offline
    uv run --package lora_llm train -c phi2 --dry-run                      # parameters + memory, no
    weights
    uv run --package lora_llm evaluate --model runs/001_.../final          # held-out loss,
    perplexity, ROUGE-L
    uv run --package lora_llm infer --model runs/001_.../final --prompt "Give three tips for
    sleeping well."
    uv run --package lora_llm lora-llm-prepare -c tiny --data my.jsonl --out prepared/
    uv run --package lora_llm lora-llm-merge --model runs/001_.../final --out merged/

``train``, ``evaluate`` and ``infer`` are core's shared command names (dispatched here through the
``core.tasks`` entry point); ``lora-llm-train``, ``lora-llm-prepare`` and ``lora-llm-merge`` are
this package's own scripts; every command also runs as ``python -m lora_llm.cli <command> ...``.
Mistakes a user can fix exit with code 2 and one paragraph (``core.cli.user_errors_exit_2``);
no command writes onto its inputs or into a folder of other files (``core.outputs``).

Self-check: ``python -m lora_llm.cli`` (no arguments).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from core.cli import (
    add_model_arguments,
    check_model_dir,
    config_for_model,
    evaluation_outputs,
    model_owner,
    parse_model_command,
    parse_train_args,
    train_command,
    user_errors_exit_2,
    write_evaluation,
)
from core.errors import UserError
from core.outputs import guard_file, guard_folder, mark_folder, write_jsonl, write_text
from core.storage import StorageError, check_free_space, check_writable, storage_errors
from core.truncation import Truncation, add_option, input_limit, model_limit
from lora_llm.config import DataConfig, LoraLLMConfig, ModelConfig, QuantConfig

PRESETS = Path(__file__).parent / "presets"
DEFAULT_PRESET = "phi2"

TRAIN_HELP = (
    "LoRA / QLoRA fine-tuning of a causal LM (peft + bitsandbytes). "
    "Add --dry-run to print parameters, trainable parameters and the estimated GPU memory without "
    "loading weights."
)


def train(argv: list[str] | None = None) -> int:
    """``train [-c PRESET|FILE.yaml] [key=value ...] [--dry-run]``: the core training contract.

    Returns:
        Exit code (0: completed or interrupted with a checkpoint; 2: a mistake in the input).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if "--dry-run" in args:
        args.remove("--dry-run")
        return estimate(args)
    from lora_llm.task import LoraLLMTask

    return train_command(
        args,
        prog="train",
        description=TRAIN_HELP,
        config_cls=LoraLLMConfig,
        presets_dir=PRESETS,
        make_task=LoraLLMTask,
        default_preset=DEFAULT_PRESET,
        task="lora_llm",
    )


@user_errors_exit_2
def estimate(argv: list[str] | None = None) -> int:
    """``estimate [-c PRESET] [key=value ...] [--json]``: parameters and training memory, no weights
    loaded.

    Returns:
        Exit code.
    """
    from lora_llm.memory import estimate as run_estimate
    from lora_llm.memory import format_report

    args = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in args
    args = [a for a in args if a != "--json"]
    cfg, _ = parse_train_args(
        args,
        prog="estimate",
        description="Parameters and estimated training memory of a config (add --json for JSON).",
        config_cls=LoraLLMConfig,
        presets_dir=PRESETS,
        default_preset=DEFAULT_PRESET,
    )
    report = run_estimate(cfg)
    print(json.dumps(report, indent=1) if as_json else format_report(report))
    return 0


@user_errors_exit_2
def prepare(argv: list[str] | None = None) -> int:
    """``prepare [-c PRESET] [--data FILE ...] [--val-data FILE ...] --out DIR [key=value ...]``.

    Reads and checks the records exactly as ``train`` would (same tokenizer, template, length
    policy, split), and writes ``train.jsonl`` / ``val.jsonl`` (one sample per line: source,
    template, token counts, decoded text, ``input_ids`` and ``labels``; ``train`` accepts these
    files as pre-tokenized data) and ``stats.json`` (counts, length percentiles, truncation).

    Returns:
        Exit code.
    """
    parser = argparse.ArgumentParser(
        prog="lora-llm-prepare",
        description="Check and tokenize instruction / chat data; write processed JSONL and a "
        "statistics report.",
        epilog="example: lora-llm-prepare -c tiny --data my_data.jsonl --out prepared/ "
        "data.max_length=512",
    )
    parser.add_argument(
        "-c",
        "--config",
        metavar="PRESET|FILE",
        default=DEFAULT_PRESET,
        help=f"preset or YAML file (default: {DEFAULT_PRESET})",
    )
    parser.add_argument(
        "--data", nargs="+", metavar="FILE", help="training data (replaces data.train_files)"
    )
    parser.add_argument(
        "--val-data", nargs="+", metavar="FILE", help="validation data (replaces data.val_files)"
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an --out folder that holds other files (train.jsonl / val.jsonl / "
        "stats.json are replaced)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. data.max_length=512",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    overrides = list(args.overrides)
    if args.data:
        overrides.append("data.train_files=" + json.dumps(args.data))
    if args.val_data:
        overrides.append("data.val_files=" + json.dumps(args.val_data))
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
    from lora_llm.task import LoraLLMTask

    task = LoraLLMTask(cfg)
    task.setup()
    mark_folder(args.out, "lora-llm-prepare")
    counts = {
        "train": write_examples(args.out / "train.jsonl", task.train_data.examples, task.tokenizer)
    }
    if task.val_data is not None:
        counts["val"] = write_examples(
            args.out / "val.jsonl", task.val_data.examples, task.tokenizer
        )
    stats = {split: s.summary(cfg.data.max_length) for split, s in task.stats.items()}
    report = {
        "tokenizer": task.tokenizer.name_or_path,
        "template": cfg.data.template,
        "chat_source": task.encoder.chat_source,
        **stats,
    }
    write_text(args.out / "stats.json", json.dumps(report, indent=1, ensure_ascii=False))
    for split, s in task.stats.items():
        print(s.describe(split))
    print(
        f"wrote {', '.join(f'{n} {k} samples' for k, n in counts.items())} and stats.json to "
        f"{args.out}"
    )
    return 0


def write_examples(path: Path, examples: list[dict[str, Any]], tokenizer: Any) -> int:
    """Write encoded examples as JSON lines (with their decoded text) atomically; returns how
    many."""
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


def quiet() -> None:
    """No transformers progress bars (loading / writing shards) in command output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def device_of(choice: str) -> Any:
    """``auto`` -> CUDA when available, else the CPU."""
    import torch

    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible here; use --device cpu.")
    return torch.device(choice)


def adapter_setup(
    adapter: Path, base: str | None
) -> tuple[dict[str, Any], dict[str, Any], str, Any]:
    """Read an adapter folder: its configs, its base model, and the tokenizer it was trained with.

    Returns:
        ``(adapter_config, settings, base, tokenizer)``.
    """
    from lora_llm.model import load_tokenizer, read_adapter, resolve_base

    try:
        adapter_config, settings = read_adapter(adapter)
    except UserError:
        # A run or model of another task is named as such (infer and merge; evaluate checks
        # first); any other folder keeps read_adapter's message.
        owner = model_owner(adapter) if Path(adapter).is_dir() else None
        if owner is not None and owner[0] != "lora_llm":
            check_model_dir(adapter, "adapter_config.json", "an adapter folder", "lora_llm")
        raise
    base_name = resolve_base(adapter, adapter_config, base)
    source = adapter if (adapter / "tokenizer_config.json").is_file() else base_name
    tokenizer = load_tokenizer(ModelConfig(name=base_name), source)
    return adapter_config, settings, base_name, tokenizer


def add_generation_arguments(parser: argparse.ArgumentParser, greedy_default: bool = False) -> None:
    """Base-model and decoding flags shared by ``infer`` and ``evaluate``."""
    parser.add_argument(
        "--base", help="base model (Hub id or folder); default: the one the adapter was trained on"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=256 if not greedy_default else 128,
        help=f"tokens to generate at most (default {256 if not greedy_default else 128})",
    )
    parser.add_argument(
        "--quant",
        choices=["auto", "4", "8", "none"],
        default="auto",
        help="load the base in 4/8 bits; auto: as in training",
    )
    add_option(
        parser,
        "the model's positions less --max-new-tokens"
        + ("; at most data.max_length less data.min_response_tokens" if greedy_default else ""),
    )


def infer_parser() -> argparse.ArgumentParser:
    """Arguments of ``infer``."""
    parser = argparse.ArgumentParser(
        prog="infer",
        description="Generate text with a base model + trained LoRA adapter.",
        epilog=(
            "examples:\n  infer --model runs/001_x/final --prompt 'Give three tips for staying "
            "healthy.'\n"
            "  infer --model runs/001_x/final --data prompts.jsonl --out answers.jsonl --greedy\n"
            "  infer --model runs/001_x/final            # interactive, on a terminal"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(
        parser,
        model_help="adapter folder (a run's final/)",
        data_help="JSONL / JSON of instruction records (instruction, input) or chat records "
        "(messages)",
        prompt_help="an instruction to answer",
        out_help="write JSONL here instead of stdout (with --data)",
    )
    parser.add_argument("--context", default="", help="the 'input' field that goes with --prompt")
    add_generation_arguments(parser)
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
    parser.add_argument(
        "--batch-size", type=int, default=8, help="prompts per generate call (default 8)"
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="default: CUDA when available",
    )
    return parser


def load_for_generation(
    adapter: Path, base: str | None, quant_choice: str, device: Any
) -> tuple[Any, Any, Any, str]:
    """Base + adapter ready to generate, with the tokenizer and prompt encoder of training.

    Returns:
        ``(model, tokenizer, encoder, base name)``.
    """
    from lora_llm.data import Encoder
    from lora_llm.model import load_adapter_model

    _, settings, base_name, tokenizer = adapter_setup(adapter, base)
    encoder = Encoder(
        tokenizer,
        settings.get("template", "auto"),
        settings.get("max_length", 512),
        chat_source=settings.get("chat_source"),
    )
    trained_bits = settings.get("quant", {}).get("bits")
    bits = (
        trained_bits
        if quant_choice == "auto"
        else (None if quant_choice == "none" else int(quant_choice))
    )
    quant = QuantConfig(**{**settings.get("quant", {}), "bits": bits}) if bits else None
    model = load_adapter_model(
        adapter,
        base_name,
        ModelConfig(name=base_name, dtype=settings.get("model_dtype", "auto")),
        quant,
        device,
    )
    return model, tokenizer, encoder, base_name


@user_errors_exit_2
def infer(argv: list[str] | None = None) -> int:
    """``infer --model DIR [--base NAME_OR_DIR] (--prompt TEXT | --data FILE.jsonl) [--out FILE]
    [sampling flags]``.

    Without ``--prompt`` / ``--data`` on a terminal: an interactive loop (an empty line quits).

    Returns:
        Exit code.
    """
    import torch

    from lora_llm.data import PROMPT_TAIL, Record, read_records
    from lora_llm.model import generate

    args = parse_model_command(infer_parser(), argv)
    quiet()
    interactive = args.prompt is None and args.data is None
    if interactive and not sys.stdin.isatty():
        raise UserError(
            "Give --prompt TEXT or --data FILE.jsonl (the interactive mode needs a terminal)."
        )
    if args.temperature <= 0 and not args.greedy:
        raise UserError("--temperature must be positive (or use --greedy).")
    if args.out is not None:
        if args.data is None:
            raise UserError(
                "--out goes with --data (a file of prompts); --prompt prints its answer."
            )
        guard_file(args.out, "--out", [(args.data, "--data")], args.overwrite)
    records: list[Record] = []
    if args.data is not None:
        records, _ = read_records(str(args.data), DataConfig(), for_inference=True, key="--data")
        if not records:
            raise UserError(f"--data '{args.data}' holds no records.")
    model, tokenizer, encoder, base = load_for_generation(
        args.model, args.base, args.quant, device_of(args.device)
    )
    limit, origin = input_limit(
        args.max_input_tokens,
        None,
        model_limit(getattr(model, "config", None), tokenizer, reserve=args.max_new_tokens),
    )
    cut = Truncation(limit, origin, "prompts")
    torch.manual_seed(args.seed)
    sampling = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=not args.greedy,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        batch_size=args.batch_size,
    )

    def answer(batch: list[Record]) -> list[str]:
        """Generated texts for records, prompted as in training (prompts cut to the limit:
        their start and their template's end)."""
        prompts = [cut.apply(encoder.prompt_ids(r), PROMPT_TAIL) for r in batch]
        return generate(model, tokenizer, prompts, **sampling)

    if args.prompt is not None:
        text = answer([Record(source="--prompt", instruction=args.prompt, input=args.context)])[0]
        cut.report()
        print(text)
        return 0
    if interactive:
        print(
            f"Adapter {args.model} on {base}. Type an instruction; an empty line quits.",
            file=sys.stderr,
        )
        while True:
            try:
                line = input("instruction> ").strip()
            except EOFError:
                break
            if not line:
                break
            cut = Truncation(limit, origin, "prompts")  # a note for each line that was cut
            text = answer([Record(source="terminal", instruction=line)])[0]
            cut.report()
            print(text)
        return 0
    rows = []
    texts = answer(records)
    cut.report()
    for record, text in zip(records, texts, strict=True):
        row: dict[str, Any] = {"source": record.source}
        if record.messages is not None:
            row["messages"] = record.messages
        else:
            row.update(instruction=record.instruction, input=record.input)
            if record.output:
                row["reference"] = record.output
        row["generated"] = text
        rows.append(row)
    if args.out is not None:
        write_jsonl(args.out, rows)
        print(f"wrote {len(rows)} answers to {args.out}", file=sys.stderr)
    else:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    return 0


@user_errors_exit_2
def evaluate(argv: list[str] | None = None) -> int:
    """``evaluate --model DIR [--data FILE | --split val] [--out FILE]``: held-out loss and
    perplexity of base + adapter, and greedy answers scored against the reference responses
    (ROUGE-L F1, exact match), on every device at once (``trainer.devices=N``).

    Returns:
        Exit code.
    """
    parser = argparse.ArgumentParser(
        prog="evaluate",
        description="Held-out loss, perplexity and answer quality (ROUGE-L, exact match) of a "
        "LoRA adapter; several "
        "processes with trainer.devices=N.",
        epilog="The config comes from -c, else from the config.yaml of the run that wrote "
        "--model, else the default preset. "
        "Prints the metrics as one JSON line; the answers ({source, prediction, reference, loss}) "
        "go to --out, or, for a "
        "run's final/, to <run>/eval/<name>.jsonl. --max-new-tokens 0: loss and perplexity only.",
    )
    add_model_arguments(
        parser,
        model_help="adapter folder (a run's final/)",
        data_help="instruction or chat records with reference responses (JSONL / JSON)",
        split_help="val: the run's held-out records (data.val_files, or the seeded data.val_size "
        "share) (default)",
        out_help="write each record's answer, reference and loss here (JSONL)",
    )
    add_generation_arguments(parser, greedy_default=True)
    args = parse_model_command(parser, argv)
    check_model_dir(
        args.model, "adapter_config.json", "an adapter folder (a run's final/)", task="lora_llm"
    )
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: use 0 (no generation) or more.")
    if args.data is None and (args.split or "val") != "val":
        raise UserError(
            f"--split {args.split!r}: lora_llm has one held-out split, val; or give --data FILE."
        )
    cfg = config_for_model(
        args.model, args.config, args.overrides, LoraLLMConfig, PRESETS, DEFAULT_PRESET
    )
    cfg.model.gradient_checkpointing = False
    name = args.data.stem if args.data is not None else "val"
    records_path, scores_path = evaluation_outputs(
        args.model, name, args.out, args.overwrite, [(args.data, "--data")], cfg
    )
    from core.evaluation import Evaluator
    from lora_llm.data import read_records, without_answer
    from lora_llm.task import LoraLLMTask

    quiet()
    task = LoraLLMTask(cfg)
    evaluator = Evaluator(cfg, task)
    _, _, base, tokenizer = adapter_setup(args.model, args.base)
    task.tokenizer = tokenizer
    task.cfg.model.name = base
    if args.data is not None:
        records, _ = read_records(str(args.data), cfg.data, key="--data")
    else:
        records = task.read_splits()[2]
        if not records:
            raise UserError(
                "The run's config holds out no records (data.val_files empty and "
                "data.val_size 0): give --data FILE."
            )
    model, tokenizer, encoder, _ = load_for_generation(
        args.model, args.base, args.quant, evaluator.fabric.device
    )
    # Long prompts are cut (start + template end) to fit data.max_length with room for the
    # response, and the model's positions with room for the answer, not left out.
    encoder.prompt_limit, origin = input_limit(
        args.max_input_tokens,
        encoder.max_length - encoder.min_response_tokens,
        model_limit(getattr(model, "config", None), tokenizer, reserve=args.max_new_tokens),
        "data.max_length less data.min_response_tokens",
    )
    cut = Truncation(encoder.prompt_limit, origin, "prompts")
    for record in records:
        if record.kind != "tokenized":  # pre-tokenized records are cut in encode(), uncounted
            cut.count(len(encoder.prompt_ids(without_answer(record), cut=False)))
    cut.report(enabled=evaluator.is_global_zero)
    dataset = task.evaluation_set(records, encoder, args.max_new_tokens)
    result = evaluator.run(evaluator.setup_model(model), dataset)
    if evaluator.is_global_zero:
        rows = [
            {k: r[k] for k in ("source", "prediction", "reference") if k in r}
            | {"loss": r["loss_sum"] / max(r["tokens"], 1)}
            for r in result.records
        ]
        scores = {
            **result.metrics,
            "samples": len(rows),
            "model": str(args.model),
            "base": base,
            "data": str(args.data) if args.data is not None else "val",
            "world_size": evaluator.fabric.world_size,
        }
        write_evaluation(records_path, scores_path, rows, scores)
    return 0


@user_errors_exit_2
def merge(argv: list[str] | None = None) -> int:
    """``merge --adapter DIR --out DIR [--base NAME_OR_DIR] [--dtype ...]``: merge, save, verify.

    The base is loaded in 16 or 32 bits (never 4-bit: merging into quantized weights corrupts
    them), the adapter merged with ``merge_and_unload``, and the merged model saved with
    ``save_pretrained`` (+ tokenizer). Logits of the merged model (in memory and reloaded from
    ``--out``) are compared with the adapter model's on a probe prompt; the report goes to stdout
    and ``--out/merge_report.json``.

    A target without room for the merged weights is refused before anything is written; a full
    or read-only disk met while writing removes what was written. The folder's
    ``.written-by.json`` marker is written last, so a marked folder always holds a whole model.

    Returns:
        0 when the logits match within the tolerance, 1 when they do not or the disk is full or
        read-only (the message names the path and the space), 2 for a user mistake.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from lora_llm.data import Encoder, Record
    from lora_llm.model import (
        DTYPES,
        check_not_quantized_checkpoint,
        cuda_dtype,
        load_adapter_model,
        merge_and_check,
    )

    parser = argparse.ArgumentParser(
        prog="lora-llm-merge",
        description="Merge a LoRA adapter into its 16/32-bit base model and save the result "
        "(save_pretrained).",
        epilog="example: lora-llm-merge --model runs/001_x/final --out merged/ --dtype bfloat16",
    )
    parser.add_argument(
        "--model",
        "--adapter",
        dest="adapter",
        required=True,
        type=Path,
        help="adapter folder (a run's final/)",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        help="new folder for the merged model (must not exist or be empty)",
    )
    parser.add_argument(
        "--base", help="base model (Hub id or folder); default: the one the adapter was trained on"
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="dtype of the base and the merged model; auto: float32 on the CPU, bfloat16/float16 "
        "on a GPU",
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="default: CUDA when available",
    )
    parser.add_argument(
        "--probe",
        default="Give three tips for staying healthy.",
        help="instruction whose logits are compared",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="largest allowed |merged - adapter| logit difference relative to the largest logit "
        "(default 1e-4 in float32, 2e-2 in 16 bits)",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    quiet()
    # Never into a folder of other files, nor onto the adapter or the base it reads.
    guard_folder(
        args.out,
        "--out",
        "lora-llm-merge",
        inputs=[(args.adapter, "--model"), *([(Path(args.base), "--base")] if args.base else [])],
    )
    if args.out.is_dir() and any(args.out.iterdir()):
        raise UserError(
            f"--out '{args.out}' already holds a merged model; merge writes a new "
            "folder: choose another --out."
        )
    check_writable(args.out, "the merged model")  # before minutes of loading and merging
    _, settings, base, tokenizer = adapter_setup(args.adapter, args.base)
    check_not_quantized_checkpoint(base)
    device = device_of(args.device)
    dtype_name = (
        args.dtype
        if args.dtype != "auto"
        else ("float32" if device.type == "cpu" else str(cuda_dtype()).removeprefix("torch."))
    )
    model = load_adapter_model(
        args.adapter, base, ModelConfig(name=base, dtype=dtype_name), None, device
    )
    encoder = Encoder(
        tokenizer,
        settings.get("template", "auto"),
        settings.get("max_length", 512),
        chat_source=settings.get("chat_source"),
    )
    probe = torch.tensor(
        [encoder.prompt_ids(Record(source="--probe", instruction=args.probe))], device=device
    )
    merged, numbers = merge_and_check(model, probe)
    # The weights are most of what is written; refused before a byte lands when they cannot fit.
    needed = sum(t.numel() * t.element_size() for t in merged.state_dict().values())
    check_free_space(args.out, needed, "the merged model")
    existed = args.out.is_dir()
    try:
        with storage_errors("the merged model", args.out, needed):
            args.out.mkdir(parents=True, exist_ok=True)
            merged.save_pretrained(args.out)
            tokenizer.save_pretrained(args.out)
    except StorageError:
        _remove_half_made(args.out, existed)
        raise
    reloaded = AutoModelForCausalLM.from_pretrained(
        args.out, dtype=DTYPES[dtype_name], device_map={"": device}
    )
    with torch.no_grad():
        again = reloaded(input_ids=probe).logits.float()
        reference = merged(input_ids=probe).logits.float()
    numbers["reloaded_max_abs_diff"] = float((again - reference).abs().max())
    tolerance = (
        args.tolerance
        if args.tolerance is not None
        else (1e-4 if dtype_name == "float32" else 2e-2)
    )
    scale = max(numbers["max_abs_logit"], 1.0)
    ok = (
        numbers["max_abs_diff"] <= tolerance * scale
        and numbers["reloaded_max_abs_diff"] <= tolerance * scale
    )
    report = {
        "adapter": str(args.adapter),
        "base": base,
        "dtype": dtype_name,
        "probe_tokens": probe.shape[1],
        "tolerance_relative": tolerance,
        "ok": ok,
        **numbers,
    }
    try:
        write_text(args.out / "merge_report.json", json.dumps(report, indent=1), "the merge report")
        # Marked last: a folder with the marker is a whole merged model, never a half-made one.
        mark_folder(args.out, "lora-llm-merge")
    except StorageError:
        _remove_half_made(args.out, existed)
        raise
    print(
        f"merged {args.adapter} into {base} ({dtype_name}) -> {args.out}\n"
        f"probe logits: max |merged - adapter| = {numbers['max_abs_diff']:.3e}, max |reloaded - "
        f"merged| = {numbers['reloaded_max_abs_diff']:.3e} "
        f"(largest logit {numbers['max_abs_logit']:.2f}; the adapter itself moves logits by up to "
        f"{numbers['adapter_effect']:.3e})\n"
        + (
            "verification passed"
            if ok
            else f"VERIFICATION FAILED: difference above {tolerance:g} x {scale:.2f}"
        )
    )
    return 0 if ok else 1


def _remove_half_made(out: Path, existed: bool) -> None:
    """Remove what ``merge`` wrote into ``out`` (the folder too, unless it existed, empty, before):
    a half-written model must not look like a merged one."""
    import shutil

    if not existed:
        shutil.rmtree(out, ignore_errors=True)
        return
    for child in out.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


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


if __name__ == "__main__":
    if (
        len(sys.argv) > 1
    ):  # python -m lora_llm.cli <command> [args]: what the tests and DDP ranks run
        command = sys.argv[1]
        if command not in COMMANDS:
            sys.exit(f"unknown command '{command}'; commands: {', '.join(COMMANDS)}")
        # sys.argv stays untouched: DDP ranks are started again with the same command line.
        sys.exit(COMMANDS[command](sys.argv[2:]))
    # Self-check: every command parses --help, and the tiny preset's estimate runs offline.
    import contextlib
    import io

    for name, command in COMMANDS.items():
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
            command(["--help"])
        print(f"{name:>9} --help: {buffer.getvalue().splitlines()[0]}")
    assert estimate(["-c", "tiny"]) == 0
    print("lora_llm.cli: ok")
