"""The Trainer: one class on Lightning Fabric that reads top to bottom.

    fit -> setup (launch, seed, data, run folder, model, optimizer, resume)
        -> train_loop -> training_step (one optimizer step over an accumulation window)
                      -> val_loop (every N steps, all ranks at once)
                      -> save (atomic checkpoint)   /   stop on SIGTERM or SIGUSR1
        -> finish (last validation, final checkpoint, best model -> final/, summary, plot)

The loop is here; four objects it owns do the rest: ``core.engine.batches.Batches`` (loaders, window
counts), ``core.engine.meter.Meter`` (loss sums, log lines, MFU, bar),
``core.engine.state.TrainState``
(model, optimizer, progress, checkpoints, exact resume, ``final/``) and
``core.engine.record.RunRecord`` (run folder, config / manifest, summary, best checkpoint).

- **Accumulation** counts micro-batches: an optimizer step consumes ``accumulate_grad_batches``
  micro-batches (the last window of the last epoch may be shorter); gradient sync is skipped on
  all but the last (``fabric.no_backward_sync``).
- **Per-token loss** (``trainer.loss_normalization=token``, default): before the window runs,
  its loss-token count is summed over micro-batches *and ranks*; each micro-batch's summed loss
  is divided by that total (times the world size, which DDP's gradient averaging divides out).
  So batch 8 x 1 step equals batch 2 x 4 steps, and 2 ranks equal 1 rank with twice the batch.
- **Stop signals**: SIGTERM / SIGUSR1 set a flag; at the next step boundary every rank agrees
  (one all-reduce shared with the token count), a checkpoint is written, ``summary.json`` says
  ``interrupted`` and ``fit`` returns normally (exit code 0). Under SLURM, SIGUSR1 (sent before
  the time limit by ``#SBATCH --signal=USR1@N``) also requeues the job; the requeued job finds
  its run folder by job id and resumes by itself.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from core.config.schema import TrainConfig
from core.engine.batches import Batches
from core.engine.evaluation import evaluate
from core.engine.meter import Meter
from core.engine.record import FitResult, RunRecord, check_run_folder
from core.engine.sampler import ShardedBatchSampler
from core.engine.signals import StopSignal, requeue_slurm_job
from core.engine.state import MAX_SKIPS_IN_A_ROW, Progress, TrainState
from core.nn.acceleration import offload_saved_tensors
from core.parallel.seeding import seed_all
from core.parallel.strategy import (
    build_fabric,
    is_sharded,
    launch_environment,
    resolve_precision,
    watch_launched_ranks,
)
from core.run.logs import setup_logging, transformers_quiet
from core.task.base import Ranks, StepOutput, Task

__all__ = ["MAX_SKIPS_IN_A_ROW", "FitResult", "Progress", "Trainer"]

log = logging.getLogger(__name__)


class Trainer:
    """Fits a :class:`core.task.base.Task` with the settings of its config.

    Args:
        cfg: the task's root config.
        task: the task.
        argv: the command line to record (default ``sys.argv``).
    """

    def __init__(self, cfg: TrainConfig, task: Task, argv: list[str] | None = None) -> None:
        self.cfg = cfg
        self.task = task
        self.argv = list(sys.argv if argv is None else argv)
        # Machine checks and strategy first: a config this machine cannot run fails before
        # anything is launched or written (a run folder another process trains, a read-only one).
        self.precision = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)
        check_run_folder(cfg, task.name)
        self.fabric = build_fabric(cfg, task.fsdp_wrap_classes)
        self.progress = Progress()
        # Validation: the last metrics and the step they belong to.
        self.metrics: dict[str, float] = {}
        self.metrics_step = -1
        # The collaborators, each filled in by setup() in its turn.
        fabric, progress = self.fabric, self.progress
        self.batches = Batches(cfg, task, fabric, progress)
        self.record = RunRecord(
            cfg, task, fabric, self.argv, self.precision, progress, self.batches
        )
        self.state = TrainState(cfg, task, fabric, self.precision, progress, self.record)
        self.meter = Meter(
            cfg, fabric, self.precision, progress, self.batches, self.record, self.state
        )

    @property
    def train_sampler(self) -> ShardedBatchSampler | None:
        """The training batch sampler (see :class:`core.engine.batches.Batches`)."""
        return self.batches.train_sampler

    def fit(self) -> FitResult:
        """Train until ``max_steps`` / ``max_epochs`` or a stop signal; then export ``final/``.

        Returns:
            A :class:`FitResult`. Raises ``UserError`` for bad input (before the run folder
            exists where possible); any error after that marks the run ``failed``.
        """
        # The handlers stay installed until the end: a signal during set-up stops at the first
        # step boundary, and one during the final export does not kill the run half-written.
        with (
            launch_environment(),
            StopSignal() as stop,
            self.rank_watch_scope(),
            self.record.lock_scope(),
        ):
            try:
                self.setup()
            except RuntimeError as err:
                # A launched rank ended (or a collective failed) during set-up: the same paragraph.
                fault = self.record.peer_lost_fault(err)
                if fault is None:
                    raise
                raise fault from None
            start = time.perf_counter()
            try:
                stopped = self.train_loop(stop)
                if stopped is not None:
                    return self.interrupt(stopped, time.perf_counter() - start)
                return self.finish(time.perf_counter() - start)
            except KeyboardInterrupt:
                # A second Ctrl-C: stopped at once, so the steps since the last checkpoint are lost.
                self.failed(start, "stopped by a second Ctrl-C, without a checkpoint")
                raise
            except RuntimeError as err:
                # A peer rank died or hangs: a collective fails here (gloo: "Connection closed by
                # peer", or a timeout after trainer.dist_timeout). One paragraph instead of the
                # backend's traceback; any other RuntimeError is a bug and keeps its traceback.
                fault = self.record.peer_lost_fault(err)
                self.failed(start, str(fault) if fault else f"{type(err).__name__}: {err}")
                if fault is None:
                    raise
                raise fault from None
            except BaseException as err:
                self.failed(start, f"{type(err).__name__}: {err}")
                raise
            finally:
                if self.record.logger is not None:
                    self.record.logger.close()

    def failed(self, start: float, error: str) -> None:
        """Mark the run ``failed`` in ``summary.json``, with ``error``."""
        self.record.write_summary("failed", time.perf_counter() - start, self.metrics, error=error)

    def setup(self) -> None:
        """Launch processes, seed, read data, open the run folder, build model / optimizer / data
        loaders and resume if asked."""
        cfg, fabric = self.cfg, self.fabric
        fabric.launch()
        # Rank 0 of a local launch: a launched rank that dies raises LaunchedRankEnded here, in
        # whatever this process is doing, instead of Lightning's silent SIGKILL of it.
        watch_launched_ranks(fabric)
        self.task.ranks = Ranks(fabric, sharded=is_sharded(fabric))
        torch.set_float32_matmul_precision(cfg.trainer.matmul_precision)
        transformers_quiet()
        if fabric.device.type == "cuda":  # peak memory of this run, not of earlier work
            torch.cuda.reset_peak_memory_stats(fabric.device)
        setup_logging(None, fabric.global_rank)
        seed_all(cfg.trainer.seed)
        self.task.setup()  # bad input fails here, before a run folder exists
        self.batches.read()
        self.record.open_run()
        try:
            self.state.build_model()
            self.batches.build_dataloaders()
            self.state.build_optimizer(self.batches.total_steps)
            self.state.resume()
        except BaseException as err:
            self.record.setup_failed(err)
            raise

    @contextlib.contextmanager
    def rank_watch_scope(self) -> Iterator[None]:
        """Undo :func:`core.parallel.strategy.watch_launched_ranks` (armed by :meth:`setup`) when
        ``fit`` ends, whatever the outcome."""
        from core.parallel.strategy import unwatch_launched_ranks

        try:
            yield
        finally:
            unwatch_launched_ranks()

    def train_loop(self, stop: StopSignal) -> str | None:
        """Optimizer steps until the end or a stop signal.

        Returns:
            The name of the stop signal, or None when training ran to its end.
        """
        tc, progress, total = self.cfg.trainer, self.progress, self.batches.total_steps
        stream = self.batches.micro_batches(self.record.logger)
        self.state.model.train()
        self.meter.open_bar()
        clock = time.perf_counter()
        self.meter.start_interval(clock)
        budget = tc.max_seconds
        self.state.skips_in_a_row = 0
        if tc.val_at_start and progress.step == 0:
            self.val_loop()
        while progress.step < total:
            position = (progress.epoch, progress.batch)
            window = list(itertools.islice(stream, tc.accumulate_grad_batches))
            if not window:
                break  # data exhausted (max_epochs)
            time_up = (
                budget is not None
                and progress.train_seconds + time.perf_counter() - clock >= budget
            )
            counts = self.batches.window_counts(window, stop, time_up)
            if counts["stop"] or counts["time_up"]:
                progress.epoch, progress.batch = position  # the window was not trained on
                progress.train_seconds += time.perf_counter() - clock
                self.meter.close_bar()
                if counts["stop"]:
                    return stop.name or "SIGTERM"
                log.info(
                    "trainer.max_time=%s reached at step %d: finishing.", tc.max_time, progress.step
                )
                return None
            loss_sum, loss_tokens, grad_norm = self.training_step(window, counts["loss_tokens"])
            progress.step += 1
            progress.samples += counts["samples"]
            progress.tokens += counts["input_tokens"]
            if self.state.step_skipped:  # its loss is not finite: left out of the logged mean
                progress.skipped_steps += 1
            else:
                self.meter.accumulate_interval_loss(loss_sum, loss_tokens)
            self.meter.step_done(counts, grad_norm)  # the log line when due, the bar
            self.validate_and_save(progress.step)
        progress.train_seconds += time.perf_counter() - clock
        self.meter.close_bar()
        return None

    def validate_and_save(self, step: int) -> None:
        """After optimizer step ``step`` (not the last): validate every
        ``trainer.val_every_n_steps`` steps, checkpoint every ``trainer.ckpt_every_n_steps`` (by
        default at each validation)."""
        tc, total = self.cfg.trainer, self.batches.total_steps
        validated = False
        if tc.val_every_n_steps and step % tc.val_every_n_steps == 0 and step < total:
            self.val_loop()
            validated = True
        every = tc.ckpt_every_n_steps or tc.val_every_n_steps
        if every and step % every == 0 and step < total:
            self.save(metrics=self.metrics if validated else None)

    def training_step(
        self, window: list[dict[str, torch.Tensor]], global_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One optimizer step over the micro-batches of ``window``.

        Args:
            window: 1..``accumulate_grad_batches`` micro-batches (CPU tensors).
            global_tokens: loss tokens of the whole window over all ranks.

        Returns:
            ``(loss_sum, loss_tokens, grad_norm)``: this rank's summed token loss and token count
            (detached, on the device), and the gradient norm before clipping (or None).
            ``state.step_skipped`` says whether the optimizer skipped the step for a non-finite
            value (see :meth:`core.engine.state.TrainState.optimizer_step`, which raises
            ``FaultError`` for one that stops the run).
        """
        fabric, model, task, state = self.fabric, self.state.model, self.task, self.state
        offload = self.cfg.trainer.offload_activations
        # Several ranks agree on a non-finite loss through the gradients they sync anyway: a
        # rank whose loss is not finite multiplies its last micro-batch's loss by NaN (by exactly
        # 1 otherwise: no change), so every synced gradient and the global gradient norm become
        # NaN on every rank. Not under 16-mixed (the scaler skips inf gradients by itself) nor
        # DeepSpeed (no gradient norm here): there the loss flag is all-reduced instead.
        poison = fabric.world_size > 1 and not state.deepspeed and self.precision != "16-mixed"
        loss_sum = torch.zeros((), device=fabric.device)
        loss_tokens = torch.zeros((), device=fabric.device)
        for i, batch in enumerate(window):
            batch = fabric.to_device(batch)
            last = i == len(window) - 1
            with fabric.no_backward_sync(model, enabled=not last):
                # trainer.offload_activations: what the forward saves for backward waits in
                # pinned CPU memory (the hooks travel with the saved tensors into backward).
                with offload_saved_tensors() if offload else contextlib.nullcontext():
                    out = task.training_step(model, batch)
                if state.shape_logger is not None:
                    state.shape_logger.remove()
                    state.shape_logger = None
                loss = self.micro_batch_loss(out, global_tokens, len(window))
                if poison and last:
                    seen = loss_sum + out.loss_sum.detach().float()
                    loss = loss * (1 + (seen - seen)).to(loss.dtype)  # NaN if seen is not finite
                fabric.backward(loss, model=model)
            loss_sum += out.loss_sum.detach().float()
            loss_tokens += torch.as_tensor(out.num_tokens, device=fabric.device).float()
        grad_norm = state.optimizer_step(loss_sum, loss_tokens)
        return loss_sum, loss_tokens, grad_norm

    def micro_batch_loss(self, out: StepOutput, global_tokens: int, window: int) -> torch.Tensor:
        """The loss to run backward for one micro-batch of a ``window`` of micro-batches:
        per token, its summed loss over the window's ``global_tokens`` (all ranks); per sample,
        its mean token loss over the window size."""
        if self.cfg.trainer.loss_normalization == "token":
            # DDP averages gradients over ranks: multiply by world size to get a plain sum /
            # total.
            return out.loss_sum * (self.fabric.world_size / max(global_tokens, 1))
        return (
            out.loss_sum
            / torch.clamp(torch.as_tensor(out.num_tokens, device=out.loss_sum.device), min=1)
            / window
        )

    def save(self, metrics: dict[str, float] | None = None) -> Path:
        """Write a checkpoint of the current step (all ranks): the logging interval's loss sums
        go into the progress counters first (see :meth:`core.engine.meter.Meter.fold_interval`).

        Args:
            metrics: validation metrics of this step (for best-k), or None.
        """
        self.meter.fold_interval()
        return self.state.save(metrics)

    def val_loop(self) -> dict[str, float]:
        """Validate on every rank at once; metrics are computed on the gathered records.

        Returns:
            ``{"val/<name>": value}``; also logged and kept in ``self.metrics``.
        """
        if self.batches.val_loader is None:
            return {}
        start = time.perf_counter()
        result = evaluate(
            self.fabric,
            self.task,
            self.state.model,
            self.batches.val_loader,
            self.cfg.trainer.limit_val_batches,
        )
        self.metrics = {f"val/{k}": v for k, v in result.metrics.items()}
        self.metrics_step = self.progress.step
        self.record.logger.log(
            {**self.metrics, "val/seconds": time.perf_counter() - start}, self.progress.step
        )
        log.info(
            "step %d validation: %s",
            self.progress.step,
            ", ".join(f"{k}={v:.4f}" for k, v in self.metrics.items()),
        )
        return self.metrics

    def interrupt(self, signal_name: str, seconds: float) -> FitResult:
        """Checkpoint at this step boundary, mark the run interrupted, requeue under SLURM."""
        self.save(metrics=self.metrics if self.metrics_step == self.progress.step else None)
        self.record.write_summary("interrupted", seconds, self.metrics, signal=signal_name)
        log.warning(
            "Stopped by %s at step %d (checkpoint written); resume with: train run.dir=%s",
            signal_name,
            self.progress.step,
            self.record.run.path,
        )
        if (
            signal_name == "SIGUSR1"
            and self.fabric.global_rank == 0
            and os.environ.get("SLURM_JOB_ID")
        ):
            requeue_slurm_job()
        return self.record.result("interrupted", self.metrics)

    def finish(self, seconds: float) -> FitResult:
        """Last validation and checkpoint, export of the best (or last) model, summary and plot."""
        if (
            self.cfg.trainer.val_at_end
            and self.batches.val_loader is not None
            and self.metrics_step != self.progress.step
        ):
            self.val_loop()
        latest = self.record.checkpoints.latest()
        if latest is None or latest.step != self.progress.step:
            self.save(metrics=self.metrics if self.metrics_step == self.progress.step else None)
        checksums = self.state.replica_checksums()
        self.state.export_final()
        summary = self.record.write_summary(
            "completed", seconds, self.metrics, rank_weight_sha256=checksums
        )
        self.record.write_curves()
        log.info(
            "Done: %s",
            json.dumps(
                {k: summary[k] for k in ("status", "global_step", "best", "final_dir")}, default=str
            ),
        )
        return self.record.result("completed", self.metrics)
