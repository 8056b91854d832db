"""Benchmark 2 — padding waste on the real data, and what it does to useful throughput.

For DialogSum (12,460 training dialogues, summarization's tokenizer, source <= 320 tokens) and
the Alpaca subset (5,000 records, lora_llm's tokenizer, <= 512 tokens), with batch 16:

- the share of padding tokens over one epoch with random batches, length-grouped batches
  (``trainer.group_by_length``) and, for the causal LM, packing (``data.packing``); computed from
  the task's own sample lengths and core's batch sampler, exactly as the trainer logs it;
- non-padding tokens per second of a short training run (the ``tiny`` model of each task on
  that data, CPU) in each mode, median of ``--reps`` runs.

    uv run python bench/padding.py --steps 20 --reps 3
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from pathlib import Path

from common import REPO, emit, repeat, report, table, train_run

DIALOGSUM = REPO.parent / "shared" / "data" / "dialogsum" / "dialogsum.train.2021-05-26.jsonl"
ALPACA = REPO.parent / "shared" / "data" / "alpaca" / "alpaca_5000.json"
BATCH = 16


def padding_share(lengths: list[int], grouped: bool, seed: int = 0) -> float:
    """Padding share of one epoch of ``BATCH``-sized batches (the trainer's formula)."""
    from core.engine.sampler import ShardedBatchSampler

    sampler = ShardedBatchSampler(
        len(lengths),
        BATCH,
        shuffle=True,
        seed=seed,
        lengths=lengths if grouped else None,
        group_by_length=grouped,
    )
    real = padded = 0
    for batch in sampler.global_batches(0):
        part = [lengths[i] for i in batch]
        real += sum(part)
        padded += max(part) * len(part)
    return 1.0 - real / padded


def summarization_config(*overrides: str):
    from core.config.loader import load_config
    from summarization.config import PRESETS_DIR, SummarizationConfig

    return load_config(
        SummarizationConfig,
        "tiny",
        [f"data.train_file={DIALOGSUM}", "data.max_val_samples=8", *overrides],
        PRESETS_DIR,
    )


def lora_config(*overrides: str):
    from core.config.loader import load_config
    from lora_llm.cli import PRESETS
    from lora_llm.config import LoraLLMConfig

    return load_config(
        LoraLLMConfig,
        "tiny",
        [
            f"data.train_files=[{ALPACA}]",
            "data.max_length=512",
            "data.on_bad_record=skip",
            "data.val_size=8",
            *overrides,
        ],
        PRESETS,
    )


def lengths_of(task_cls, cfg) -> list[int]:
    """The task's sample lengths of its training set (after its own preprocessing)."""
    task = task_cls(cfg)
    task.setup()
    return list(task.sample_lengths(task.train_dataset()))


def train_tokens_per_sec(task_cls, cfg) -> float:
    """Non-padding input tokens per second of a short CPU training run (summary.json)."""
    return train_run(cfg, task_cls(cfg))[0]["tokens_per_sec"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    from lora_llm.task import LoraLLMTask
    from summarization.task import SummarizationTask

    tmp = tempfile.mkdtemp()
    common = [
        f"run.root={tmp}",
        f"trainer.max_steps={args.steps}",
        f"trainer.batch_size={BATCH}",
        "trainer.accumulate_grad_batches=1",
        "trainer.val_every_n_steps=null",
        "trainer.val_at_end=false",
        "trainer.accelerator=cpu",
        "logger.progress_bar=false",
        "logger.plot=false",
        "checkpoint.keep_last=1",
    ]
    modes = {
        "DialogSum": {
            "random": (
                SummarizationTask,
                summarization_config("trainer.group_by_length=false", *common),
            ),
            "grouped": (
                SummarizationTask,
                summarization_config("trainer.group_by_length=true", *common),
            ),
        },
        "Alpaca": {
            "random": (LoraLLMTask, lora_config("trainer.group_by_length=false", *common)),
            "grouped": (LoraLLMTask, lora_config("trainer.group_by_length=true", *common)),
            "packing": (
                LoraLLMTask,
                lora_config("trainer.group_by_length=false", "data.packing=true", *common),
            ),
        },
    }
    rows = []
    for data_name, variants in modes.items():
        shares = {}
        for mode, (task_cls, cfg) in variants.items():
            lengths = lengths_of(task_cls, cfg)
            shares[mode] = padding_share(lengths, grouped=(mode == "grouped"))
        speeds = repeat(
            {
                mode: (lambda tc=tc, c=c: train_tokens_per_sec(tc, c))
                for mode, (tc, c) in variants.items()
            },
            args.reps,
        )
        base = statistics.median(speeds["random"])
        for mode in variants:
            med = statistics.median(speeds[mode])
            rows.append(
                [
                    data_name,
                    mode,
                    f"{100 * shares[mode]:.1f}%",
                    f"{med:,.0f}",
                    f"{min(speeds[mode]):,.0f} – {max(speeds[mode]):,.0f}",
                    f"{med / base:.2f}",
                ]
            )
    body = (
        f"Batch {BATCH}, one epoch's batches from core's sampler (seed 0). Throughput: the `tiny` "
        "model of each task, "
        f"{args.steps} steps on the CPU, non-padding input tokens per second from summary.json, "
        f"median of {args.reps} "
        "interleaved runs. Packing concatenates whole records into 512-token blocks (lora_llm; no "
        "sample attends to another).\n\n"
        + table(
            [
                "data",
                "batches",
                "padding share",
                "useful tokens/s (median)",
                "min – max",
                "ratio to random",
            ],
            rows,
        )
    )
    text = report(
        "Padding waste",
        f"uv run python bench/padding.py --steps {args.steps} --reps {args.reps}",
        body,
    )
    emit(text, args.out)


if __name__ == "__main__":
    main()
