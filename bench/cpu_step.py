"""Benchmark 8 — training speed of the from-scratch ``small`` summarizer on a CPU: attention kernel
and dropout.

The 30-minute quality check (package README of summarization) is bought in steps, so every
fraction of a CPU step counts. This runs the ``small`` preset on the real DialogSum train split
(length-grouped batches of 16, ``bf16-mixed``, the masked-LM auxiliary loss, no validation) for
``--steps`` steps with four settings and reports dialogues per second from ``summary.json``:

- ``model.attn_implementation``: ``sdpa`` (PyTorch's fused attention, transformers' default) or
  ``eager`` (matmul + softmax in Python);
- ``model.scratch.dropout``: 0.1 or 0.0 (a Bernoulli mask per activation is drawn on the CPU).

    uv run python bench/cpu_step.py --steps 60 --reps 2
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from pathlib import Path

from common import REPO, emit, repeat, report, table, train_run

DIALOGSUM = REPO.parent / "shared" / "data" / "dialogsum" / "dialogsum.train.2021-05-26.jsonl"
VARIANTS = {
    "sdpa, dropout 0.1": ("sdpa", 0.1),
    "eager, dropout 0.1": ("eager", 0.1),
    "sdpa, dropout 0.0": ("sdpa", 0.0),
    "eager, dropout 0.0 (the preset)": ("eager", 0.0),
}


def dialogues_per_sec(root: Path, steps: int, attention: str, dropout: float) -> float:
    """Training dialogues per second of a ``steps``-step ``small`` run (summary.json)."""
    from core.config.loader import load_config
    from summarization.config import PRESETS_DIR, SummarizationConfig
    from summarization.task import SummarizationTask

    cfg = load_config(
        SummarizationConfig,
        "small",
        [
            f"run.root={root}",
            f"data.train_file={DIALOGSUM}",
            "data.max_val_samples=8",
            f"trainer.max_steps={steps}",
            "trainer.val_every_n_steps=null",
            "trainer.val_at_end=false",
            "trainer.accelerator=cpu",
            "logger.progress_bar=false",
            "logger.plot=false",
            f"model.attn_implementation={attention}",
            f"model.scratch.dropout={dropout}",
        ],
        PRESETS_DIR,
    )
    return train_run(cfg, SummarizationTask(cfg))[0]["samples_per_sec"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    root = Path(tempfile.mkdtemp())
    speeds = repeat(
        {
            name: (lambda a=a, d=d: dialogues_per_sec(root, args.steps, a, d))
            for name, (a, d) in VARIANTS.items()
        },
        args.reps,
    )
    base = statistics.median(speeds["sdpa, dropout 0.1"])
    rows = [
        [
            name,
            f"{statistics.median(v):.1f}",
            f"{min(v):.1f} – {max(v):.1f}",
            f"{statistics.median(v) / base:.2f}",
        ]
        for name, v in speeds.items()
    ]
    body = (
        "The `small` preset (mBART layout, d=256, 3+3 layers, bf16-mixed, encoder MLM 0.15), "
        "DialogSum train, batch 16 "
        f"grouped by length, {args.steps} steps (the first ones included), no validation; "
        "training dialogues per second "
        f"from summary.json, median of {args.reps} interleaved runs.\n\n"
        + table(["attention, dropout", "dialogues/s (median)", "min – max", "ratio"], rows)
    )
    emit(
        report(
            "CPU training step of the from-scratch summarizer",
            f"uv run python bench/cpu_step.py --steps {args.steps} --reps {args.reps}",
            body,
        ),
        args.out,
    )


if __name__ == "__main__":
    main()
