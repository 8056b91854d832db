"""Does a summarization model read its source? Two measurements on DialogSum dev rows:

- **source gap**: the loss of the reference summaries given their own dialogues, and given the
  dialogues rotated by one row (each summary paired with another dialogue). A model that reads the
  dialogue has a lower loss with its own; a model that only learnt the summaries' language has a
  gap of 0.
- **encoder spread**: the standard deviation, across all source tokens of the batch, of the
  encoder's output (averaged over hidden units). Near 0, the encoder emits one vector for every
  token and the decoder cannot read anything from it (a collapsed encoder).

Two ways to run it::

    # a trained model folder (e.g. a run's final/)
    uv run python bench/source_use.py --model runs/001_.../final
    # train the `small` preset's model from scratch with a plain loop and measure every 50 steps,
    # to compare architectures and the auxiliary masked-LM objective
    uv run python bench/source_use.py --train-steps 300 --architecture bart --encoder-mlm 0
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from common import REPO, emit, machine

DIALOGSUM = REPO.parent / "shared" / "data" / "dialogsum"


def rows(path: Path, n: int | None = None) -> list[dict]:
    """The first ``n`` rows of a DialogSum JSONL file, read and checked by the package's reader,
    with the first reference as ``summary``."""
    from summarization.data import read_jsonl

    return [
        {"dialogue": r["dialogue"], "summary": r["references"][0]} for r in read_jsonl(path)[:n]
    ]


def encode(
    tokenizer, sources: list[dict], targets: list[dict], max_source: int = 320
) -> dict[str, torch.Tensor]:
    """A padded batch: ``sources``' dialogues as input, ``targets``' summaries as labels (-100 on
    padding)."""
    batch = tokenizer(
        [r["dialogue"] for r in sources],
        max_length=max_source,
        truncation=True,
        padding=True,
        return_tensors="pt",
    )
    labels = tokenizer(
        text_target=[r["summary"] for r in targets],
        max_length=64,
        truncation=True,
        padding=True,
        return_tensors="pt",
    )["input_ids"]
    batch["labels"] = labels.masked_fill(labels == tokenizer.pad_token_id, -100)
    return dict(batch)


@torch.no_grad()
def measure(model, tokenizer, dev: list[dict], batch_size: int = 16) -> dict[str, float]:
    """``matched`` / ``rotated`` per-token summary loss, their ``gap``, and the encoder
    ``spread``."""
    was_training = model.training
    model.eval()
    result: dict[str, float] = {}
    rotated = dev[1:] + dev[:1]
    for name, sources in (("matched", dev), ("rotated", rotated)):
        total = count = 0.0
        for i in range(0, len(dev), batch_size):
            batch = encode(tokenizer, sources[i : i + batch_size], dev[i : i + batch_size])
            tokens = (batch["labels"] != -100).sum().item()
            total += model(**batch).loss.item() * tokens
            count += tokens
        result[name] = total / count
    result["gap"] = result["rotated"] - result["matched"]
    batch = encode(tokenizer, dev[:batch_size], dev[:batch_size])
    hidden = model.get_encoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    result["spread"] = hidden[batch["attention_mask"].bool()].float().std(0).mean().item()
    model.train(was_training)
    return result


def train_and_measure(args: argparse.Namespace, dev: list[dict]) -> list[str]:
    """Train the ``small`` preset's model from scratch (plain AdamW loop, the preset's learning
    rate with a 100-step warm-up, batch 16, fp32) and measure every ``--every`` steps."""
    from core.config.loader import load_config
    from summarization.config import PRESETS_DIR, SummarizationConfig
    from summarization.model import build_model, load_model_config
    from summarization.task import SummarizationTask

    cfg = load_config(
        SummarizationConfig,
        "small",
        [
            f"model.scratch.architecture={args.architecture}",
            f"model.encoder_mlm={args.encoder_mlm}",
        ],
        PRESETS_DIR,
    )
    torch.manual_seed(args.seed)
    task = SummarizationTask(cfg)
    task.setup_model_side()
    tokenizer = task.tokenizer
    model = build_model(cfg.model, load_model_config(cfg.model, tokenizer))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
    )
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 100))
    train = rows(DIALOGSUM / "dialogsum.train.2021-05-26.jsonl")
    rng = random.Random(args.seed)
    lines = [
        f"`{args.architecture}`, encoder_mlm={args.encoder_mlm}:",
        "",
        "| step | dev loss, own dialogue | dev loss, another dialogue | gap | encoder spread | "
        "seconds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    m = measure(model, tokenizer, dev)
    lines.append(
        f"| 0 | {m['matched']:.3f} | {m['rotated']:.3f} | {m['gap']:.3f} | {m['spread']:.3f} | 0 |"
    )
    start = time.perf_counter()
    for step in range(1, args.train_steps + 1):
        sample = rng.sample(train, 16)
        batch = task.collator(
            [
                {
                    "index": i,
                    **tokenizer(r["dialogue"], max_length=320, truncation=True),
                    "labels": tokenizer(text_target=r["summary"], max_length=64, truncation=True)[
                        "input_ids"
                    ],
                }
                for i, r in enumerate(sample)
            ]
        )
        batch.pop("index")
        out = task.training_step(model, batch)
        (out.loss_sum / out.num_tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        warmup.step()
        if step % args.every == 0:
            m = measure(model, tokenizer, dev)
            lines.append(
                f"| {step} | {m['matched']:.3f} | {m['rotated']:.3f} | {m['gap']:.3f} | "
                f"{m['spread']:.3f} | {time.perf_counter() - start:.0f} |"
            )
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, help="a model folder (save_pretrained output, e.g. a run's final/)"
    )
    parser.add_argument(
        "--train-steps",
        type=int,
        default=0,
        help="train a fresh `small` model this many steps instead",
    )
    parser.add_argument("--architecture", default="mbart", choices=["bart", "mbart"])
    parser.add_argument("--encoder-mlm", type=float, default=0.0)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dev-rows", type=int, default=64)
    parser.add_argument("--out", type=Path, help="append the Markdown section to this file")
    args = parser.parse_args()
    dev = rows(DIALOGSUM / "dialogsum.dev.jsonl", args.dev_rows)
    if args.model:
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        model = AutoModelForSeq2SeqLM.from_pretrained(args.model)
        m = measure(model, AutoTokenizer.from_pretrained(args.model), dev)
        body = [
            f"`{args.model}`: dev loss {m['matched']:.3f} with its own dialogue, "
            f"{m['rotated']:.3f} with another "
            f"(gap {m['gap']:.3f}); encoder spread {m['spread']:.3f}"
        ]
    elif args.train_steps:
        body = train_and_measure(args, dev)
    else:
        parser.error("give --model DIR or --train-steps N")
    emit(
        "\n".join(
            [f"### Source use ({args.dev_rows} DialogSum dev rows)", "", machine(), "", *body, ""]
        ),
        args.out,
    )


if __name__ == "__main__":
    main()
