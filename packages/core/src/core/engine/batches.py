"""Batches: what the :class:`core.engine.trainer.Trainer` trains on, in which order, and how much.

- :meth:`Batches.read` takes the task's training and validation sets (an empty training set is
  a ``UserError``);
- :meth:`Batches.build_dataloaders` makes the seeded, resumable, sharded loaders and counts the
  optimizer steps of the run (``total_steps``);
- :meth:`Batches.micro_batches` yields micro-batches across epochs from the saved position on and
  logs each epoch's share of padding tokens;
- :meth:`Batches.window_counts` sums an accumulation window's samples and tokens over the ranks
  in the one all-reduce per optimizer step that also carries the stop and time-limit flags.

Data order is a pure function of (seed, epoch): a resumed run skips consumed batches by index.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric import Fabric

from core.config.schema import TrainConfig
from core.engine.evaluation import eval_dataloader
from core.engine.sampler import ShardedBatchSampler, build_dataloader
from core.errors import ConfigError, UserError
from core.task.base import Task
from core.task.batching import PackedDataset

if TYPE_CHECKING:
    from core.engine.signals import StopSignal
    from core.engine.state import Progress
    from core.run.logs import MetricsLogger

# The Trainer's log lines keep their logger name (``core.engine.trainer``) wherever they are
# written.
log = logging.getLogger("core.engine.trainer")


class Batches:
    """The data side of a run: datasets, loaders, micro-batches and the step count.

    Args:
        cfg: the task's root config.
        task: the task (datasets, collate, token counts).
        fabric: the launched Fabric (rank, world size, device, all-reduce).
        progress: the run's counters; :meth:`micro_batches` advances ``epoch`` / ``batch``.
    """

    def __init__(self, cfg: TrainConfig, task: Task, fabric: Fabric, progress: Progress) -> None:
        self.cfg = cfg
        self.task = task
        self.fabric = fabric
        self.progress = progress
        # Set by read() and build_dataloaders(), in this order.
        self.train_data: Any = None
        self.val_data: Any = None
        self.train_lengths: Any = None
        self.train_sampler: ShardedBatchSampler | None = None
        self.train_loader: Any = None
        self.val_loader: Any = None
        self.total_steps: int | None = None

    def read(self) -> None:
        """Take the task's training and validation sets.

        Raises:
            UserError: the training set is empty.
        """
        self.train_data = self.task.train_dataset()
        self.val_data = self.task.val_dataset()
        if len(self.train_data) == 0:
            raise UserError("The training set is empty: check the data files / data settings.")

    def build_dataloaders(self) -> None:
        """Seeded, resumable, sharded loaders for training and validation."""
        cfg, fabric, task = self.cfg, self.fabric, self.task
        tc = cfg.trainer
        limit = None
        if cfg.debug.overfit_batches:
            if tc.max_steps is None:
                raise ConfigError(
                    "debug.overfit_batches needs trainer.max_steps (epochs of a few batches are "
                    "meaningless)."
                )
            limit = cfg.debug.overfit_batches * tc.batch_size * fabric.world_size
        lengths = task.sample_lengths(self.train_data)
        self.train_lengths = lengths
        if tc.group_by_length and lengths is None:
            raise ConfigError(
                f"trainer.group_by_length=true, but the {task.name} task does not report sample "
                "lengths."
            )
        self.train_sampler = ShardedBatchSampler(
            len(self.train_data),
            tc.batch_size,
            rank=fabric.global_rank,
            world_size=fabric.world_size,
            shuffle=not cfg.debug.overfit_batches,
            seed=tc.seed,
            lengths=lengths if tc.group_by_length else None,
            group_by_length=tc.group_by_length,
            group_chunk_batches=tc.group_chunk_batches,
            limit_samples=limit,
        )
        cuda = fabric.device.type == "cuda"
        self.train_loader = build_dataloader(
            self.train_data, self.train_sampler, task.collate, tc.num_workers, cuda, tc.seed
        )
        self.val_loader = None
        if self.val_data is not None and len(self.val_data) > 0:
            self.val_loader = self.eval_loader(self.val_data)
        per_epoch = self.train_sampler.num_batches()
        accum = tc.accumulate_grad_batches
        steps = [tc.max_steps] if tc.max_steps else []
        if tc.epoch_limit and not cfg.debug.overfit_batches:
            steps.append(math.ceil(tc.epoch_limit * per_epoch / accum))
        self.total_steps = min(steps)
        items = f"{len(self.train_data)} training samples"
        if isinstance(self.train_data, PackedDataset):  # a batch counts rows, not samples
            items = f"{len(self.train_data)} packed rows ({len(self.train_data.examples)} samples)"
        log.info(
            "Data: %s, %d micro-batches/epoch/rank, %d optimizer steps (batch %d x accumulation %d "
            "x %d ranks)",
            items,
            per_epoch,
            self.total_steps,
            tc.batch_size,
            accum,
            fabric.world_size,
        )

    def eval_loader(self, dataset: Any) -> Any:
        """See :func:`eval_dataloader`."""
        return eval_dataloader(self.fabric, self.task, dataset, self.cfg.trainer)

    def micro_batches(self, logger: MetricsLogger) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches across epochs from the saved position on; advances
        ``progress.epoch/batch``; ``logger`` gets each epoch's padding share."""
        tc = self.cfg.trainer
        while (
            self.cfg.debug.overfit_batches
            or tc.epoch_limit is None
            or self.progress.epoch < tc.epoch_limit
        ):
            if self.progress.batch == 0:
                self.log_padding_share(self.progress.epoch, logger)
            self.train_sampler.set_epoch(self.progress.epoch, start_batch=self.progress.batch)
            # Worker seeds come from the loader's generator; reseed per epoch so a resumed run's
            # workers get the same seeds as an uninterrupted run's.
            self.train_loader.generator.manual_seed(tc.seed + self.progress.epoch)
            for batch in self.train_loader:
                self.progress.batch += 1
                yield batch
            self.progress.epoch += 1
            self.progress.batch = 0

    def log_padding_share(self, epoch: int, logger: MetricsLogger) -> None:
        """Log the share of padding tokens the epoch's batches will carry (all ranks), from the
        task's sample lengths and the sampler's batches; nothing when lengths are unknown."""
        if self.train_lengths is None:
            return
        lengths = self.train_lengths
        real = padded = 0
        world = self.fabric.world_size
        for batch in self.train_sampler.global_batches(epoch):
            per_rank = len(batch) // world
            for r in range(world):
                part = [lengths[i] for i in batch[r * per_rank : (r + 1) * per_rank]]
                if part:
                    real += sum(part)
                    padded += max(part) * len(part)
        share = 1.0 - real / max(padded, 1)
        logger.log({"data/padding_share": share, "data/epoch": epoch}, self.progress.step)
        log.info("Epoch %d: %.1f%% of the input tokens are padding", epoch, 100 * share)

    def window_counts(
        self, window: list[dict[str, torch.Tensor]], stop: StopSignal, time_up: bool = False
    ) -> dict[str, int]:
        """Count samples and tokens of an accumulation window, summed over ranks, and agree on
        stopping.

        One all-reduce per optimizer step carries the loss-token count (needed before the
        forward passes for per-token normalisation), the stop-signal flag and the time-limit flag.

        Returns:
            ``{"loss_tokens", "samples", "input_tokens", "stop", "time_up"}``, each summed over all
            ranks.
        """
        local = torch.tensor(
            [
                sum(self.task.count_loss_tokens(b) for b in window),
                sum(self.task.batch_size_of(b) for b in window),
                sum(self.task.count_input_tokens(b) for b in window),
                int(stop.received is not None),
                int(time_up),
            ],
            dtype=torch.float64 if self.fabric.device.type != "mps" else torch.float32,
        )
        if self.fabric.world_size > 1:
            local = self.fabric.all_reduce(local.to(self.fabric.device), reduce_op="sum").cpu()
        loss_tokens, samples, input_tokens, stop_flag, time_flag = (int(v) for v in local.tolist())
        return {
            "loss_tokens": loss_tokens,
            "samples": samples,
            "input_tokens": input_tokens,
            "stop": stop_flag,
            "time_up": time_flag,
        }

    def epochs_done(self) -> float:
        """Fractional epochs consumed so far."""
        return self.progress.epoch + self.progress.batch / max(1, self.train_sampler.num_batches())


if __name__ == "__main__":
    # Self-check: the toy task's 64 samples in batches of 4 with accumulation 2 on one CPU
    # process: 16 micro-batches per epoch, 8 steps per epoch, windows of 2 micro-batches.
    import json
    import tempfile
    from pathlib import Path

    from core.config.loader import load_config
    from core.engine.signals import StopSignal
    from core.engine.state import Progress
    from core.run.logs import MetricsLogger
    from core.testing.toy import ToyConfig, ToyTask

    cfg = load_config(
        ToyConfig,
        overrides=[
            "trainer.accelerator=cpu",
            "trainer.batch_size=4",
            "trainer.accumulate_grad_batches=2",
            "trainer.max_epochs=2",
        ],
    )
    task = ToyTask(cfg)
    task.setup()
    progress = Progress()
    batches = Batches(cfg, task, Fabric(accelerator="cpu", devices=1), progress)
    batches.read()
    batches.build_dataloaders()
    assert batches.train_sampler.num_batches() == 16 and batches.total_steps == 16

    with tempfile.TemporaryDirectory() as tmp:
        logger = MetricsLogger(Path(tmp), cfg.logger, {}, "self-check")
        stream = batches.micro_batches(logger)
        window = [next(stream), next(stream)]
        counts = batches.window_counts(window, StopSignal())
        logger.close()
        records = [json.loads(line) for line in logger.path.read_text().splitlines()]
    assert counts["samples"] == 8 and counts["stop"] == 0, counts
    assert counts["loss_tokens"] == sum(task.count_loss_tokens(b) for b in window)
    assert (progress.epoch, progress.batch) == (0, 2) and batches.epochs_done() == 2 / 16
    assert 0.0 < records[0]["data/padding_share"] < 1.0, records
    print("core.engine.batches: ok", counts, records)
