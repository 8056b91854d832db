"""Benchmark 1 — engine overhead: the same model, data, batch, precision, optimizer, clipping,
schedule and step count through

  (a) a minimal hand-written PyTorch loop,
  (b) core's Trainer (Lightning Fabric),
  (c) the Hugging Face Trainer.

Each variant trains from a fresh model for ``--steps`` optimizer steps; the figure is the
training loop's time only (start-up, model building and saving excluded), repeated
``--reps`` times interleaved, reported as the median with min-max, and as ratios to the raw loop.

    uv run python bench/engine_overhead.py --steps 40 --reps 5
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import emit, median_spread, repeat, report, table, train_run

VOCAB, SEQ, LAYERS, WIDTH, HEADS = 1000, 128, 4, 256, 4


def make_model() -> torch.nn.Module:
    """A 4-layer GPT-2 (about 3.7 M parameters), dropout off so all variants do the same work."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ,
        n_embd=WIDTH,
        n_layer=LAYERS,
        n_head=HEADS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def make_samples(n: int) -> list[dict]:
    """``n`` fixed-length samples (every batch costs the same): ``{"index", "input_ids"}``."""
    gen = torch.Generator().manual_seed(0)
    return [
        {"index": i, "input_ids": torch.randint(1, VOCAB, (SEQ,), generator=gen).tolist()}
        for i in range(n)
    ]


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """``input_ids`` / ``attention_mask`` / ``labels`` of shape ``(batch, SEQ)``."""
    ids = torch.tensor([s["input_ids"] for s in samples])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def raw_loop(steps: int, batch: int, lr: float) -> float:
    """The baseline: DataLoader, forward, loss, backward, clip, AdamW, cosine LR. Returns
    seconds."""
    from transformers import get_cosine_schedule_with_warmup

    model = make_model()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = get_cosine_schedule_with_warmup(opt, 0, steps)
    loader = torch.utils.data.DataLoader(
        make_samples(steps * batch), batch_size=batch, shuffle=True, collate_fn=collate
    )
    start = time.perf_counter()
    for step, data in enumerate(loader, 1):
        logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, VOCAB), data["labels"][:, 1:].reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if step % 10 == 0:
            loss.item()  # what logging costs: one sync
    return time.perf_counter() - start


def core_trainer(steps: int, batch: int, lr: float) -> float:
    """core's Trainer on the same model and data; returns the loop time from summary.json."""
    from core.config.loader import load_config
    from core.task.base import StepOutput, Task, token_loss_sum
    from core.testing.toy import ToyConfig

    class Bench(Task):
        shift_labels = True

        def train_dataset(self):
            return make_samples(steps * batch)

        def collate(self, samples):
            return collate(samples)

        def configure_model(self):
            return make_model()

        def training_step(self, model, data) -> StepOutput:
            logits = model(
                input_ids=data["input_ids"], attention_mask=data["attention_mask"]
            ).logits
            return token_loss_sum(logits, data["labels"], shift=True)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            ToyConfig,
            overrides=[
                f"run.root={tmp}",
                f"trainer.max_steps={steps}",
                f"trainer.batch_size={batch}",
                "trainer.accelerator=cpu",
                "trainer.precision=32-true",
                f"optim.lr={lr}",
                "optim.scheduler=cosine",
                "trainer.log_every_n_steps=10",
                "trainer.val_at_end=false",
                "logger.progress_bar=false",
                "logger.plot=false",
                "logger.csv=false",
            ],
        )
        return train_run(cfg, Bench(cfg))[0]["train_seconds"]


def hf_trainer(steps: int, batch: int, lr: float) -> float:
    """The Hugging Face Trainer on the same model and data; returns its train_runtime."""
    from transformers import Trainer, TrainingArguments

    class Data(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.items = make_samples(steps * batch)

        def __len__(self) -> int:
            return len(self.items)

        def __getitem__(self, i: int) -> dict:
            return self.items[i]

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=batch,
            max_steps=steps,
            learning_rate=lr,
            weight_decay=0.01,
            lr_scheduler_type="cosine",
            warmup_steps=0,
            max_grad_norm=1.0,
            logging_steps=10,
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=True,
            dataloader_num_workers=0,
            seed=0,
        )
        trainer = Trainer(
            model=make_model(), args=args, train_dataset=Data(), data_collator=collate
        )
        out = trainer.train()
        return float(out.metrics["train_runtime"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--out", type=Path, default=None, help="append the Markdown section to this file"
    )
    args = parser.parse_args()
    import logging

    logging.disable(logging.WARNING)
    variants = {
        "raw PyTorch loop": lambda: raw_loop(args.steps, args.batch, 1e-4),
        "core Trainer (Fabric)": lambda: core_trainer(args.steps, args.batch, 1e-4),
        "Hugging Face Trainer": lambda: hf_trainer(args.steps, args.batch, 1e-4),
    }
    results = repeat(variants, args.reps)
    base = median_spread([args.steps / s for s in results["raw PyTorch loop"]])[0]
    rows = []
    for name, seconds in results.items():
        rates = [args.steps / s for s in seconds]
        med, lo, hi = median_spread(rates)
        rows.append([name, f"{med:.3f}", f"{lo:.3f} – {hi:.3f}", f"{med / base:.3f}"])
    body = (
        f"GPT-2 {LAYERS} layers x {WIDTH}, sequence {SEQ}, batch {args.batch}, fp32, AdamW + "
        "clipping + cosine, "
        f"{args.steps} steps per run, {args.reps} interleaved repetitions; steps/s of the "
        "training loop.\n\n"
        + table(["variant", "steps/s (median)", "min – max", "ratio to raw"], rows)
    )
    text = report(
        "Engine overhead",
        f"uv run python bench/engine_overhead.py --steps {args.steps} --batch {args.batch} --reps "
        f"{args.reps}",
        body,
    )
    emit(text, args.out)


if __name__ == "__main__":
    main()
