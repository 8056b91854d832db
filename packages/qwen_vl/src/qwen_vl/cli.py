"""Commands of the qwen_vl package.

    qwen-vl-make-data --out DIR --n N [--seed S]                    draw the counting data set
    train [-c PRESET|FILE] [key=value ...]                          fine-tune (also qwen-vl-train)
    evaluate --model DIR [--data FILE | --split dev] [--out FILE]   loss + counting metrics
    infer --model DIR (--prompt TEXT [--image FILE] | --data FILE)  answer questions about images

``train``, ``evaluate``, ``infer``: core's (:data:`SPEC`). Self-check: ``python -m qwen_vl.cli``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from core.commands.infer import InferSpec
from core.commands.model_io import removed_if_half_made
from core.commands.spec import EvaluateSpec, TaskSpec
from core.errors import UserError, user_errors_exit_2
from core.run.outputs import guard_folder, mark_folder
from core.run.storage import storage_errors
from core.task.truncation import add_option
from qwen_vl.config import DEFAULT_PRESET, PRESETS_DIR, QwenVLConfig


def _vision_language(config: dict[str, Any]) -> bool:
    """Whether a ``config.json`` describes a Qwen2-VL / Qwen2.5-VL model."""
    return "vl" in str(config.get("model_type", "")) or "vision_config" in config


def make_data_parser() -> argparse.ArgumentParser:
    """Arguments of ``qwen-vl-make-data``."""
    parser = argparse.ArgumentParser(
        prog="qwen-vl-make-data",
        description="Draw a counting data set (images with N circles / squares / triangles; "
        "'How many ... are in the image?' -> N) as train.jsonl / dev.jsonl + images/. Same "
        "--seed, same files.",
    )
    out = "output folder (created; must be new, empty or an earlier make-data folder)"
    parser.add_argument("--out", type=Path, required=True, help=out)
    overwrite = "write into a folder that holds other files"
    parser.add_argument("--overwrite", action="store_true", help=overwrite)
    parser.add_argument("--n", type=int, required=True, help="training records")
    n_dev = "dev records (default: n/5, at least 8)"
    parser.add_argument("--n-dev", type=int, default=None, help=n_dev)
    for flag, default, text in (
        ("--seed", 0, "seed of everything"),
        ("--size", 112, "image side in pixels"),
        ("--min-count", 1, "fewest objects per image"),
        ("--max-count", 9, "most objects per image"),
        ("--max-distractors", 0, "most objects of another shape per image"),
    ):
        parser.add_argument(flag, type=int, default=default, help=f"{text} (default {default})")
    for flag, text in (
        ("--text-share", "text-only records"),
        ("--multi-turn-share", "two-turn records"),
    ):
        parser.add_argument(flag, type=float, default=0.1, help=f"share of {text} (default 0.1)")
    return parser


def synth_settings(args: argparse.Namespace) -> Any:
    """The :class:`qwen_vl.synth.SynthSettings` of ``make-data``'s arguments (``UserError``: a
    count, size or share out of range)."""
    from qwen_vl.synth import SynthSettings

    if args.n < 1 or (args.n_dev is not None and args.n_dev < 1):
        raise UserError("--n and --n-dev must be at least 1.")
    if not 0 <= args.min_count <= args.max_count:
        raise UserError(
            f"--min-count ({args.min_count}) must be between 0 and --max-count ({args.max_count})."
        )
    if args.size < 28:
        raise UserError(f"--size {args.size} is too small; use at least 28 pixels.")
    shares = (args.text_share, args.multi_turn_share)
    if min(shares) < 0 or sum(shares) > 1:
        raise UserError(
            "--text-share and --multi-turn-share must be between 0 and 1 and add up to at most 1."
        )
    n_dev = args.n_dev if args.n_dev is not None else max(8, args.n // 5)
    same = "seed size min_count max_count max_distractors text_share multi_turn_share".split()
    return SynthSettings(n_train=args.n, n_dev=n_dev, **{k: getattr(args, k) for k in same})


@user_errors_exit_2
def make_data(argv: list[str] | None = None) -> int:
    """``qwen-vl-make-data``: draw the counting data set into ``--out``."""
    from qwen_vl.synth import write_dataset

    args = make_data_parser().parse_args(argv)
    settings = synth_settings(args)
    guard_folder(args.out, "--out", "qwen-vl-make-data", overwrite=args.overwrite)
    try:  # a folder this command made and could not finish: nothing half-made stays
        with removed_if_half_made(args.out, clear=False):
            with storage_errors("the counting data set", args.out):
                stats = write_dataset(args.out, settings)
    except ValueError as err:
        raise UserError(str(err)) from None
    mark_folder(args.out, "qwen-vl-make-data")
    counts = f"{stats['train']} train and {stats['dev']} dev records ({stats['images']} images)"
    print(f"wrote {counts} to {args.out}")
    print(f"answer histogram: {stats['count_histogram']}")
    return 0


def _infer_arguments(parser: argparse.ArgumentParser) -> None:
    """``infer``'s own flags: ``--image``, ``--min-pixels``, ``--max-pixels``."""
    image = "an image file for --prompt (repeat for several)"
    parser.add_argument("--image", type=Path, action="append", default=[], help=image)
    for side, word in (("min", "smallest"), ("max", "largest")):
        area = f"{word} image area (default: the model's processor setting)"
        parser.add_argument(f"--{side}-pixels", type=int, default=None, help=area)


def _check_infer(args: argparse.Namespace) -> None:
    """Refuse ``--max-new-tokens`` below 1 and ``--image`` with ``--data``."""
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1.")
    if args.data is not None and args.image:
        raise UserError("--image goes with --prompt; in --data each row lists its own images.")


def read_questions(args: argparse.Namespace) -> list[tuple[str, str, list[Path]]]:
    """``(id, prompt, image paths)`` of ``--prompt`` (with ``--image``) or of every row of
    ``--data`` (paths relative to the file); ``UserError`` for a bad row, by file and line."""
    from core.commands.infer import read_prompt_rows

    if args.prompt is not None:
        return [("prompt", args.prompt, list(args.image))]
    questions = []
    hint = "(and optionally 'images': [paths])"
    for qid, row, where in read_prompt_rows(args.data, "prompt", hint):
        images = row.get("images", [row["image"]] if "image" in row else [])
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise UserError(f"{where}: 'images' must be a list of image paths, got {images!r}.")
        questions.append((qid, row["prompt"], [args.data.parent / i for i in images]))
    return questions


class AnswerSession:
    """A saved model (``infer``'s ``args``) answering greedily with the image handling of
    training; questions over ``--max-input-tokens`` are cut (start kept), counted in ``cut``."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch
        from transformers import AutoModelForImageTextToText

        from core.commands.infer import prompt_truncation, trained_setting
        from core.commands.model_io import inference_device, inference_dtype
        from qwen_vl.config import ModelConfig
        from qwen_vl.data import Encoder
        from qwen_vl.model import load_processor

        self.processor = load_processor(ModelConfig(name=str(args.model)))
        self.encoder = Encoder(self.processor, args.min_pixels, args.max_pixels)
        self.device = str(inference_device(args.device))
        dtype = getattr(torch, inference_dtype(args.dtype, self.device))
        model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype)
        self.model = model.to(self.device).eval()
        self.max_new_tokens = args.max_new_tokens
        trained = trained_setting(args.model, "data", "max_length")
        limits = (args.max_input_tokens, args.max_new_tokens, trained)
        self.tokenizer = self.processor.tokenizer
        self.cut = prompt_truncation(
            self.model, self.tokenizer, *limits, "data.max_length of the run"
        )

    def __call__(self, questions: list[tuple[str, str, list[Path]]]) -> list[str]:
        """The answers to ``(id, prompt, images)`` questions, one by one."""
        return [self.answer(images, prompt) for _, prompt, images in questions]

    def answer(self, images: list[Path], prompt: str) -> str:
        """The greedy answer to ``prompt`` about ``images`` (``UserError``: a bad image)."""
        import torch

        from qwen_vl.config import DataConfig
        from qwen_vl.data import load_image, resolve_image

        sources = [resolve_image(str(p), Path.cwd(), "--image") for p in images]
        pil = [load_image(s, "--image", DataConfig().max_source_pixels) for s in sources]
        inputs = self.encoder.encode_prompt(prompt, pil)
        length = inputs["input_ids"].shape[1]
        kept = self.cut.count(length)
        if kept < length:
            inputs = self.shorten(prompt, pil, length - kept, kept)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        answer = out[0, inputs["input_ids"].shape[1] :]
        return self.tokenizer.decode(answer, skip_special_tokens=True).strip()

    def shorten(self, prompt: str, images: list[Any], excess: int, limit: int) -> dict[str, Any]:
        """Model inputs with the question cut by about ``excess`` tokens (its start kept) to fit
        ``limit``; ``UserError`` when the images alone leave no room for it."""
        tokenizer = self.tokenizer
        words = tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
        for _ in range(8):  # re-tokenizing at the cut can add a token or two
            keep = len(words) - excess
            if keep < 1:
                raise UserError(
                    f"The images and the chat template of this question take more than "
                    f"{limit} tokens (the input limit) without any of its text: lower "
                    "--max-pixels or raise --max-input-tokens."
                )
            inputs = self.encoder.encode_prompt(tokenizer.decode(words[:keep]), images)
            over = inputs["input_ids"].shape[1] - limit
            if over <= 0:
                return inputs
            excess += over
        return inputs


SPEC = TaskSpec(
    name="qwen_vl",
    config_cls=QwenVLConfig,
    presets=PRESETS_DIR,
    default_preset=DEFAULT_PRESET,
    task="qwen_vl.task:QwenVLTask",
    estimator="qwen_vl.memory:estimate",
    render="qwen_vl.memory:render",
    description="Fine-tune Qwen2.5-VL on image+text conversations (qwen_vl).",
    evaluate=EvaluateSpec(
        description="Loss and counting metrics (exact match, mean absolute error of the parsed "
        "count) of a saved Qwen2.5-VL model on conversations. Runs on all trainer.devices at "
        "once (DDP, or FSDP2 with trainer.strategy=fsdp).",
        epilog="Any train key works after the flags: trainer.devices=4 trainer.precision=bf16-true "
        "trainer.eval_batch_size=16 generation.max_new_tokens=8; -c PRESET takes a preset's "
        "settings. Prints the metrics as one JSON line; the answers ({id, prediction, reference}) "
        "go to --out, or, for a run's final/, to <run>/eval/<name>.jsonl.",
        model_help="a folder written by save_pretrained (e.g. runs/NNN_.../final)",
        data_help="JSONL conversations (the last assistant turn is the reference)",
        split_help="dev: the config's data.val_file (default)",
        out_help="write every answer and its reference here (JSONL)",
        splits={"dev": "dev"},
        split_error="qwen_vl has one held-out split, dev (data.val_file); or give --data FILE.",
        fits=_vision_language,
        arguments=lambda parser: add_option(  # evaluate's own flag: --max-input-tokens
            parser,
            "data.max_length, at most the model's positions less generation.max_new_tokens; "
            "a longer record's last question is cut",
        ),
    ),
    infer=InferSpec(
        description="Answer questions about images with a saved Qwen2.5-VL model.",
        epilog='--data rows: {"id": ..., "prompt": "How many circles?", "images": ["a.png"]} '
        "(image paths relative to the file); the answers ({id, prompt, answer}) go to --out or "
        "stdout.",
        model_help="a folder written by save_pretrained (e.g. runs/NNN_.../final)",
        data_help="JSONL of questions: {id, prompt, images}",
        prompt_help="one question (with --image files)",
        out_help="write the answers here (JSONL; default: stdout)",
        missing="Give --prompt TEXT (with --image FILE) or --data FILE.jsonl of questions.",
        read=read_questions,
        load=AnswerSession,
        row=lambda q, answer: {"id": q[0], "prompt": q[1], "answer": answer},
        single="answer",
        limit_help="data.max_length of the run that wrote --model, at most the model's positions "
        "less --max-new-tokens",
        max_new_tokens=64,
        dtype=True,
        arguments=_infer_arguments,
        check=_check_infer,
        inputs=lambda args: [(i, "--image") for i in args.image],
        fits=_vision_language,
    ),
)
"""The qwen_vl task, declared once: core gives it ``train``, ``evaluate`` and ``infer``."""

train = SPEC.train
evaluate = SPEC.evaluate_command
infer = SPEC.infer_command


COMMANDS: dict[str, Any] = {
    "train": train,
    "evaluate": evaluate,
    "infer": infer,
    "make-data": make_data,
}
"""The commands core's shared ``train`` / ``evaluate`` / ``infer`` scripts dispatch to."""


if __name__ == "__main__":  # self-check: every command's --help
    from core.commands.spec import main

    main(COMMANDS, "qwen_vl.cli")
