"""Benchmark 4 — evaluation speed: generated summaries per second on DialogSum dev with
length-sorted batches (``trainer.sort_eval_by_length=true``, the default) against batches in
file order, everything else equal (model, batch size, greedy decoding, max new tokens).

    uv run python bench/eval_speed.py --model runs/<run>/final --reps 3

Without ``--model`` it first trains the ``tiny`` preset briefly (a model that writes summaries of
realistic length is needed: generation time follows output length).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

from common import REPO, emit, repeat, report, table

DEV = REPO.parent / "shared" / "data" / "dialogsum" / "dialogsum.dev.jsonl"


def summaries_per_sec(model_dir: Path, sort: bool, batch: int, limit: int | None) -> float:
    """Evaluate ``model_dir`` on DialogSum dev; returns summaries per second of the evaluation
    loop."""
    from transformers import AutoModelForSeq2SeqLM

    from core.config.loader import load_config
    from core.engine.trainer import build_fabric, eval_dataloader
    from core.engine.trainer import evaluate as run_evaluation
    from summarization.config import PRESETS_DIR, SummarizationConfig
    from summarization.task import SummarizationTask

    cfg = load_config(
        SummarizationConfig,
        "tiny",
        [
            f"trainer.sort_eval_by_length={str(sort).lower()}",
            f"trainer.eval_batch_size={batch}",
            "trainer.accelerator=cpu",
            "generation.num_beams=1",
        ],
        PRESETS_DIR,
    )
    task = SummarizationTask(cfg)
    fabric = build_fabric(cfg, task)
    fabric.launch()
    task.setup_model_side(model_dir)
    rows = task.read_split(str(DEV))[:limit]
    task.val_data = task.tokenize(rows)
    task.choose_rouge_tokenizer(rows)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    task.prepare_generation(model)
    model = fabric.setup_module(model)
    model.mark_forward_method("generate")
    loader = eval_dataloader(fabric, task, task.val_data, cfg.trainer)
    start = time.perf_counter()
    run_evaluation(fabric, task, model, loader)
    return len(rows) / (time.perf_counter() - start)


def train_tiny(root: Path) -> Path:
    """A briefly trained tiny model (its final/)."""
    from core.config.loader import load_config
    from core.engine.trainer import Trainer
    from summarization.config import PRESETS_DIR, SummarizationConfig
    from summarization.task import SummarizationTask

    cfg = load_config(
        SummarizationConfig,
        "tiny",
        [
            f"run.root={root}",
            "trainer.max_steps=120",
            "trainer.val_every_n_steps=null",
            "logger.progress_bar=false",
            "trainer.accelerator=cpu",
        ],
        PRESETS_DIR,
    )
    return Trainer(cfg, SummarizationTask(cfg), argv=["bench"]).fit().run_dir / "final"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a trained summarization model folder (default: train tiny briefly)",
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None, help="only the first N dev rows")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    model = args.model or train_tiny(Path(tempfile.mkdtemp()))
    speeds = repeat(
        {
            "file order": lambda: summaries_per_sec(model, False, args.batch, args.limit),
            "length-sorted": lambda: summaries_per_sec(model, True, args.batch, args.limit),
        },
        args.reps,
    )
    base = statistics.median(speeds["file order"])
    rows = [
        [
            name,
            f"{statistics.median(v):.2f}",
            f"{min(v):.2f} – {max(v):.2f}",
            f"{statistics.median(v) / base:.2f}",
        ]
        for name, v in speeds.items()
    ]
    model = (
        f"`{args.model}`" if args.model else "the `tiny` preset trained 120 steps by this script"
    )
    body = (
        f"Model: {model}; DialogSum dev ({args.limit or 'all 500'} rows), batch {args.batch}, "
        "greedy decoding, CPU, "
        f"median of {args.reps} interleaved runs of the evaluation loop (generation + loss + "
        "ROUGE).\n\n" + table(["batches", "summaries/s (median)", "min – max", "ratio"], rows)
    )
    text = report(
        "Evaluation speed",
        f"uv run python bench/eval_speed.py --batch {args.batch} --reps {args.reps}",
        body,
    )
    emit(text, args.out)


if __name__ == "__main__":
    main()
