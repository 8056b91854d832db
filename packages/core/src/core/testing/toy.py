"""A tiny task for tests: a 2-layer GPT-2 learning to continue counting sequences.

It exercises the whole engine in seconds on a CPU, and task packages may use it in their own
tests of engine behaviour.

Samples are sequences ``s, s+1, s+2, ...`` (mod the vocabulary) of varying length, so batches
need padding and the per-token loss normalisation matters. The model is a real Hugging Face
``GPT2LMHeadModel`` built from a config, so ``final/`` is a real ``save_pretrained`` folder.

Run as a module for subprocess tests (signals, DDP) or as a demo of the engine::

    python -m core.testing train trainer.max_steps=20 run.root=/tmp/runs
    python -m core.testing evaluate --model RUN/final trainer.devices=2
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.commands.train import parse_train_args, train_command, user_errors_exit_2
from core.config.schema import TrainConfig
from core.nn.padding import length_mask, pad_rows
from core.task.base import IGNORE_INDEX, StepOutput, Task, per_sample_loss, token_loss_sum

PAD = 0


@dataclass
class ToyData:
    """Synthetic counting data."""

    num_train: int = 64
    """Training samples."""
    num_val: int = 13
    """Validation samples (odd on purpose: distributed samplers must pad)."""
    min_len: int = 4
    """Shortest sequence."""
    max_len: int = 20
    """Longest sequence."""
    data_seed: int = 1234
    """Seed of the data itself (independent of trainer.seed)."""
    collate_delay: float = 0.0
    """Seconds to sleep per batch (lets signal tests catch a run mid-training)."""
    peer_dies_at_batch: int = 0
    """Test knob (0: off): at this batch (counting each rank's collates), rank 1 exits with code
    3 and rank 0 sleeps 30 s in its collate, away from any collective (a dead peer found by
    Lightning's watcher of the launched ranks, not by a failing collective)."""


@dataclass
class ToyModel:
    """A tiny GPT-2."""

    n_layer: int = 2
    """Transformer blocks."""
    n_embd: int = 32
    """Hidden size."""
    vocab_size: int = 50
    """Vocabulary (token 0 is padding)."""
    dropout: float = 0.1
    """Dropout everywhere (makes RNG state matter for exact resume)."""
    freeze_embeddings: bool = False
    """Freeze token and position embeddings (tests trainable-only checkpoints)."""


@dataclass
class ToyConfig(TrainConfig):
    """Root config of the toy task."""

    data: ToyData = field(default_factory=ToyData)
    """Data settings."""
    model: ToyModel = field(default_factory=ToyModel)
    """Model settings."""


class CountingData(torch.utils.data.Dataset):
    """Sequences ``s, s+1, ...`` (mod vocab, skipping 0). Item: ``{"index": int, "input_ids":
    list[int]}``."""

    def __init__(self, n: int, cfg: ToyData, vocab: int, offset: int) -> None:
        gen = torch.Generator().manual_seed(cfg.data_seed + offset)
        self.items = []
        for _ in range(n):
            length = int(torch.randint(cfg.min_len, cfg.max_len + 1, (1,), generator=gen))
            start = int(torch.randint(1, vocab, (1,), generator=gen))
            self.items.append([1 + (start + k - 1) % (vocab - 1) for k in range(length)])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"index": i, "input_ids": self.items[i]}


class ToyTask(Task):
    """Causal LM on counting sequences."""

    name = "toy"
    shift_labels = True

    def setup(self) -> None:
        cfg = self.cfg
        self.train = CountingData(cfg.data.num_train, cfg.data, cfg.model.vocab_size, 0)
        self.val = CountingData(cfg.data.num_val, cfg.data, cfg.model.vocab_size, 1)

    def train_dataset(self) -> CountingData:
        return self.train

    def val_dataset(self) -> CountingData:
        return self.val

    def sample_lengths(self, dataset: CountingData) -> list[int]:
        return [len(x) for x in dataset.items]

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest sample: ids / mask / labels ``(batch, max_len)``, index
        ``(batch,)``."""
        if self.cfg.data.collate_delay:
            time.sleep(self.cfg.data.collate_delay)
        if self.cfg.data.peer_dies_at_batch:
            self.collates = getattr(self, "collates", 0) + 1
            if self.collates == self.cfg.data.peer_dies_at_batch:
                if self.ranks.global_rank == 1:
                    os._exit(3)
                if self.ranks.global_rank == 0:
                    time.sleep(30)
        ids = pad_rows([s["input_ids"] for s in samples], PAD)
        mask = length_mask([len(s["input_ids"]) for s in samples])
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "index": torch.tensor([s["index"] for s in samples]),
        }

    def fsdp_wrap_classes(self) -> set[type[nn.Module]]:
        """GPT-2's transformer block."""
        from transformers.models.gpt2.modeling_gpt2 import GPT2Block

        return {GPT2Block}

    def configure_model(self) -> nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel

        m = self.cfg.model
        config = GPT2Config(
            vocab_size=m.vocab_size,
            n_positions=64,
            n_embd=m.n_embd,
            n_layer=m.n_layer,
            n_head=2,
            resid_pdrop=m.dropout,
            embd_pdrop=m.dropout,
            attn_pdrop=m.dropout,
            pad_token_id=PAD,
            bos_token_id=1,
            eos_token_id=1,
        )
        model = GPT2LMHeadModel(config)
        if m.freeze_embeddings:
            model.transformer.wte.weight.requires_grad_(False)
            model.transformer.wpe.weight.requires_grad_(False)
        return model

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return token_loss_sum(logits, batch["labels"], shift=True)

    def validation_step(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> list[dict[str, Any]]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        sums, counts = per_sample_loss(logits, batch["labels"], shift=True)
        hits = (
            (logits[:, :-1].argmax(-1) == batch["labels"][:, 1:])
            & (batch["labels"][:, 1:] != IGNORE_INDEX)
        ).sum(1)
        return [
            {"index": int(i), "loss_sum": float(s), "tokens": int(c), "hits": int(h)}
            for i, s, c, h in zip(
                batch["index"].tolist(), sums.tolist(), counts.tolist(), hits.tolist()
            )
        ]

    def compute_metrics(self, records: list[dict[str, Any]]) -> dict[str, float]:
        tokens = sum(r["tokens"] for r in records)
        return {
            "loss": sum(r["loss_sum"] for r in records) / tokens,
            "accuracy": sum(r["hits"] for r in records) / tokens,
            "samples": float(len(records)),
        }

    def manifest_entries(self) -> dict[str, Any]:
        return {
            "metrics": {
                "accuracy": {"implementation": "toy_task.py next-token argmax", "version": "1"}
            }
        }


# -- helpers for tests of runs --------------------------------------------------------------


def wait_for_step(root: Path, step: int, proc: Any, timeout: float = 240) -> None:
    """Wait until a run under ``root`` has logged ``step`` in its ``metrics.jsonl`` (a test that
    signals or kills a training process at a chosen step).

    Raises:
        AssertionError: ``proc`` (a ``subprocess.Popen``) ended first.
        TimeoutError: not within ``timeout`` seconds.
    """
    deadline = time.time() + timeout
    while time.time() < deadline:
        for metrics in Path(root).glob("*/metrics.jsonl"):
            if f'"step": {step},' in metrics.read_text():
                return
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.05)
    raise TimeoutError(f"no step {step} within {timeout} s")


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a test's child process: without SLURM's variables, the task
    selection and any launch variable of a run made in this process (the child decides its own
    launch), offline, unbuffered, one thread, plus ``extra``."""
    from core.commands.launcher import ENV_VAR
    from core.parallel.strategy import LAUNCH_VARIABLES

    dropped = ("SLURM_", ENV_VAR, *LAUNCH_VARIABLES)
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra})
    return env


def script_result(script: Path, timeout: float = 600) -> dict[str, Any]:
    """Run a check script that launches its own ranks (in :func:`child_env`) and return the JSON
    of the ``RESULT {json}`` line its rank 0 prints; a failing script fails with its output."""
    import subprocess

    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_losses(run_dir: Path) -> dict[int, float]:
    """``{step: train/loss}`` from a run's metrics.jsonl."""
    return {
        r["step"]: r["train/loss"]
        for r in read_jsonl(run_dir / "metrics.jsonl")
        if "train/loss" in r
    }


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``<run>/final/model.safetensors``."""
    from safetensors.torch import load_file

    return load_file(run_dir / "final" / "model.safetensors")


def max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference over all tensors of two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def train(argv: list[str] | None = None, make_task: type[ToyTask] | None = None) -> int:
    """The toy ``train`` command (``make_task``: a subclass of :class:`ToyTask` for tests that
    inject a fault into a step or a save)."""
    return train_command(
        argv,
        prog="toy-train",
        description="Train the toy task.",
        config_cls=ToyConfig,
        presets_dir=None,
        make_task=make_task or ToyTask,
        task="toy",
    )


@user_errors_exit_2
def evaluate(argv: list[str]) -> int:
    """``evaluate --model DIR [key=value ...]``: validation metrics of a saved model, printed as
    JSON.

    The pattern every task's ``evaluate`` follows: an :class:`core.engine.evaluation.Evaluator` (the
    training Fabric set-up, launched), the model loaded with ``from_pretrained``, the gathered
    result printed on rank 0.
    """
    from transformers import AutoModelForCausalLM

    from core.engine.evaluation import Evaluator

    model_dir = Path(argv[argv.index("--model") + 1])
    rest = [a for a in argv if a not in ("--model", str(model_dir))]
    cfg, _ = parse_train_args(
        rest, prog="toy-evaluate", description="", config_cls=ToyConfig, presets_dir=None
    )
    task = ToyTask(cfg)
    evaluator = Evaluator(cfg, task)
    task.setup()
    model = evaluator.setup_model(AutoModelForCausalLM.from_pretrained(model_dir))
    result = evaluator.run(model, task.val_dataset())
    if evaluator.is_global_zero:
        print("METRICS " + json.dumps(result.metrics))
    return 0


if __name__ == "__main__":  # self-check: python -m core.testing.toy train trainer.max_steps=2
    command, args = sys.argv[1], sys.argv[2:]
    sys.exit({"train": train, "evaluate": evaluate}[command](args))
