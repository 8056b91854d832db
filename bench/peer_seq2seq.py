"""Benchmark 14 — summarization against the Hugging Face ``Seq2SeqTrainer``: dev loss and training
time, side by side, over seeds.

Both train the same model (the ``small`` preset's from-scratch mBART, built once by the package,
saved with ``save_pretrained`` and loaded back through ``from_pretrained``) on the same first
``--train`` DialogSum training dialogues, tokenised alike (dialogue cut at 320 tokens, summary at
64), batch 16, AdamW at 1e-3 with weight decay 0.01, ``--warmup`` warmup steps, cosine to 5% of
the peak, bf16 autocast, eager attention, for ``--steps`` steps. The Hugging Face Trainer runs at
its best setting (``train_sampling_strategy="group_by_length"``) and with random batches;
summarization runs its preset's batching (mega-batch length grouping) with and without its
auxiliary encoder masked-LM loss (the Hugging Face Trainer has none: ``no-mlm`` is the like-for-like
run) and with random batches.

The dev loss of every run is computed by the same code (:func:`dev_loss`): token-weighted mean
cross-entropy of the first ``--dev`` dev summaries given their dialogues, float32. Training time is
the wall time of the training loop only.

    OMP_NUM_THREADS=1 uv run python bench/peer_seq2seq.py --steps 300 --seeds 3 \
        --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from common import PEER_HEADER, REPO, cached_runs, emit, machine, peer_rows, report, table

DATA = REPO.parent / "shared" / "data" / "dialogsum"
TRAIN = DATA / "dialogsum.train.2021-05-26.jsonl"
DEV = DATA / "dialogsum.dev.jsonl"
BATCH, LR, DECAY, MIN_LR = 16, 1e-3, 0.01, 0.05
SOURCE, TARGET = 320, 64

VARIANTS: dict[str, list[str]] = {
    "summarization": [],
    "no-mlm": ["model.encoder_mlm=0.0"],
    "no-mlm-random": ["model.encoder_mlm=0.0", "trainer.group_by_length=false"],
}
HF_VARIANTS = {"hf-grouped": "group_by_length", "hf-random": "random"}


def rows(path: Path, n: int) -> list[dict[str, str]]:
    """The first ``n`` rows of a DialogSum JSONL file."""
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for _, line in zip(range(n), handle)]


def small_config(overrides: list[str]) -> Any:
    """The ``small`` preset with the study's shared settings and ``overrides``."""
    from core.config.loader import load_config
    from summarization.config import PRESETS_DIR, SummarizationConfig

    return load_config(SummarizationConfig, "small", overrides, PRESETS_DIR)


def make_base(folder: Path) -> Path:
    """Write the ``small`` preset's from-scratch model (seed 0) and its tokenizer to ``folder``."""
    import torch

    from summarization.model import build_model, load_model_config, load_tokenizer

    cfg = small_config([])
    tokenizer = load_tokenizer(cfg.model)
    torch.manual_seed(0)
    build_model(cfg.model, load_model_config(cfg.model, tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def train_summarization(
    variant: str, seed: int, base: Path, train: Path, steps: int, warmup: int, out: Path
) -> dict:
    """``--steps`` steps of ``summarization`` (``small`` preset, pretrained from ``base``).

    Returns:
        ``{"model": final folder, "train_seconds", "steps"}``.
    """
    from core.engine.trainer import Trainer
    from summarization.task import SummarizationTask

    cfg = small_config(
        [
            "model.init=pretrained",
            f"model.name={base}",
            f"data.train_file={train}",
            f"data.val_file={train}",
            "trainer.val_every_n_steps=null",
            "trainer.val_at_end=false",
            f"trainer.max_steps={steps}",
            "trainer.max_time=null",
            f"trainer.seed={seed}",
            "trainer.accelerator=cpu",
            "trainer.log_every_n_steps=1000",
            f"optim.warmup_steps={warmup}",
            "checkpoint.monitor=null",
            "logger.progress_bar=false",
            "logger.plot=false",
            f"run.root={out}",
            *VARIANTS[variant],
        ]
    )
    result = Trainer(cfg, SummarizationTask(cfg), argv=["bench/peer_seq2seq.py"]).fit()
    summary = json.loads((result.run_dir / "summary.json").read_text())
    return {
        "model": str(result.run_dir / "final"),
        "train_seconds": summary["train_seconds"],
        "steps": result.step,
    }


def encode(tokenizer: Any, records: list[dict[str, str]]) -> list[dict[str, list[int]]]:
    """``input_ids`` / ``attention_mask`` / ``labels`` of each dialogue and its summary."""
    source = tokenizer([r["dialogue"] for r in records], max_length=SOURCE, truncation=True)
    target = tokenizer(
        text_target=[r["summary"] for r in records], max_length=TARGET, truncation=True
    )
    return [
        {"input_ids": ids, "attention_mask": mask, "labels": labels}
        for ids, mask, labels in zip(
            source["input_ids"], source["attention_mask"], target["input_ids"]
        )
    ]


def train_hf(
    variant: str, seed: int, base: Path, records: list[dict], steps: int, warmup: int, out: Path
) -> dict:
    """``--steps`` steps of the Hugging Face ``Seq2SeqTrainer`` on the same model and data.

    Returns:
        ``{"model": saved folder, "train_seconds", "steps"}``.
    """
    from datasets import Dataset
    from transformers import (
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSeq2SeqLM.from_pretrained(base, attn_implementation="eager")
    args = Seq2SeqTrainingArguments(
        output_dir=str(out / "hf"),
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        weight_decay=DECAY,
        warmup_steps=warmup,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": MIN_LR},
        max_steps=steps,
        bf16=True,
        use_cpu=True,
        seed=seed,
        train_sampling_strategy=HF_VARIANTS[variant],
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_steps=1000,
    )
    trainer = Seq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(encode(tokenizer, records)),
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
        processing_class=tokenizer,
    )
    wall = time.perf_counter()
    state = trainer.train()
    wall = time.perf_counter() - wall
    trainer.save_model(str(out / "hf-model"))
    return {"model": str(out / "hf-model"), "train_seconds": wall, "steps": state.global_step}


def dev_loss(model_dir: Path, records: list[dict[str, str]]) -> float:
    """Token-weighted mean cross-entropy of the dev summaries given their dialogues (float32)."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, DataCollatorForSeq2Seq

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    collate = DataCollatorForSeq2Seq(tokenizer, model=model)
    examples = encode(tokenizer, records)
    total, count = 0.0, 0
    for start in range(0, len(examples), BATCH):
        batch = collate(examples[start : start + BATCH])
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        labels = batch["labels"]
        total += torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)),
            labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        ).item()
        count += int((labels != -100).sum())
    return total / count


def run_once(variant: str, seed: int, base: Path, args: argparse.Namespace) -> dict:
    """Train one (variant, seed) in a scratch folder, score it on the dev rows, delete it."""
    out = Path(tempfile.mkdtemp(prefix="peer-seq2seq-"))
    try:
        train = rows(TRAIN, args.train)
        if variant in HF_VARIANTS:
            result = train_hf(variant, seed, base, train, args.steps, args.warmup, out)
        else:
            data = out / "train.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in train), encoding="utf-8")
            result = train_summarization(
                variant, seed, base, data, args.steps, args.warmup, out / "runs"
            )
        result["val_loss"] = dev_loss(Path(result.pop("model")), rows(DEV, args.dev))
        return result
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    """Run the study (or re-make its table from cached results) and print / append the section."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=30, help="warmup steps")
    parser.add_argument("--train", type=int, default=5000, help="DialogSum training dialogues")
    parser.add_argument("--dev", type=int, default=200, help="DialogSum dev dialogues")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per variant")
    parser.add_argument("--train-seeds", type=int, nargs="+", default=None)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[*HF_VARIANTS, *VARIANTS],
        choices=[*HF_VARIANTS, *VARIANTS],
    )
    parser.add_argument(
        "--results", type=Path, default=Path(tempfile.gettempdir()) / "peer_seq2seq"
    )
    parser.add_argument("--report-only", action="store_true", help="no training: cached runs")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    args.results.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="peer-seq2seq-base-"))
    try:
        base = make_base(scratch / "base")
        runs = cached_runs(
            args.results,
            f"steps{args.steps}-n{args.train}",
            args.variants,
            args.seeds,
            partial(run_once, base=base, args=args),
            args.train_seeds,
            args.report_only,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    body = (
        f"The `small` preset's from-scratch mBART, {args.steps} steps of {BATCH} of the first "
        f"{args.train} DialogSum training dialogues, AdamW {LR} (decay {DECAY}), {args.warmup} "
        f"warmup steps, cosine to {MIN_LR:.0%}, bf16 autocast, eager attention; dev loss on the "
        f"first {args.dev} dev dialogues by one evaluation, mean ± std over seeds; the ref is "
        f"the Hugging Face Seq2SeqTrainer grouped by length. {machine().split(';')[0]}.\n\n"
        + table(PEER_HEADER, peer_rows(runs, "hf-grouped"))
    )
    command = (
        f"OMP_NUM_THREADS=1 uv run python bench/peer_seq2seq.py --steps {args.steps} "
        f"--warmup {args.warmup} --train {args.train} --dev {args.dev} --seeds {args.seeds} "
        f"--variants {' '.join(args.variants)}"
    )
    emit(
        report("summarization against the Seq2SeqTrainer (benchmark 14)", command, body),
        args.out,
    )


if __name__ == "__main__":
    main()
