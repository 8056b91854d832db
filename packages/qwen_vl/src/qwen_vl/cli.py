"""Commands of the qwen_vl package.

    make-data --out DIR --n N [--seed S]                     draw the counting data set
    train [-c PRESET|FILE] [key=value ...]                   fine-tune (core's contract; also qwen-vl-train)
    evaluate --model DIR --data FILE [key=value ...]         validation loss + counting metrics of a saved model
    infer --model DIR --image FILE --prompt TEXT             answer one question about one (or more) images

``train``, ``evaluate`` and ``infer`` are the shared console scripts of core, dispatched here
through the ``core.tasks`` entry point (``uv run --package qwen_vl train ...``); ``COMMANDS``
maps them. A mistake the user can fix exits with code 2 and one paragraph.

Self-check: ``python -m qwen_vl.cli`` (``--help`` of every command). Subprocess tests also run
``python -m qwen_vl.cli COMMAND ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from core.cli import parse_train_args, train_command, user_errors_exit_2
from core.errors import UserError
from qwen_vl.config import QwenVLConfig

PRESETS_DIR = Path(__file__).parent / "presets"
"""The YAML presets shipped in the package."""
DEFAULT_PRESET = "tiny"
"""Preset of ``train`` without ``-c`` (offline; reads ``data/counting`` written by ``make-data``)."""


def train(argv: list[str] | None = None) -> int:
    """``train``: fine-tune Qwen2.5-VL (core's command-line contract; ``--help`` lists the presets)."""
    from qwen_vl.task import QwenVLTask

    return train_command(
        argv,
        prog="train",
        description="Fine-tune Qwen2.5-VL on image+text conversations (qwen_vl).",
        config_cls=QwenVLConfig,
        presets_dir=PRESETS_DIR,
        make_task=QwenVLTask,
        default_preset=DEFAULT_PRESET,
    )


@user_errors_exit_2
def make_data(argv: list[str] | None = None) -> int:
    """``make-data``: draw images with a known number of objects and write train/dev conversations."""
    from qwen_vl.synth import SynthSettings, write_dataset

    parser = argparse.ArgumentParser(
        prog="make-data",
        description="Draw a counting data set (images with N circles / squares / triangles; "
        "'How many ... are in the image?' -> N) as train.jsonl / dev.jsonl + images/. Same --seed, same files.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument("--n", type=int, required=True, help="training records")
    parser.add_argument(
        "--n-dev", type=int, default=None, help="dev records (default: n/5, at least 8)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of everything (default 0)")
    parser.add_argument("--size", type=int, default=112, help="image side in pixels (default 112)")
    parser.add_argument(
        "--min-count", type=int, default=1, help="fewest objects per image (default 1)"
    )
    parser.add_argument(
        "--max-count", type=int, default=9, help="most objects per image (default 9)"
    )
    parser.add_argument(
        "--max-distractors",
        type=int,
        default=0,
        help="most objects of another shape per image (default 0)",
    )
    parser.add_argument(
        "--text-share", type=float, default=0.1, help="share of text-only records (default 0.1)"
    )
    parser.add_argument(
        "--multi-turn-share",
        type=float,
        default=0.1,
        help="share of two-turn records (default 0.1)",
    )
    args = parser.parse_args(argv)
    if args.n < 1 or (args.n_dev is not None and args.n_dev < 1):
        raise UserError("--n and --n-dev must be at least 1.")
    if not 0 <= args.min_count <= args.max_count:
        raise UserError(
            f"--min-count ({args.min_count}) must be between 0 and --max-count ({args.max_count})."
        )
    if args.size < 28:
        raise UserError(f"--size {args.size} is too small; use at least 28 pixels.")
    if not (
        0 <= args.text_share
        and 0 <= args.multi_turn_share
        and args.text_share + args.multi_turn_share <= 1
    ):
        raise UserError(
            "--text-share and --multi-turn-share must be between 0 and 1 and add up to at most 1."
        )
    settings = SynthSettings(
        n_train=args.n,
        n_dev=args.n_dev if args.n_dev is not None else max(8, args.n // 5),
        seed=args.seed,
        size=args.size,
        min_count=args.min_count,
        max_count=args.max_count,
        max_distractors=args.max_distractors,
        text_share=args.text_share,
        multi_turn_share=args.multi_turn_share,
    )
    try:
        stats = write_dataset(args.out, settings)
    except ValueError as err:
        raise UserError(str(err)) from None
    print(
        f"wrote {stats['train']} train and {stats['dev']} dev records ({stats['images']} images) to {args.out}"
    )
    print(f"answer histogram: {stats['count_histogram']}")
    return 0


def split_args(
    argv: list[str], parser: argparse.ArgumentParser
) -> tuple[argparse.Namespace, list[str]]:
    """Parse the command's own flags; everything else goes to the config (``-c``, ``key=value``)."""
    args, rest = parser.parse_known_args(argv)
    unknown = [
        a for a in rest if a.startswith("-") and a not in ("-c", "--config") and "=" not in a
    ]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args, rest


def eval_config(rest: list[str], model_dir: str, prog: str) -> QwenVLConfig:
    """The config of ``evaluate``: defaults (or ``-c``) + overrides, with the model and its own processor.

    Unless overridden, the pixel limits are the ones saved with the model's processor (the ones
    it was trained with), not the config defaults.
    """
    cfg, _ = parse_train_args(
        rest, prog=prog, description="", config_cls=QwenVLConfig, presets_dir=PRESETS_DIR
    )
    keys = {r.split("=", 1)[0] for r in rest if "=" in r}
    if "data.min_pixels" not in keys:
        cfg.data.min_pixels = None
    if "data.max_pixels" not in keys:
        cfg.data.max_pixels = None
    cfg.model.name, cfg.model.processor = model_dir, None
    cfg.model.lora.enabled = False  # final/ holds merged weights
    return cfg


@user_errors_exit_2
def evaluate(argv: list[str] | None = None) -> int:
    """``evaluate``: validation loss and counting metrics of a saved model on a data file, on every device at once."""
    parser = argparse.ArgumentParser(
        prog="evaluate",
        description="Loss and counting metrics (exact match, mean absolute error of the parsed count) of a saved "
        "Qwen2.5-VL model on a JSONL file. Runs on all trainer.devices at once (DDP, or FSDP with trainer.strategy=fsdp).",
        epilog="Any train key works after the flags: trainer.devices=4 trainer.precision=bf16-true "
        "trainer.eval_batch_size=16 generation.max_new_tokens=8; -c PRESET takes a preset's settings.",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="a folder written by save_pretrained (e.g. runs/NNN_.../final)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="JSONL conversations (the last assistant turn is the reference)",
    )
    parser.add_argument(
        "--predictions",
        type=Path,
        default=None,
        help="also write every answer and reference to this JSONL file",
    )
    args, rest = split_args(list(sys.argv[1:] if argv is None else argv), parser)
    cfg = eval_config(rest, args.model, "evaluate")
    from core.evaluation import Evaluator
    from qwen_vl.task import QwenVLTask

    task = QwenVLTask(cfg)
    evaluator = Evaluator(cfg, task)
    task.prepare()
    task.eval_data = task.load_data(args.data, generation=True)
    with evaluator.fabric.init_module(empty_init=False):
        module = task.configure_model()
    result = evaluator.run(evaluator.setup_model(module), task.eval_data)
    if evaluator.is_global_zero:
        if args.predictions is not None:
            args.predictions.parent.mkdir(parents=True, exist_ok=True)
            rows = [
                {k: r[k] for k in ("id", "prediction", "reference") if k in r}
                for r in result.records
            ]
            args.predictions.write_text(
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
            )
        print(json.dumps(result.metrics))
    return 0


@user_errors_exit_2
def infer(argv: list[str] | None = None) -> int:
    """``infer``: answer a prompt about one or more images (or none) with a saved model; prints the answer."""
    parser = argparse.ArgumentParser(
        prog="infer", description="Answer a question about images with a saved Qwen2.5-VL model."
    )
    parser.add_argument(
        "--model",
        required=True,
        help="a folder written by save_pretrained (e.g. runs/NNN_.../final) or a Hub id",
    )
    parser.add_argument(
        "--image",
        type=Path,
        action="append",
        default=[],
        help="an image file (repeat for several; none: text only)",
    )
    parser.add_argument("--prompt", required=True, help="the question")
    parser.add_argument(
        "--max-new-tokens", type=int, default=64, help="most tokens to generate (default 64)"
    )
    parser.add_argument(
        "--min-pixels",
        type=int,
        default=None,
        help="smallest image area (default: the model's processor setting)",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="largest image area (default: the model's processor setting)",
    )
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)"
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float16", "float32"],
        default="auto",
        help="weights dtype (default: bfloat16 on a GPU that supports it, else float32)",
    )
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1.")
    answer = answer_question(
        args.model,
        args.image,
        args.prompt,
        args.max_new_tokens,
        args.min_pixels,
        args.max_pixels,
        args.device,
        args.dtype,
    )
    print(answer)
    return 0


def answer_question(
    model_dir: str,
    images: list[Path],
    prompt: str,
    max_new_tokens: int = 64,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> str:
    """Load a model and its processor, and answer ``prompt`` about ``images`` greedily.

    Images go through the same loading, ``process_vision_info`` and pixel limits as in training.

    Returns:
        The answer text (special tokens removed).

    Raises:
        UserError: missing model folder / image, undecodable image.
    """
    import torch
    from transformers import AutoModelForImageTextToText

    from qwen_vl.config import DataConfig, ModelConfig
    from qwen_vl.data import Encoder, load_image, resolve_image
    from qwen_vl.model import load_processor

    mcfg = ModelConfig(name=model_dir)
    processor = load_processor(mcfg)
    encoder = Encoder(processor, min_pixels, max_pixels)
    sources = [resolve_image(str(p), Path.cwd(), "--image") for p in images]
    pil = [load_image(s, "--image", DataConfig().max_source_pixels) for s in sources]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = (
            "bfloat16"
            if device.startswith("cuda") and torch.cuda.is_bf16_supported()
            else "float32"
        )
    model = (
        AutoModelForImageTextToText.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        .to(device)
        .eval()
    )
    inputs = encoder.encode_prompt(prompt, pil)
    with torch.no_grad():
        out = model.generate(
            **{k: v.to(device) for k, v in inputs.items()},
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return processor.tokenizer.decode(
        out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    ).strip()


COMMANDS: dict[str, Any] = {
    "train": train,
    "evaluate": evaluate,
    "infer": infer,
    "make-data": make_data,
}
"""The commands core's shared ``train`` / ``evaluate`` / ``infer`` scripts dispatch to."""


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
        sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
    # self-check: python -m qwen_vl.cli -> every command's --help
    for name, command in COMMANDS.items():
        try:
            command(["--help"])
        except SystemExit as exit_:
            assert exit_.code == 0, name
        print(f"--- {name}: --help ok")
    print("qwen_vl.cli: ok")
