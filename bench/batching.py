"""Benchmark 10 — batching: held-out quality and training time of random, length-grouped and packed
batches, over seeds, and why grouping can cost quality.

For each task (``summarization``: the from-scratch ``small`` model on the first
``--sum-train`` DialogSum training dialogues, dev loss and ROUGE-L on the first ``--sum-dev`` dev
dialogues; ``lora_llm``: LoRA r=8 on q/k/v/o of a random 14.3M-parameter Llama base with a 16-bit
base, ``--lora-train`` Alpaca records, held-out loss on 200 other records) it trains one epoch in
each batching mode and seed and reports mean ± std of the held-out metrics and of the training
time. The modes (``--modes``):

- ``random``: ``trainer.group_by_length=false``;
- ``groupN``: ``trainer.group_by_length=true trainer.group_chunk_batches=N`` (today's scheme is
  ``group64``: mega-batches of 64 batches are sorted by length and cut, batch order shuffled);
- ``groupN-fixed``: the same batches, but each step's summed token loss is divided by the
  epoch's *mean* loss tokens per step instead of its own (every token weighs the same in every
  step). Not a config option: a diagnostic that separates the per-token weighting from the
  within-batch homogeneity;
- ``pack`` (lora_llm): ``data.packing=true``, random batches of packed 256-token rows.

Training time is both the wall time of the training loop (``train_seconds`` of summary.json) and
the CPU time of the process during it: on a shared machine the CPU time is the steadier figure.
Run with ``OMP_NUM_THREADS=1``; per-run results are cached as JSON under ``--results`` so a long
study can be stopped and continued, and the tables re-made without training (``--report-only``).

The first table needs no training: for each mode, the padding share, the spread of loss tokens per
optimizer step and what the per-token normalisation (the step's summed token loss divided by its
own token count) does to the weight of each token, against one weight for every token.

    OMP_NUM_THREADS=1 uv run python bench/batching.py --seeds 3 --out docs/benchmarks.md

(about 3 hours on one CPU core; two processes can share a study with ``--train-seeds``)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from common import REPO, cpu_timed_trainer, emit, machine, report, table

DATA = REPO.parent / "shared" / "data"
DIALOGSUM_TRAIN = DATA / "dialogsum" / "dialogsum.train.2021-05-26.jsonl"
DIALOGSUM_DEV = DATA / "dialogsum" / "dialogsum.dev.jsonl"
ALPACA = DATA / "alpaca" / "alpaca_5000.json"
LORA_VAL = 200
DEFAULT_MODES = {
    "summarization": ["random", "group64", "group8", "group64-fixed"],
    "lora_llm": ["random", "group64", "group8", "group64-fixed", "pack", "pack5"],
}
CHUNK_SWEEP = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class Mode:
    """One batching mode.

    Attributes:
        name: the ``--modes`` key (``random``, ``groupN``, ``groupN-fixed``, ``pack``,
            ``packB``).
        chunk: ``trainer.group_chunk_batches`` (None: random batches).
        packing: ``data.packing``.
        fixed_divisor: divide each step's token loss by the epoch's mean tokens per step.
        batch: ``trainer.batch_size`` (None: the study's batch size of the task).
    """

    name: str
    chunk: int | None = None
    packing: bool = False
    fixed_divisor: bool = False
    batch: int | None = None

    @classmethod
    def parse(cls, name: str) -> Mode:
        """``random`` | ``pack`` | ``packB`` | ``groupN`` | ``groupN-fixed`` -> a :class:`Mode`."""
        if name == "random":
            return cls(name)
        if name.startswith("pack"):
            rows = name.removeprefix("pack")
            if rows == "" or (rows.isdigit() and int(rows) >= 1):
                return cls(name, packing=True, batch=int(rows) if rows else None)
        if name.startswith("group"):
            chunk, _, suffix = name.removeprefix("group").partition("-")
            if chunk.isdigit() and int(chunk) >= 1 and suffix in ("", "fixed"):
                return cls(name, chunk=int(chunk), fixed_divisor=suffix == "fixed")
        raise SystemExit(f"unknown mode {name!r}: use random, pack, packB, groupN or groupN-fixed")

    def overrides(self) -> list[str]:
        """The config overrides of this mode."""
        out = [f"trainer.group_by_length={str(self.chunk is not None).lower()}"]
        if self.chunk is not None:
            out.append(f"trainer.group_chunk_batches={self.chunk}")
        if self.packing:
            out.append("data.packing=true")
        if self.batch is not None:
            out.append(f"trainer.batch_size={self.batch}")
        return out

    def label(self) -> str:
        """The row label of the tables."""
        if self.packing:
            return f"packed rows, random batches{f' of {self.batch}' if self.batch else ''}"
        if self.chunk is None:
            return "random"
        text = f"grouped, mega-batch {self.chunk}"
        if self.chunk == 64:
            text += " (core default)"
        return text + (", fixed divisor" if self.fixed_divisor else "")


# -- configs -----------------------------------------------------------------------------------


def common_overrides(root: Path, seed: int) -> list[str]:
    """Overrides every run shares: one epoch, validation only at the end, quiet, CPU."""
    return [
        f"run.root={root}",
        f"trainer.seed={seed}",
        "trainer.max_steps=null",
        "trainer.max_epochs=1",
        "trainer.max_time=null",
        "trainer.accumulate_grad_batches=1",
        "trainer.val_every_n_steps=null",
        "trainer.val_at_end=true",
        "trainer.log_every_n_steps=1000",
        "trainer.accelerator=cpu",
        "logger.progress_bar=false",
        "logger.plot=false",
        "checkpoint.keep_last=1",
        "checkpoint.keep_best=1",
    ]


def build_config(task: str, mode: Mode, seed: int, root: Path, args: argparse.Namespace) -> Any:
    """The config of one run (preset + study sizes + the mode's switches).

    Args:
        task: ``summarization`` or ``lora_llm``.
        mode: the batching mode.
        seed: ``trainer.seed`` (model init, data order, dropout / masking).
        root: ``run.root``.
        args: the command line (sizes).

    Returns:
        The task's root config.
    """
    from core.config.loader import load_config

    shared = common_overrides(root, seed) + mode.overrides()
    if task == "summarization":
        from summarization.config import PRESETS_DIR, SummarizationConfig

        # The `small` preset (mBART layout, encoder MLM, bf16-mixed, eager attention) for one
        # epoch of a subset; warmup scaled to the shorter run (preset: 150 of 5,200 steps).
        return load_config(
            SummarizationConfig,
            "small",
            [
                f"data.train_file={DIALOGSUM_TRAIN}",
                f"data.val_file={DIALOGSUM_DEV}",
                f"data.max_train_samples={args.sum_train}",
                f"data.max_val_samples={args.sum_dev}",
                "trainer.batch_size=16",
                "optim.warmup_steps=30",
                *shared,
            ],
            PRESETS_DIR,
        )
    from lora_llm.cli import PRESETS
    from lora_llm.config import LoraLLMConfig

    # The set-up: a random 14.3M-parameter Llama (d=384, 8 layers, GQA 6/2 heads) as a
    # 16-bit (bf16) base, LoRA r=8 on q/k/v/o, AdamW 2e-3 cosine, batch 8, max length 256.
    return load_config(
        LoraLLMConfig,
        "tiny",
        [
            f"data.train_files=[{ALPACA}]",
            f"data.max_samples={args.lora_train + LORA_VAL}",
            f"data.val_size={LORA_VAL}",
            "data.max_length=256",
            "data.on_bad_record=skip",
            "data.long_prompts=skip",
            "quant.bits=null",
            "model.dtype=bfloat16",
            "model.gradient_checkpointing=false",
            "model.tiny.hidden_size=384",
            "model.tiny.intermediate_size=1024",
            "model.tiny.num_layers=8",
            "model.tiny.num_heads=6",
            "model.tiny.num_kv_heads=2",
            "trainer.batch_size=8",
            "trainer.precision=bf16-mixed",
            "optim.name=adamw",
            "optim.lr=2e-3",
            "optim.warmup_steps=10",
            "checkpoint.trainable_only=true",
            *shared,
        ],
        PRESETS,
    )


def batch_size(task: str, mode: Mode) -> int:
    """Rows per step of ``mode`` (16 dialogues for summarization, 8 records for lora_llm)."""
    return mode.batch or (16 if task == "summarization" else 8)


def make_task(task: str, cfg: Any) -> Any:
    """The task object for ``cfg``."""
    if task == "summarization":
        from summarization.task import SummarizationTask

        return SummarizationTask(cfg)
    from lora_llm.task import LoraLLMTask

    return LoraLLMTask(cfg)


# -- what the sampler does to steps (no training) ------------------------------------------------


def sample_table(task_name: str, cfg: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-item grouping lengths and loss-token counts of the training set, as the trainer sees it.

    Returns:
        ``(lengths, loss_tokens)``, both ``(items,)`` int arrays (items are packed rows with
        ``data.packing``).
    """
    task = make_task(task_name, cfg)
    task.setup()
    data = task.train_dataset()
    lengths = np.asarray(task.sample_lengths(data))
    tokens = np.asarray([task.count_loss_tokens(task.collate([data[i]])) for i in range(len(data))])
    return lengths, tokens


def step_batches(lengths: np.ndarray, batch: int, chunk: int | None, seed: int) -> list[list[int]]:
    """Epoch 0's batches of core's sampler for ``trainer.seed=seed`` (chunk None: random)."""
    from core.engine.sampler import ShardedBatchSampler

    sampler = ShardedBatchSampler(
        len(lengths),
        batch,
        seed=seed,
        lengths=lengths.tolist() if chunk else None,
        group_by_length=chunk is not None,
        group_chunk_batches=chunk or 1,
    )
    return sampler.global_batches(0)


def weighting(
    lengths: np.ndarray, tokens: np.ndarray, batches: list[list[int]]
) -> dict[str, float]:
    """What a mode's batches do to padding and to the weight of each loss token.

    Per-token normalisation divides a step's summed token loss by its own loss tokens ``T_s``, so
    a token of step ``s`` weighs ``mean(T) / T_s`` relative to one weight for every token of the
    epoch (the weighting of the held-out loss).

    Args:
        lengths: ``(items,)`` grouping lengths (what the collator pads).
        tokens: ``(items,)`` loss tokens per item.
        batches: the epoch's batches (index lists).

    Returns:
        ``padding`` share, ``steps``, ``tokens_cv`` (std / mean of ``T_s``), ``ess``: Kish's
        effective share of tokens ``(sum w)^2 / (n sum w^2)`` over all tokens, ``w_short`` /
        ``w_long``: mean weight of the tokens of the items in the lowest / highest quartile of
        loss tokens, ``max_ratio``: largest over smallest step weight, and ``p5``: the 5th
        percentile of ``T_s / mean(T)`` (how short the shortest steps are).
    """
    real = padded = 0
    weights = np.zeros(len(tokens))
    step_tokens = np.asarray([tokens[b].sum() for b in batches], dtype=float)
    mean_tokens = step_tokens.mean()
    for b, t in zip(batches, step_tokens, strict=True):
        real += int(lengths[b].sum())
        padded += int(lengths[b].max()) * len(b)
        weights[b] = mean_tokens / max(t, 1.0)
    used = tokens > 0
    w, n = weights[used], tokens[used].astype(float)
    low, high = np.quantile(n, [0.25, 0.75])
    return {
        "padding": 1.0 - real / padded,
        "steps": len(batches),
        "tokens_cv": float(step_tokens.std() / mean_tokens),
        "ess": float((n * w).sum() ** 2 / (n.sum() * (n * w * w).sum())),
        "w_short": float((n * w)[n <= low].sum() / n[n <= low].sum()),
        "w_long": float((n * w)[n >= high].sum() / n[n >= high].sum()),
        "max_ratio": float(step_tokens.max() / max(step_tokens.min(), 1.0)),
        "p5": float(np.percentile(step_tokens, 5) / mean_tokens),
    }


def analysis(task_name: str, args: argparse.Namespace, root: Path) -> tuple[list[list[str]], dict]:
    """The no-training table of one task: every mode of ``CHUNK_SWEEP`` and packing, seeds averaged.

    Returns:
        ``(rows, per_mode)``: table rows and ``{mode name: {"divisor": mean T_s, ...}}``.
    """
    modes = [Mode("random")] + [Mode(f"group{c}", chunk=c) for c in CHUNK_SWEEP]
    if task_name == "lora_llm":
        modes += [Mode.parse("pack"), Mode.parse("pack5")]
    cached: dict[bool, tuple[np.ndarray, np.ndarray]] = {}
    rows, per_mode = [], {}
    for mode in modes:
        if mode.packing not in cached:
            cfg = build_config(task_name, mode, 0, root, args)
            cached[mode.packing] = sample_table(task_name, cfg)
        lengths, tokens = cached[mode.packing]
        stats = [
            weighting(
                lengths,
                tokens,
                step_batches(lengths, batch_size(task_name, mode), mode.chunk, seed),
            )
            for seed in range(args.seeds)
        ]
        mean = {k: statistics.fmean(s[k] for s in stats) for k in stats[0]}
        mean["divisor"] = float(tokens.sum()) / mean["steps"]
        per_mode[mode.name] = mean
        rows.append(
            [
                mode.label(),
                f"{mean['steps']:.0f}",
                f"{100 * mean['padding']:.1f}%",
                f"{mean['divisor']:.0f}",
                f"{mean['tokens_cv']:.2f}",
                f"{mean['max_ratio']:.1f}",
                f"{mean['p5']:.2f}",
                f"{mean['w_short']:.2f}",
                f"{mean['w_long']:.2f}",
                f"{100 * mean['ess']:.0f}%",
            ]
        )
    return rows, per_mode


# -- training runs ---------------------------------------------------------------------------------


def study_trainer_class() -> type:
    """core's Trainer, recording per-step facts and the training loop's CPU time (and, for the
    ``-fixed`` modes, dividing by a fixed token count)."""

    class StudyTrainer(cpu_timed_trainer()):
        """Trainer that records ``(loss tokens, padded tokens, grad norm)`` of every step."""

        fixed_divisor: float | None = None

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.step_records: list[tuple[int, int, float]] = []

        def training_step(self, window: list[dict], global_tokens: int) -> tuple:
            """The engine's step; records the step's loss tokens, its padded input size and the
            gradient norm before clipping."""
            divisor = self.fixed_divisor or global_tokens
            out = super().training_step(window, divisor)
            padded = sum(int(b["input_ids"].numel()) for b in window)
            norm = float(out[2]) if out[2] is not None else math.nan
            self.step_records.append((int(global_tokens), padded, norm))
            return out

    return StudyTrainer


def grad_stats(steps: Sequence[tuple[int, int, float]], clip: float) -> dict[str, float]:
    """Gradient-norm statistics of a run, after the first 10% of steps (warmup, fast early fall).

    Returns:
        ``grad_median``, ``grad_cv`` (std / mean), ``clipped`` (share of steps above ``clip``),
        ``grad_tokens_corr``: Pearson correlation of log grad norm with log loss tokens per step.
    """
    rest = [s for s in steps[len(steps) // 10 :] if math.isfinite(s[2])]
    tokens = np.log(np.asarray([max(s[0], 1) for s in rest], dtype=float))
    norms = np.asarray([s[2] for s in rest])
    corr = float(np.corrcoef(tokens, np.log(norms))[0, 1]) if tokens.std() > 0 else math.nan
    return {
        "grad_median": float(np.median(norms)),
        "grad_cv": float(norms.std() / norms.mean()),
        "clipped": float((norms > clip).mean()),
        "grad_tokens_corr": corr,
    }


def train_once(
    task_name: str, mode: Mode, seed: int, args: argparse.Namespace, divisor: float
) -> dict[str, Any]:
    """Train one epoch of one (task, mode, seed) and return its measurements.

    Returns:
        ``{"val_loss", "val_rougeL" (summarization), "train_seconds", "cpu_seconds", "steps",
        grad statistics...}``.
    """
    root = Path(tempfile.mkdtemp(prefix="batching-"))
    try:
        cfg = build_config(task_name, mode, seed, root, args)
        trainer_cls = study_trainer_class()
        trainer = trainer_cls(cfg, make_task(task_name, cfg), argv=["bench/batching.py"])
        if mode.fixed_divisor:
            trainer.fixed_divisor = divisor
        result = trainer.fit()
        summary = json.loads((result.run_dir / "summary.json").read_text())
        out = {
            "val_loss": result.metrics["val/loss"],
            "train_seconds": summary["train_seconds"],
            "cpu_seconds": trainer.cpu_seconds,
            "steps": result.step,
            **grad_stats(trainer.step_records, cfg.trainer.gradient_clip_val or math.inf),
        }
        if "val/rougeL" in result.metrics:
            out["val_rougeL"] = result.metrics["val/rougeL"]
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def result_path(results: Path, task: str, mode: str, seed: int, args: argparse.Namespace) -> Path:
    """Where one run's JSON is cached (the sizes are part of the name)."""
    size = args.sum_train if task == "summarization" else args.lora_train
    return results / f"{task}-n{size}-{mode}-seed{seed}.json"


def fmt(values: Sequence[float], digits: int) -> str:
    """``mean ± std`` (sample std) of ``values``."""
    if not values:
        return "–"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"


def results_rows(task: str, modes: list[Mode], runs: dict[str, list[dict]]) -> list[list[str]]:
    """The training table of one task: mean ± std over seeds per mode."""
    base = runs.get("random", [])
    base_cpu = statistics.fmean(r["cpu_seconds"] for r in base) if base else math.nan
    rows = []
    for mode in modes:
        got = runs.get(mode.name, [])
        if not got:
            continue
        cpu = [r["cpu_seconds"] for r in got]
        row = [mode.label(), str(len(got)), fmt([r["val_loss"] for r in got], 4)]
        if task == "summarization":
            row.append(fmt([r["val_rougeL"] for r in got], 4))
        row += [
            fmt(cpu, 0),
            f"{base_cpu / statistics.fmean(cpu):.2f}",
            fmt([r["train_seconds"] for r in got], 0),
            f"{statistics.fmean(r['steps'] for r in got):.0f}",
            f"{statistics.fmean(r['grad_median'] for r in got):.3f}",
            f"{statistics.fmean(r['grad_cv'] for r in got):.2f}",
            f"{100 * statistics.fmean(r['clipped'] for r in got):.0f}%",
            f"{statistics.fmean(r['grad_tokens_corr'] for r in got):+.2f}",
        ]
        rows.append(row)
    return rows


def main() -> None:
    """Run the study (or re-make its tables from cached results) and print / append the section."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["summarization", "lora_llm"])
    parser.add_argument("--modes", nargs="+", default=None, help="default: per task, see top")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per mode")
    parser.add_argument(
        "--train-seeds",
        type=int,
        nargs="+",
        default=None,
        help="train only these seeds (the others are read from --results if cached): lets two "
        "processes share a study, one seed each",
    )
    parser.add_argument("--sum-train", type=int, default=5000, help="DialogSum training rows")
    parser.add_argument("--sum-dev", type=int, default=200, help="DialogSum dev rows")
    parser.add_argument("--lora-train", type=int, default=2000, help="Alpaca training records")
    parser.add_argument("--results", type=Path, default=Path(tempfile.gettempdir()) / "batching")
    parser.add_argument("--report-only", action="store_true", help="no training: cached runs")
    parser.add_argument("--analysis-only", action="store_true", help="only the no-training table")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    args.results.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="batching-setup-"))
    sections = []
    for task in args.tasks:
        modes = [Mode.parse(m) for m in (args.modes or DEFAULT_MODES[task])]
        rows, per_mode = analysis(task, args, scratch)
        sections.append(
            f"**{task}: what each mode does to the steps** (no training; epoch 0 of seeds "
            f"0..{args.seeds - 1}, averaged)\n\n"
            + table(
                [
                    "batches",
                    "steps",
                    "padding",
                    "mean loss tokens / step",
                    "CV of loss tokens / step",
                    "largest / smallest step",
                    "5th percentile step / mean",
                    "weight of short-sample tokens",
                    "weight of long-sample tokens",
                    "effective tokens",
                ],
                rows,
            )
        )
        if args.analysis_only:
            continue
        runs: dict[str, list[dict]] = {}
        for seed in range(args.seeds):  # seeds outermost: slow phases of the machine hit all modes
            for mode in modes:
                path = result_path(args.results, task, mode.name, seed, args)
                if not path.is_file():
                    if args.report_only or (args.train_seeds and seed not in args.train_seeds):
                        continue
                    # Mean loss tokens per step: the same for every mode of unpacked items.
                    divisor = per_mode["random"]["divisor"]
                    out = train_once(task, mode, seed, args, divisor)
                    path.write_text(json.dumps(out, indent=1))
                out = json.loads(path.read_text())
                print(f"  {task} {mode.name} seed {seed}: {out}", flush=True)
                runs.setdefault(mode.name, []).append(out)
        header = ["batches", "seeds", "held-out loss"]
        if task == "summarization":
            header.append("dev ROUGE-L")
        header += [
            "train CPU s",
            "speed vs random",
            "train wall s",
            "steps",
            "grad norm (median)",
            "grad norm CV",
            "steps clipped",
            "corr(log grad norm, log tokens)",
        ]
        sections.append(
            f"**{task}: one epoch per run, mean ± std over seeds**\n\n"
            + table(header, results_rows(task, modes, runs))
        )
    shutil.rmtree(scratch, ignore_errors=True)
    body = (
        f"Sizes: summarization `small` on the first {args.sum_train} DialogSum training dialogues "
        f"(batch 16), dev loss and greedy ROUGE-L on the first {args.sum_dev} dev dialogues; "
        f"lora_llm on {args.lora_train} Alpaca records (batch 8, max length 256), held-out loss "
        f"on {LORA_VAL} others. One process, one thread. {machine().split(';')[0]}.\n\n"
        + "\n\n".join(sections)
    )
    command = (
        f"OMP_NUM_THREADS=1 uv run python bench/batching.py --seeds {args.seeds} "
        f"--sum-train {args.sum_train} --sum-dev {args.sum_dev} --lora-train {args.lora_train}"
    )
    emit(
        report(
            "Batching: held-out quality and training time of random, grouped and packed batches "
            "(benchmark 10)",
            command,
            body,
        ),
        args.out,
    )


if __name__ == "__main__":
    main()
