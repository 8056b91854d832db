"""Meter: what the :class:`core.engine.trainer.Trainer` reports while it trains.

- the running loss sums of the current logging interval (on the device, no host sync per step;
  summed over ranks once per log event and before each checkpoint, which stores them so that a
  resumed run logs the same losses);
- the training log line of each interval (``train/loss``, learning rates, epoch, throughput,
  gradient norm, peak memory, MFU) into ``metrics.jsonl`` and the other loggers;
- the progress bar (a tqdm bar on a terminal, a plain line every 30 s in a log file).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric import Fabric

from core.config.schema import TrainConfig
from core.run.logs import LogProgress

if TYPE_CHECKING:
    from core.engine.batches import Batches
    from core.engine.record import RunRecord
    from core.engine.state import Progress, TrainState

# The Trainer's log lines keep their logger name (``core.engine.trainer``) wherever they are
# written.
log = logging.getLogger("core.engine.trainer")


class Meter:
    """Interval loss sums, the training log lines, MFU and the progress bar.

    Args:
        cfg: the task's root config (``trainer.log_every_n_steps``, ``logger``).
        fabric: the launched Fabric (rank, world size, device, all-reduce).
        precision: the resolved precision (the FLOPs available for MFU depend on it).
        progress: the run's counters (step, epoch, skipped steps, stored interval sums).
        batches: the data side (total steps, epochs done).
        record: the run record (its metrics logger).
        state: the train state (optimizer groups, the step's learning rates, FLOPs per token).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        fabric: Fabric,
        precision: str,
        progress: Progress,
        batches: Batches,
        record: RunRecord,
        state: TrainState,
    ) -> None:
        self.cfg = cfg
        self.fabric = fabric
        self.precision = precision
        self.progress = progress
        self.batches = batches
        self.record = record
        self.state = state
        # Running [loss_sum, loss_tokens] of the current logging interval (on the device); it
        # starts from the progress counters at its first use, after any resume.
        self._interval_loss: torch.Tensor | None = None
        # The open progress bar, and the time, samples and tokens of the current interval.
        self.bar: Any = None
        self.interval: dict[str, float] = {"start": 0.0, "samples": 0, "tokens": 0}

    def open_bar(self) -> None:
        """Open the progress bar at the current step (see :meth:`progress_bar`)."""
        self.bar = self.progress_bar()

    def close_bar(self) -> None:
        """Close the progress bar."""
        self.bar.close()

    def start_interval(self, clock: float) -> None:
        """Start a logging interval at ``clock`` (``time.perf_counter()``)."""
        self.interval = {"start": clock, "samples": 0, "tokens": 0}

    def step_done(self, counts: dict[str, int], grad_norm: torch.Tensor | None) -> None:
        """Count an optimizer step's samples and tokens (``counts`` of
        :meth:`core.engine.batches.Batches.window_counts`) into the interval; every
        ``trainer.log_every_n_steps`` steps and at the last step write the interval's log line
        (a collective: call on every rank) and start the next; advance the bar."""
        self.interval["samples"] += counts["samples"]
        self.interval["tokens"] += counts["input_tokens"]
        step = self.progress.step
        if step % self.cfg.trainer.log_every_n_steps == 0 or step == self.batches.total_steps:
            now = time.perf_counter()
            interval = self.interval
            self.log_train(
                grad_norm, now - interval["start"], interval["samples"], interval["tokens"]
            )
            self.start_interval(now)
        self.bar.update(1)

    def fold_interval(self) -> None:
        """Store the interval's loss sums, summed over ranks, in the progress counters (a
        collective: call on every rank), for a checkpoint; the sums continue from there exactly
        as a resumed run's would (rank 0 holds them)."""
        loss, tokens = self.reduce_interval_loss()
        self.progress.interval_loss_sum, self.progress.interval_tokens = loss, tokens
        self._interval_loss = None

    def interval_sums(self) -> torch.Tensor:
        """Running ``[loss_sum, loss_tokens]`` of this rank since the last log event (float64, on
        the device). After a resume rank 0 starts from the sums stored in the checkpoint."""
        if self._interval_loss is None:
            start = (
                [self.progress.interval_loss_sum, self.progress.interval_tokens]
                if self.fabric.global_rank == 0
                else [0.0, 0.0]
            )
            self._interval_loss = torch.tensor(
                start, dtype=torch.float64, device=self.fabric.device
            )
        return self._interval_loss

    def accumulate_interval_loss(self, loss_sum: torch.Tensor, loss_tokens: torch.Tensor) -> None:
        """Add a step's loss to the running sums of the current logging interval (no sync)."""
        sums = self.interval_sums()
        sums[0] += loss_sum.double()
        sums[1] += loss_tokens.double()

    def reduce_interval_loss(self) -> tuple[float, float]:
        """Sum the interval's loss and tokens over ranks (a collective: call on every rank)."""
        sums = self.interval_sums()
        if self.fabric.world_size > 1:
            sums = self.fabric.all_reduce(sums.clone(), reduce_op="sum")
        loss, tokens = sums.tolist()
        return loss, tokens

    def log_train(
        self, grad_norm: torch.Tensor | None, seconds: float, samples: int, tokens: int
    ) -> None:
        """Write the training metrics of the interval that ends at this step."""
        loss_sum, loss_tokens = self.reduce_interval_loss()
        self._interval_loss = None
        self.progress.interval_loss_sum = self.progress.interval_tokens = 0.0
        # NaN when every step of the interval was skipped (trainer.on_nonfinite=skip).
        loss = loss_sum / loss_tokens if loss_tokens > 0 else math.nan
        if not math.isfinite(loss):
            log.warning(
                "Training loss is %s at step %d: lower optim.lr, raise warmup, or check the data.",
                loss,
                self.progress.step,
            )
        metrics: dict[str, Any] = {
            "train/loss": loss,
            "lr": self.state.step_lrs[0],
            "epoch": self.batches.epochs_done(),
            "throughput/samples_per_sec": samples / max(seconds, 1e-9),
            "throughput/tokens_per_sec": tokens / max(seconds, 1e-9),
        }
        names = {
            g.get("name", "").removesuffix("/decay").removesuffix("/no_decay")
            for g in self.state.optimizer.param_groups
        }
        if (
            len(names - {"", "decay", "no_decay"}) > 1
        ):  # several named groups (e.g. vision / llm): one lr each
            for group, lr in zip(self.state.optimizer.param_groups, self.state.step_lrs):
                metrics[f"lr/{group['name'].removesuffix('/decay').removesuffix('/no_decay')}"] = lr
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        if self.progress.skipped_steps:
            metrics["train/skipped_steps"] = self.progress.skipped_steps
        if self.fabric.device.type == "cuda":
            metrics["memory/peak_allocated_gb"] = (
                torch.cuda.max_memory_allocated(self.fabric.device) / 2**30
            )
            metrics["memory/peak_reserved_gb"] = (
                torch.cuda.max_memory_reserved(self.fabric.device) / 2**30
            )
            mfu = self.mfu(tokens, seconds)
            if mfu is not None:
                metrics["throughput/mfu"] = mfu
        self.record.logger.log(metrics, self.progress.step)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{metrics['lr']:.2e}", refresh=False)

    def mfu(self, tokens: int, seconds: float) -> float | None:
        """Model FLOPs utilisation per device over an interval, when the FLOPs are known."""
        from lightning.fabric.utilities.throughput import get_available_flops

        if not self.state.flops_per_token:
            return None
        dtype = (
            torch.bfloat16
            if "bf16" in self.precision
            else (torch.float16 if self.precision.startswith("16") else torch.float32)
        )
        available = get_available_flops(self.fabric.device, dtype)
        if not available:
            return None
        return (
            self.state.flops_per_token
            * tokens
            / max(seconds, 1e-9)
            / self.fabric.world_size
            / available
        )

    def progress_bar(self) -> Any:
        """Progress on rank 0: a tqdm bar on a terminal; in a log file (SLURM) a plain log line
        every 30 s instead, since a bar's carriage returns make one endless line there."""
        from tqdm.auto import tqdm

        enabled = self.cfg.logger.progress_bar and self.fabric.global_rank == 0
        if enabled and not sys.stderr.isatty():
            return LogProgress(self.batches.total_steps, self.progress.step)
        return tqdm(
            total=self.batches.total_steps,
            initial=self.progress.step,
            disable=not enabled,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            mininterval=0.5,
            file=sys.stderr,
        )


if __name__ == "__main__":
    # Self-check: two steps' losses add up on the device; a checkpoint folds them into the
    # progress counters, and a new meter (a resumed run) continues from exactly those sums.
    from core.config.loader import load_config
    from core.engine.state import Progress
    from core.testing.toy import ToyConfig

    cfg = load_config(ToyConfig, overrides=["trainer.accelerator=cpu"])
    fabric = Fabric(accelerator="cpu", devices=1)
    progress = Progress()
    meter = Meter(cfg, fabric, "32-true", progress, None, None, None)  # type: ignore[arg-type]
    meter.accumulate_interval_loss(torch.tensor(3.5), torch.tensor(2.0))
    meter.accumulate_interval_loss(torch.tensor(1.0), torch.tensor(4.0))
    meter.fold_interval()
    assert (progress.interval_loss_sum, progress.interval_tokens) == (4.5, 6.0), progress
    assert meter.reduce_interval_loss() == (4.5, 6.0)  # the same meter goes on from the fold
    saved = Progress(**progress.state_dict())
    resumed = Meter(cfg, fabric, "32-true", saved, None, None, None)  # type: ignore[arg-type]
    resumed.accumulate_interval_loss(torch.tensor(0.5), torch.tensor(1.0))
    assert resumed.reduce_interval_loss() == (5.0, 7.0), resumed.reduce_interval_loss()
    print("core.engine.meter: ok")
