"""Benchmark 13 — lora_llm against TRL's ``SFTTrainer``: held-out loss and training time, side by
side, over seeds, and one factor at a time.

Both tools fine-tune the same base (a random Llama written by lora_llm's ``tiny`` base builder with
``save_pretrained``, loaded back in bfloat16 through ``from_pretrained``) with LoRA r 8, alpha 16
on q/k/v/o, on the same Alpaca records in the same prompt template
(``lora_llm.data.PROMPTS["alpaca"]``), batch 8, max length 256, AdamW at 2e-3 with a cosine
schedule, one epoch. TRL gets its defaults for prompt-completion data (``completion_only_loss``,
bf16 autocast, gradient checkpointing, no warmup, LoRA dropout 0, random batches); lora_llm gets
its preset's (``tiny`` with a 16-bit base: bf16-mixed, packed rows, 5 per step, about the tokens
of 8 samples; warmup, LoRA dropout 0) with the study's sizes. ``grouped8`` is the preset's
batching before this study (unpacked, batch 8, grouped by length), ``dropout0.05`` the preset as
it was before this study (that batching and LoRA dropout 0.05), and each ``<factor>-dropout0.05``
variant changes one factor of it (``FACTORS``), so the table shows where a difference in quality
comes from.

The held-out loss of every run is computed by the same plain-peft code (:func:`held_out_loss`):
the base in float32 plus the saved adapter, token-weighted mean cross-entropy over the response
and its EOS of ``--val`` records the runs never saw. Training time is the CPU time of the
training loop only, robust to a busy machine (the wall time is cached too); model loading,
tokenisation and evaluation are outside it.

    OMP_NUM_THREADS=1 uv run --group bench python bench/peer_trl.py --sizes s --train 1200 \
        --seeds 3 --variants trl trl-no-checkpointing lora_llm grouped8 dropout0.05 \
        random-dropout0.05 group64-dropout0.05 packed5-dropout0.05 warmup0-dropout0.05 \
        decay0.01-dropout0.05 prompt-loss-dropout0.05 accum2-dropout0.05 \
        accum2-mean-dropout0.05 --out docs/benchmarks.md
    OMP_NUM_THREADS=1 uv run --group bench python bench/peer_trl.py --sizes xs --train 2400 \
        --seeds 3 --variants trl lora_llm grouped8 dropout0.05 random-dropout0.05 \
        group64-dropout0.05 packed5-dropout0.05 --out docs/benchmarks.md

and more seeds of the headline rows (``--sizes s ... --seeds 10 --train-seeds 3 4 5 6 7 8 9
--variants trl lora_llm``; ``--sizes xs ... --seeds 5 --train-seeds 3 4 --variants trl lora_llm``);
``--report-only`` with ``--seeds 10`` / ``--seeds 5`` then tables every cached seed.

Per-run results are cached as JSON under ``--results`` (so a long study can be stopped and
continued, or shared by two processes with ``--train-seeds``); ``--report-only`` re-makes the
tables from the cache. TRL is a bench-only dependency (the ``bench`` group of the root
pyproject), never a runtime one.
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

from common import (
    PEER_HEADER_CPU,
    REPO,
    cached_runs,
    cpu_timed_trainer,
    emit,
    machine,
    peer_rows,
    report,
    table,
)

ALPACA = REPO.parent / "shared" / "data" / "alpaca" / "alpaca_5000.json"
MAX_LENGTH = 256
BATCH = 8
LR = 2e-3
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]

SIZES = {
    # name: (hidden, intermediate, layers, heads, kv heads): random Llama bases.
    "xs": (256, 704, 6, 4, 2),
    "s": (384, 1024, 8, 6, 2),  # 14.3M parameters with the tiny tokenizer (benchmark 10's base)
    "m": (512, 1408, 12, 8, 2),
}

FACTORS: dict[str, list[str]] = {
    # One factor of the old preset (OLD_PRESET) changed at a time (TRL's setting where it has one).
    "random": ["trainer.group_by_length=false"],
    "group64": ["trainer.group_chunk_batches=64"],
    # Packed rows, 5 per step (about the tokens of 8 samples): benchmark 10's fastest mode.
    "packed5": ["data.packing=true", "trainer.batch_size=5"],
    "warmup0": ["optim.warmup_steps=0"],
    "decay0.01": ["optim.weight_decay=0.01"],
    "prompt-loss": ["data.train_on_prompt=true"],
    # Loss normalisation only differs with accumulation: at 8 x 1 both ways divide a step's
    # summed token loss by that step's loss tokens (as TRL does). So both at 4 x 2.
    "accum2": ["trainer.batch_size=4", "trainer.accumulate_grad_batches=2"],
    "accum2-mean": [
        "trainer.batch_size=4",
        "trainer.accumulate_grad_batches=2",
        "trainer.loss_normalization=mean",
    ],
}
GROUPED8 = [
    "data.packing=false",
    f"trainer.batch_size={BATCH}",
    "trainer.group_by_length=true",
    "trainer.group_chunk_batches=8",
]
"""The ``tiny`` preset's batching before this study: unpacked samples, batch 8, grouped by length
in mega-batches of 8 (now packed rows, 5 per step)."""
OLD_PRESET = [*GROUPED8, "lora.dropout=0.05"]
"""The ``tiny`` preset as it was before this study (LoRA dropout 0.05, now 0.0): the
``-dropout0.05`` variants measure each factor against it."""

VARIANTS: dict[str, list[str]] = {
    "lora_llm": [],  # the preset with the study's sizes
    "grouped8": GROUPED8,  # the preset's batching before this study, with dropout 0
    "dropout0.05": OLD_PRESET,
    **{f"{name}-dropout0.05": [*OLD_PRESET, *changes] for name, changes in FACTORS.items()},
}
TRL_VARIANTS = ("trl", "trl-no-checkpointing")
"""TRL runs: its defaults, and the same without gradient checkpointing (its only default that
costs time without changing the loss)."""


# -- data and base ---------------------------------------------------------------------------------


def prompt_of(record: dict[str, str]) -> str:
    """The Alpaca prompt of ``record``, exactly as lora_llm renders it for an English record."""
    from lora_llm.data import PROMPTS

    key = "input" if record["input"].strip() else "no_input"
    return PROMPTS["alpaca"][key].format(instruction=record["instruction"], input=record["input"])


def split_records(tokenizer: Any, n_train: int, n_val: int) -> tuple[list[dict], list[dict]]:
    """The first ``n_train`` usable Alpaca records and ``n_val`` others from the file's end.

    Usable: a non-empty output and a prompt that leaves 8 or more response tokens within
    ``MAX_LENGTH`` (lora_llm's ``data.min_response_tokens``), so neither tool drops a record the
    other keeps.
    """
    rows = json.loads(ALPACA.read_text(encoding="utf-8"))
    usable = [
        r
        for r in rows
        if r["output"].strip() and len(tokenizer(prompt_of(r)).input_ids) + 8 <= MAX_LENGTH
    ]
    if n_train + n_val > len(usable):
        raise SystemExit(f"--train {n_train} + --val {n_val} > {len(usable)} usable records")
    return usable[:n_train], usable[-n_val:]


def make_base(size: str, folder: Path) -> Path:
    """Write a random Llama of ``size`` and lora_llm's tiny tokenizer to ``folder``: lora_llm's
    own ``tiny`` base builder (seed 0, float32 weights; both tools load them in bfloat16)."""
    from lora_llm.config import ModelConfig, TinyModelConfig
    from lora_llm.model import TINY, build_tiny_base, load_tokenizer

    hidden, inner, layers, heads, kv_heads = SIZES[size]
    spec = TinyModelConfig(
        hidden_size=hidden,
        intermediate_size=inner,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
    )
    return build_tiny_base(spec, load_tokenizer(ModelConfig(name=TINY)), folder)


# -- the two tools -------------------------------------------------------------------------------


def train_lora_llm(variant: str, seed: int, base: Path, train: Path, out: Path) -> dict:
    """One epoch of ``lora_llm`` (its ``tiny`` preset on ``base``) with ``variant``'s changes.

    Returns:
        ``{"adapter": folder, "train_seconds", "cpu_seconds", "steps"}``.
    """
    from core.config.loader import load_config
    from lora_llm.cli import PRESETS
    from lora_llm.config import LoraLLMConfig
    from lora_llm.task import LoraLLMTask

    cfg = load_config(
        LoraLLMConfig,
        "tiny",
        [
            f"model.name={base}",
            "model.dtype=bfloat16",
            "model.gradient_checkpointing=false",
            "quant.bits=null",
            f"data.train_files=[{train}]",
            "data.val_size=0",
            f"data.max_length={MAX_LENGTH}",
            "trainer.accumulate_grad_batches=1",
            "trainer.precision=bf16-mixed",
            "trainer.accelerator=cpu",
            "trainer.max_epochs=1",
            "trainer.max_steps=null",
            f"trainer.seed={seed}",
            "trainer.val_every_n_steps=null",
            "trainer.val_at_end=false",
            "trainer.log_every_n_steps=1000",
            "optim.name=adamw",
            f"optim.lr={LR}",
            "optim.scheduler=cosine",
            "logger.progress_bar=false",
            "logger.plot=false",
            f"run.root={out}",
            *VARIANTS[variant],
        ],
        PRESETS,
    )

    trainer = cpu_timed_trainer()(cfg, LoraLLMTask(cfg), argv=["bench/peer_trl.py"])
    result = trainer.fit()
    summary = json.loads((result.run_dir / "summary.json").read_text())
    return {
        "adapter": str(result.run_dir / "final"),
        "train_seconds": summary["train_seconds"],
        "cpu_seconds": trainer.cpu_seconds,
        "steps": result.step,
    }


def train_trl(variant: str, seed: int, base: Path, records: list[dict], out: Path) -> dict:
    """One epoch of TRL's ``SFTTrainer`` with its defaults for prompt-completion data.

    Returns:
        ``{"adapter": folder, "train_seconds", "cpu_seconds", "steps"}``.
    """
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_list([{"prompt": prompt_of(r), "completion": r["output"]} for r in records])
    args = SFTConfig(
        output_dir=str(out / "trl"),
        per_device_train_batch_size=BATCH,
        max_length=MAX_LENGTH,
        learning_rate=LR,
        lr_scheduler_type="cosine",
        num_train_epochs=1,
        seed=seed,
        use_cpu=True,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        # TRL's default is True; only the variant passes it (the name is deprecated in
        # transformers 5 and warns).
        **({"gradient_checkpointing": False} if variant == "trl-no-checkpointing" else {}),
        model_init_kwargs={"dtype": torch.bfloat16},
    )
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM")
    tokenizer = AutoTokenizer.from_pretrained(base)
    trainer = SFTTrainer(
        model=str(base),
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=lora,
    )
    wall, cpu = time.perf_counter(), time.process_time()
    state = trainer.train()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    adapter = out / "trl-adapter"
    trainer.model.save_pretrained(adapter)
    return {
        "adapter": str(adapter),
        "train_seconds": wall,
        "cpu_seconds": cpu,
        "steps": state.global_step,
    }


# -- one evaluation for both -----------------------------------------------------------------------


def held_out_loss(base: Path, adapter: Path, records: list[dict]) -> float:
    """Token-weighted mean cross-entropy of the response + EOS of ``records`` (float32, plain peft).

    Each sequence is ``tokenizer(prompt) + tokenizer(output, no special tokens) + [eos]`` cut at
    ``MAX_LENGTH``; only the response and EOS tokens are scored.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter).eval()
    total, count = 0.0, 0
    for start in range(0, len(records), BATCH):
        rows = []
        for r in records[start : start + BATCH]:
            prompt = tokenizer(prompt_of(r)).input_ids
            answer = tokenizer(r["output"], add_special_tokens=False).input_ids
            ids = (prompt + answer + [tokenizer.eos_token_id])[:MAX_LENGTH]
            rows.append((ids, [-100] * len(prompt) + ids[len(prompt) :]))
        width = max(len(ids) for ids, _ in rows)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
        total += torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
            reduction="sum",
        ).item()
        count += int((labels[:, 1:] != -100).sum())
    return total / count


# -- the study -----------------------------------------------------------------------------------


def run_once(variant: str, seed: int, base: Path, train: list[dict], val: list[dict]) -> dict:
    """Train one (variant, seed) in a scratch folder, score its adapter, delete the folder."""
    out = Path(tempfile.mkdtemp(prefix="peer-trl-"))
    try:
        if variant in TRL_VARIANTS:
            result = train_trl(variant, seed, base, train, out)
        else:
            data = out / "train.json"
            data.write_text(json.dumps(train), encoding="utf-8")
            result = train_lora_llm(variant, seed, base, data, out / "runs")
        result["val_loss"] = held_out_loss(base, Path(result.pop("adapter")), val)
        return result
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    """Run the study (or re-make its tables from cached results) and print / append the section."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["s"], choices=sorted(SIZES))
    parser.add_argument("--train", nargs="+", type=int, default=[1200], help="training records")
    parser.add_argument("--val", type=int, default=200, help="held-out records")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per variant")
    parser.add_argument("--train-seeds", type=int, nargs="+", default=None)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["trl", "lora_llm", "grouped8", "random-dropout0.05", "dropout0.05"],
        choices=[*TRL_VARIANTS, *VARIANTS],
    )
    parser.add_argument("--results", type=Path, default=Path(tempfile.gettempdir()) / "peer_trl")
    parser.add_argument("--report-only", action="store_true", help="no training: cached runs")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    args.results.mkdir(parents=True, exist_ok=True)
    sections = []
    for size in args.sizes:
        scratch = Path(tempfile.mkdtemp(prefix="peer-trl-base-"))
        base = make_base(size, scratch / "base")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base)
        for n_train in args.train:
            train, val = split_records(tokenizer, n_train, args.val)
            runs = cached_runs(
                args.results,
                f"{size}-n{n_train}",
                args.variants,
                args.seeds,
                partial(run_once, base=base, train=train, val=val),
                args.train_seeds,
                args.report_only,
            )
            hidden, _, layers, _, _ = SIZES[size]
            sections.append(
                f"**size {size} (d {hidden}, {layers} layers), {n_train} training records**\n\n"
                + table(PEER_HEADER_CPU, peer_rows(runs, "trl", seconds="cpu_seconds"))
            )
        shutil.rmtree(scratch, ignore_errors=True)
    body = (
        f"LoRA r 8 / alpha 16 on q/k/v/o of random bf16 Llama bases, batch {BATCH} (lora_llm's "
        "preset: 5 packed rows, about as many tokens), max length "
        f"{MAX_LENGTH}, AdamW {LR} cosine, one epoch; held-out loss on {args.val} other Alpaca "
        f"records by one plain-peft evaluation, mean ± std over seeds; the ref is TRL with its "
        "defaults. "
        f"{machine().split(';')[0]}.\n\n" + "\n\n".join(sections)
    )
    command = (
        "OMP_NUM_THREADS=1 uv run --group bench python bench/peer_trl.py --sizes "
        f"{' '.join(args.sizes)} --train {' '.join(map(str, args.train))} --seeds {args.seeds} "
        f"--variants {' '.join(args.variants)}"
    )
    emit(report("lora_llm against TRL's SFTTrainer (benchmark 13)", command, body), args.out)


if __name__ == "__main__":
    main()
