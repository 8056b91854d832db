"""Benchmark 12 — padded, grouped, packed and padding-free batches of lora_llm: useful tokens/s.

The ``tiny`` preset (QLoRA of a 2-layer Llama) on the Alpaca subset (5,000 records, at most 512
tokens), 20 optimizer steps on the CPU, non-padding tokens per second from ``summary.json``,
median of interleaved runs:

- ``padded``: random batches of 16 samples, padded to the longest;
- ``grouped``: ``trainer.group_by_length`` (the presets' default);
- ``packed``: ``data.packing`` rows of 512 tokens, 4 rows per batch (about 16 samples), one
  block-diagonal mask per row;
- ``padding-free``: grouped batches of 16 flattened into one row (``data.padding_free``): on the
  CPU transformers builds the block-diagonal mask over the whole micro-batch; on a GPU with
  ``flash_attention_2`` no mask is built (flash-attention's variable-length kernel);
- ``packed + padding-free``: packed rows flattened as well.

    uv run python bench/packing.py --steps 20 --reps 2
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile

from common import emit, repeat, report, table
from padding import lora_config, train_tokens_per_sec

MODES = {
    "padded": ["trainer.group_by_length=false", "trainer.batch_size=16"],
    "grouped": ["trainer.group_by_length=true", "trainer.batch_size=16"],
    "packed": ["data.packing=true", "trainer.batch_size=4"],
    "padding-free": [
        "trainer.group_by_length=true",
        "trainer.batch_size=16",
        "data.padding_free=true",
    ],
    "packed + padding-free": [
        "data.packing=true",
        "trainer.batch_size=4",
        "data.padding_free=true",
    ],
}
"""Overrides of each mode (on top of the tiny preset with the Alpaca data)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    from lora_llm.task import LoraLLMTask

    tmp = tempfile.mkdtemp()
    common = [
        f"run.root={tmp}",
        f"trainer.max_steps={args.steps}",
        "trainer.accumulate_grad_batches=1",
        "trainer.val_every_n_steps=null",
        "trainer.val_at_end=false",
        "trainer.accelerator=cpu",
        "logger.progress_bar=false",
        "logger.plot=false",
        "checkpoint.keep_last=1",
    ]
    configs = {mode: lora_config(*common, *extra) for mode, extra in MODES.items()}
    speeds = repeat(
        {
            mode: (lambda c=cfg: train_tokens_per_sec(LoraLLMTask, c))
            for mode, cfg in configs.items()
        },
        args.reps,
    )
    base = statistics.median(speeds["padded"])
    rows = []
    for mode in MODES:
        med = statistics.median(speeds[mode])
        spread = f"{min(speeds[mode]):,.0f} – {max(speeds[mode]):,.0f}"
        rows.append([mode, " ".join(MODES[mode]), f"{med:,.0f}", spread, f"{med / base:.2f}"])
    body = (
        f"lora_llm `tiny` preset (QLoRA, sdpa attention, loss.chunked) on Alpaca (5,000 records, "
        f"max 512 tokens), {args.steps} steps on the CPU, non-padding input tokens per second "
        f"from summary.json, median of {args.reps} interleaved runs.\n\n"
        + table(["batches", "settings", "useful tokens/s", "min – max", "x padded"], rows)
    )
    command = f"uv run python bench/packing.py --steps {args.steps} --reps {args.reps}"
    emit(
        report("Packed, grouped, padded and padding-free batches (lora_llm)", command, body),
        args.out,
    )


if __name__ == "__main__":
    main()
