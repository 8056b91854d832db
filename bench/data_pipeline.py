"""Benchmark 3 — data pipeline: how fast each task's preprocessing turns raw records into
training samples, cold (empty cache) and cached.

- summarization: DialogSum train (12,460 dialogues) -> validated rows -> tokenised with
  ``datasets.map(batched=True)``; the Arrow cache makes a second run a cache hit
  (``data.cache_dir``);
- lora_llm: the Alpaca subset (5,000 records), and the same records ten times over in an indented
  JSON array (50k records, 21 MB: the size of the full Alpaca data) -> prompt template -> token
  ids with response-only labels (kept in memory: no cache, every run is cold);
- qwen_vl: counting conversations with images -> qwen-vl-utils + the Qwen2.5-VL processor
  (pixel values, vision-token expansion, labels) per sample, as the data loader does it.

Rates are records per second of ``Task.setup()`` (for qwen_vl: of building samples), median of
``--reps`` runs.

    uv run python bench/data_pipeline.py --reps 3
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

from common import REPO, emit, report, table

DIALOGSUM = REPO.parent / "shared" / "data" / "dialogsum" / "dialogsum.train.2021-05-26.jsonl"
ALPACA = REPO.parent / "shared" / "data" / "alpaca" / "alpaca_5000.json"


def summarization_setup(cache: Path) -> tuple[int, float]:
    """(records, seconds) of SummarizationTask.setup on DialogSum train with cache folder
    ``cache``."""
    from core.config.loader import load_config
    from summarization.config import PRESETS_DIR, SummarizationConfig
    from summarization.task import SummarizationTask

    cfg = load_config(
        SummarizationConfig,
        "tiny",
        [f"data.train_file={DIALOGSUM}", f"data.cache_dir={cache}", "data.max_val_samples=8"],
        PRESETS_DIR,
    )
    task = SummarizationTask(cfg)
    start = time.perf_counter()
    task.setup()
    return len(task.train_dataset()), time.perf_counter() - start


def alpaca_times_ten(folder: Path) -> Path:
    """The Alpaca subset's good records ten times over, as an indented JSON array (one field a
    line)."""
    import json

    records = [r for r in json.loads(ALPACA.read_text(encoding="utf-8")) if r["output"].strip()]
    path = folder / "alpaca_x10.json"
    path.write_text(json.dumps(records * 10, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def lora_setup(path: Path = ALPACA) -> tuple[int, float]:
    """(records, seconds) of LoraLLMTask.setup on an Alpaca file at 512 tokens."""
    from core.config.loader import load_config
    from lora_llm.cli import PRESETS
    from lora_llm.config import LoraLLMConfig
    from lora_llm.task import LoraLLMTask

    cfg = load_config(
        LoraLLMConfig,
        "tiny",
        [
            f"data.train_files=[{path}]",
            "data.max_length=512",
            "data.on_bad_record=skip",
            "data.val_size=0",
        ],
        PRESETS,
    )
    task = LoraLLMTask(cfg)
    start = time.perf_counter()
    task.setup()
    return len(task.train_dataset()), time.perf_counter() - start


def qwen_samples(folder: Path) -> tuple[int, float]:
    """(records, seconds) to set up the tiny Qwen-VL task and build every training sample."""
    from core.config.loader import load_config
    from qwen_vl.cli import PRESETS_DIR
    from qwen_vl.config import QwenVLConfig
    from qwen_vl.task import QwenVLTask

    cfg = load_config(
        QwenVLConfig,
        "tiny",
        [f"data.train_file={folder / 'train.jsonl'}", f"data.val_file={folder / 'dev.jsonl'}"],
        PRESETS_DIR,
    )
    task = QwenVLTask(cfg)
    start = time.perf_counter()
    task.setup()
    data = task.train_dataset()
    for i in range(len(data)):
        data[i]
    return len(data), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--qwen-records", type=int, default=400)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    results: dict[tuple[str, str], list[float]] = {}
    big = alpaca_times_ten(Path(tempfile.mkdtemp()))
    for rep in range(args.reps):
        cache = Path(tempfile.mkdtemp())
        n, cold = summarization_setup(cache)
        _, warm = summarization_setup(cache)
        results.setdefault(("summarization (DialogSum train)", "cold"), []).append(n / cold)
        results.setdefault(("summarization (DialogSum train)", "cached"), []).append(n / warm)
        n, seconds = lora_setup()
        results.setdefault(("lora_llm (Alpaca 5,000)", "cold (no cache)"), []).append(n / seconds)
        n_big, seconds_big = lora_setup(big)
        results.setdefault(("lora_llm (Alpaca x 10: 50k, 21 MB)", "cold (no cache)"), []).append(
            n_big / seconds_big
        )
        print(
            f"  rep {rep + 1}: summarization "
            f"{results[('summarization (DialogSum train)', 'cold')][-1]:.0f} / "
            f"{results[('summarization (DialogSum train)', 'cached')][-1]:.0f} rows/s; lora_llm "
            f"{n / seconds:.0f} rows/s",
            flush=True,
        )
    import subprocess
    import sys

    folder = Path(tempfile.mkdtemp()) / "counting"
    subprocess.run(
        [
            str(Path(sys.executable).parent / "make-data"),
            "--out",
            str(folder),
            "--n",
            str(args.qwen_records),
        ],
        check=True,
        capture_output=True,
    )
    for _ in range(args.reps):
        n, seconds = qwen_samples(folder)
        results.setdefault(
            (f"qwen_vl (counting, {n} images)", "per sample, every epoch"), []
        ).append(n / seconds)
    rows = [
        [name, mode, f"{statistics.median(v):,.0f}", f"{min(v):,.0f} – {max(v):,.0f}"]
        for (name, mode), v in results.items()
    ]
    body = f"Records per second, median of {args.reps} runs (CPU, one process).\n\n" + table(
        ["task (data)", "pass", "records/s (median)", "min – max"], rows
    )
    text = report("Data pipeline", f"uv run python bench/data_pipeline.py --reps {args.reps}", body)
    emit(text, args.out)


if __name__ == "__main__":
    main()
