"""The Trainer: one class on Lightning Fabric that reads top to bottom.

    fit -> setup (launch, seed, data, run folder, model, optimizer, resume)
        -> train_loop -> training_step (one optimizer step over an accumulation window)
                      -> val_loop (every N steps, all ranks at once)
                      -> save (atomic checkpoint)   /   stop on SIGTERM or SIGUSR1
        -> finish (last validation, final checkpoint, best model -> final/, summary, plot)

Features and exact behaviour:

- **Accumulation** counts micro-batches: an optimizer step consumes ``accumulate_grad_batches``
  micro-batches (the last window of the last epoch may be shorter); gradient sync is skipped on
  all but the last (``fabric.no_backward_sync``).
- **Per-token loss** (``trainer.loss_normalization=token``, default): before the window runs,
  its loss-token count is summed over micro-batches *and ranks*; each micro-batch's summed loss
  is divided by that total (times the world size, which DDP's gradient averaging divides out).
  So batch 8 x 1 step equals batch 2 x 4 steps, and 2 ranks equal 1 rank with twice the batch.
- **Exact resume**: a checkpoint holds model (or only trainable parameters), optimizer,
  scheduler, step / epoch / batch counters, every rank's RNG states and the running loss sums of
  the current logging interval. Data order is a pure function of (seed, epoch), so a resumed
  run skips consumed batches by index. On the CPU with ``trainer.deterministic=true`` a run
  stopped at step k and resumed ends with bit-identical weights and the same logged losses.
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
import math
import os
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from torch import nn

from core.acceleration import offload_saved_tensors
from core.checkpoint import (
    CheckpointCorrupt,
    CheckpointInfo,
    CheckpointManager,
    checkpoint_shapes,
    on_rank_zero,
    read_checkpoint,
    verify_checkpoint,
)
from core.config import to_dict, to_yaml
from core.data import ShardedBatchSampler, build_dataloader
from core.debug import ShapeLogger
from core.distributed import broadcast_object, gather_objects
from core.errors import ConfigError, FaultError, UserError
from core.evaluation import eval_dataloader, evaluate
from core.fsdp import full_state_dict as gather_full_state_dict
from core.fsdp import is_fsdp2
from core.logs import LogProgress, MetricsLogger, setup_logging, transformers_quiet
from core.manifest import build_manifest, data_file_sha256
from core.optim import build_optimizer, build_scheduler
from core.plots import plot_curves
from core.reproducibility import rng_state, seed_all, set_rng_state
from core.runs import RunDir, RunLock, check_not_locked, check_run_dir, resolve_run_dir
from core.settings import TrainConfig
from core.signals import StopSignal, requeue_slurm_job
from core.storage import StorageError, check_writable, storage_errors
from core.strategy import (
    build_fabric,
    is_sharded,
    launch_environment,
    resolve_precision,
    watch_launched_ranks,
)
from core.task import Ranks, Task

log = logging.getLogger(__name__)

# trainer.on_nonfinite=skip: this many skipped steps in a row stop the run as ``stop`` would
# (the weights no longer produce finite values; skipping more only burns the allocation).
MAX_SKIPS_IN_A_ROW = 5

# What a collective raises when a peer rank is gone or hangs (gloo, NCCL, the TCP store).
PEER_LOST_MARKERS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "Timed out",
    "timed out",
    "NCCL communicator was aborted",
    "ProcessGroupGloo",
    "ProcessGroupNCCL",
)


@dataclass
class Progress:
    """Counters that say where training is; saved in every checkpoint.

    Attributes:
        step: optimizer steps done.
        epoch: epoch of the next micro-batch.
        batch: index (within the epoch) of the next micro-batch.
        samples: training samples seen (all ranks).
        tokens: non-padding input tokens seen (all ranks).
        train_seconds: time spent in the training loop, over all sessions of the run.
        interval_loss_sum: summed token loss since the last log event (all ranks).
        interval_tokens: loss tokens since the last log event (all ranks).
        skipped_steps: steps skipped for a non-finite loss or gradient norm
            (``trainer.on_nonfinite=skip``).
    """

    step: int = 0
    epoch: int = 0
    batch: int = 0
    samples: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    interval_loss_sum: float = 0.0
    interval_tokens: float = 0.0
    skipped_steps: int = 0

    def state_dict(self) -> dict[str, Any]:
        """Plain-data copy for the checkpoint."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        for key, value in state.items():
            setattr(self, key, value)


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns.

    Attributes:
        status: ``completed`` or ``interrupted``.
        run_dir: the run folder.
        step: optimizer steps done.
        best: ``{"metric", "value", "step", "path"}`` of the best checkpoint, if any.
        metrics: the last validation metrics.
    """

    status: str
    run_dir: Path
    step: int
    best: dict[str, Any] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    global_rank: int = 0


class Trainer:
    """Fits a :class:`core.task.Task` with the settings of its config.

    Args:
        cfg: the task's root config.
        task: the task.
        argv: the command line to record (default ``sys.argv``).
    """

    # summary.json as it was before this process wrote "running" into an existing run folder
    # (restored when the run fails before it was really continued; see setup_failed).
    _summary_before: str | None = None
    _summary_read: bool = False

    def __init__(self, cfg: TrainConfig, task: Task, argv: list[str] | None = None) -> None:
        self.cfg = cfg
        self.task = task
        self.argv = list(sys.argv if argv is None else argv)
        # Machine checks and strategy first: a config this machine cannot run fails before
        # anything is launched or written.
        self.precision = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)
        if cfg.run.dir is not None and str(cfg.run.dir) != "latest":
            check_run_dir(Path(cfg.run.dir), task.name)
            check_not_locked(Path(cfg.run.dir))  # a run another process trains: refused now
        self.check_run_storage()  # a read-only run root fails here, before anything is built
        self.fabric = build_fabric(cfg, task.fsdp_wrap_classes)
        self.progress = Progress()
        # Validation: the last metrics and the step they belong to.
        self.metrics: dict[str, float] = {}
        self.metrics_step = -1
        # Set by setup(), in this order.
        self.train_data: Any = None
        self.val_data: Any = None
        self.run: RunDir | None = None
        self.resolved_config: dict[str, Any] = {}
        self.logger: MetricsLogger | None = None
        self.checkpoints: CheckpointManager | None = None
        self.module: nn.Module | None = None  # the task's model, unwrapped
        self.model: Any = None  # the same, set up by Fabric (DDP / FSDP2 / DeepSpeed)
        self.param_counts: dict[str, int] | None = None
        self.trainable_names: list[str] = []
        self.flops_per_token: float | None = None
        self.shape_logger: ShapeLogger | None = None
        self.deepspeed = cfg.trainer.strategy.startswith("deepspeed")
        self.train_lengths: Any = None
        self.train_sampler: ShardedBatchSampler | None = None
        self.train_loader: Any = None
        self.val_loader: Any = None
        self.total_steps: int | None = None
        self.optimizer: Any = None
        self.scheduler: Any = None
        # Set by each training step: the learning rates it used (one per parameter group).
        self.step_lrs: list[float] = []
        # Running [loss_sum, loss_tokens] of the current logging interval (on the device).
        self._interval_loss: torch.Tensor | None = None

    # ==========================================================================================
    # fit
    # ==========================================================================================

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
            self.run_lock_scope(),
        ):
            try:
                self.setup()
            except RuntimeError as err:
                # A launched rank ended (or a collective failed) during set-up: the same paragraph.
                fault = self.peer_rank_lost(err)
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
                self.write_summary(
                    "failed",
                    time.perf_counter() - start,
                    error="stopped by a second Ctrl-C, without a checkpoint",
                )
                raise
            except RuntimeError as err:
                # A peer rank died or hangs: a collective fails here (gloo: "Connection closed by
                # peer", or a timeout after trainer.dist_timeout). One paragraph instead of the
                # backend's traceback; any other RuntimeError is a bug and keeps its traceback.
                fault = self.peer_rank_lost(err)
                self.write_summary(
                    "failed",
                    time.perf_counter() - start,
                    error=str(fault) if fault else f"{type(err).__name__}: {err}",
                )
                if fault is None:
                    raise
                raise fault from None
            except BaseException as err:
                self.write_summary(
                    "failed", time.perf_counter() - start, error=f"{type(err).__name__}: {err}"
                )
                raise
            finally:
                if self.logger is not None:
                    self.logger.close()

    def peer_rank_lost(self, err: RuntimeError) -> FaultError | None:
        """The one-paragraph error for a collective that failed because a peer rank is gone or
        did not answer within ``trainer.dist_timeout``; None for any other error.

        On rank 0 of a local launch it also ends the ranks it launched (see
        :func:`core.strategy.release_child_ranks`), which names the rank that died.
        """
        from core.strategy import LaunchedRankEnded, release_child_ranks, stand_down_rank_watch

        # First: a LaunchedRankEnded from Lightning's watcher must not replace the error being
        # handled here (a failed collective and the watcher's next poll can come together).
        stand_down_rank_watch()
        text = str(err)
        if self.fabric.world_size == 1 or not (
            isinstance(err, (torch.distributed.DistError, LaunchedRankEnded))
            or any(marker in text for marker in PEER_LOST_MARKERS)
        ):
            return None
        me, world = self.fabric.global_rank, self.fabric.world_size
        ended = sorted(
            r for r, code in release_child_ranks(self.fabric).items() if code is not None
        )
        if ended:
            who = "rank " + ", ".join(str(r) for r in ended)
        elif world == 2:
            who = f"rank {1 - me}"
        else:
            who = "another rank"
        timeout = self.cfg.trainer.dist_timeout
        if "timed out" in text.lower() or "timeout" in text.lower():
            what = (
                f"{who} did not answer within trainer.dist_timeout={timeout:g} s (it died, hangs, "
                "or was only slow: then raise trainer.dist_timeout)"
            )
        else:
            what = f"{who} is gone (its process ended: killed, out of memory, or its node failed)"
        latest = self.checkpoints.latest() if self.checkpoints is not None else None
        where = (
            f"The newest checkpoint is {latest.path} (step {latest.step}); resume with: train "
            f"run.dir={self.run.path}"
            if latest is not None and self.run is not None
            else "No checkpoint was written yet"
        )
        return FaultError(
            f"Rank {me} stopped at step {self.progress.step} of {self.total_steps}: {what}. The "
            f"other ranks stop too and the run is marked failed; the log of {who} (or the job's "
            f"output) says why it ended. {where}."
        )

    # ==========================================================================================
    # setup
    # ==========================================================================================

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
        if (
            fabric.device.type == "cuda"
        ):  # peak memory of this run, not of earlier work in the process
            torch.cuda.reset_peak_memory_stats(fabric.device)
        setup_logging(None, fabric.global_rank)
        seed_all(cfg.trainer.seed)
        self.task.setup()  # bad input fails here, before a run folder exists
        self.train_data = self.task.train_dataset()
        self.val_data = self.task.val_dataset()
        if len(self.train_data) == 0:
            raise UserError("The training set is empty: check the data files / data settings.")
        self.open_run()
        try:
            self.build_model()
            self.build_dataloaders()
            self.build_optimizer()
            self.resume()
        except BaseException as err:
            self.setup_failed(err)
            raise

    @contextlib.contextmanager
    def rank_watch_scope(self) -> Iterator[None]:
        """Undo :func:`core.strategy.watch_launched_ranks` (armed by :meth:`setup`) when
        ``fit`` ends, whatever the outcome."""
        from core.strategy import unwatch_launched_ranks

        try:
            yield
        finally:
            unwatch_launched_ranks()

    # -- the run folder's lock (core.runs.RunLock): taken by open_run, removed when fit ends --
    run_lock: RunLock | None = None

    @contextlib.contextmanager
    def run_lock_scope(self) -> Iterator[None]:
        """Remove the run folder's lock (rank 0 took it in :meth:`open_run`) when ``fit`` ends,
        whatever the outcome; last, after the final summary."""
        try:
            yield
        finally:
            if self.run_lock is not None:
                self.run_lock.release()
                self.run_lock = None

    def open_run(self) -> None:
        """Choose the run folder on rank 0 and lock it, share it, and write ``config.yaml`` /
        ``manifest.json``.

        Raises:
            UserError: on every rank, when rank 0 cannot use the folder (another live process
                trains it: nothing is written there; a bad ``run.dir``).
        """
        cfg, fabric = self.cfg, self.fabric
        run, refused = None, None
        if fabric.global_rank == 0:
            try:
                run = resolve_run_dir(
                    cfg.run.root,
                    cfg.run.name,
                    cfg.run.dir,
                    task=self.task.name,
                    # The arguments, not the program's path: a requeued job may run from a venv
                    # synced to another node-local folder (slurm/lib/env.sh's LOCAL_SCRATCH).
                    command=shlex.join(self.argv[1:]),
                )
                self.run_lock = RunLock.acquire(run.path)
            except UserError as err:
                refused = err
        # Every rank raises rank 0's refusal (the others would wait for the folder forever).
        run, refused = broadcast_object((run, refused))
        if refused is not None:
            raise refused
        self.run = run
        self.checkpoints = CheckpointManager(self.run.checkpoints, cfg.checkpoint)
        self.task.run_dir = self.run.path
        setup_logging(self.run.path, fabric.global_rank)
        log.info("Run folder: %s (%s)", self.run.path, self.run.reason)
        # config.yaml records what "auto" became; run.dir stays as given, so `train -c
        # <run>/config.yaml` reproduces the run in a new folder.
        cfg.trainer.precision = self.precision
        self.resolved_config = to_dict(cfg)
        if fabric.global_rank == 0:
            self._write_once("config.yaml", to_yaml(cfg))
            entries = self.task.manifest_entries()
            manifest = build_manifest(
                seed=cfg.trainer.seed,
                data_files=self.task.data_files(),
                metrics=entries.pop("metrics", None),
                argv=self.argv,
                extra={
                    "task": self.task.name,
                    "world_size": fabric.world_size,
                    "strategy": type(fabric.strategy).__name__,
                    "precision": self.precision,
                    "run_dir": str(self.run.path),
                    "run_dir_reason": self.run.reason,
                    **entries,
                },
            )
            self._write_once("manifest.json", json.dumps(manifest, indent=1, default=str))
        self.logger = MetricsLogger(
            self.run.path,
            cfg.logger,
            self.resolved_config,
            self.run.path.name,
            enabled=fabric.global_rank == 0,
        )
        self.write_summary("running", 0.0)

    def _write_once(self, name: str, text: str) -> None:
        """Write ``name`` in the run folder; when it exists (a resumed run) keep it and add a
        timestamped copy if the content changed."""
        path = self.run.path / name
        if path.exists():
            if path.read_text(encoding="utf-8") != text:
                stem, dot, ext = name.partition(".")
                path = self.run.path / f"{stem}.{time.strftime('%Y%m%d_%H%M%S')}{dot}{ext}"
            else:
                return
        path.write_text(text, encoding="utf-8")

    def build_model(self) -> None:
        """Build the model on the device (``fabric.init_module``), add shape hooks if asked, wrap
        it."""
        fabric = self.fabric
        with fabric.init_module(empty_init=False):
            module = self.task.configure_model()
        total = sum(p.numel() for p in module.parameters())
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        log.info(
            "Parameters: %s total, %s trainable (%.2f%%)",
            f"{total:,}",
            f"{trainable:,}",
            100.0 * trainable / max(total, 1),
        )
        self.param_counts = {"total": total, "trainable": trainable}
        self.trainable_names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.flops_per_token = self.task.flops_per_token(module)
        self.shape_logger = ShapeLogger(module) if self.cfg.debug.shapes else None
        if self.cfg.trainer.compile:
            self.compile_blocks(module)
        self.module = module
        if (
            not self.deepspeed
        ):  # FSDP2 shards the parameters, and the optimizer must hold the shards
            self.model = fabric.setup_module(module)
            if hasattr(module, "generate"):
                self.model.mark_forward_method("generate")

    def compile_blocks(self, module: nn.Module) -> None:
        """``trainer.compile``: compile each block's forward (dynamic shapes) before DDP / FSDP2
        wrap the model (see ``core.acceleration``)."""
        from core.acceleration import compile_blocks
        from core.fsdp import resolve_wrap_classes

        if self.cfg.trainer.strategy == "fsdp":
            return  # core.fsdp.parallelize compiles the units, after activation checkpointing
        classes = resolve_wrap_classes(self.cfg.fsdp.auto_wrap, self.task.fsdp_wrap_classes())
        try:
            count = compile_blocks(module, classes)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        log.info("trainer.compile: %d blocks compiled (dynamic shapes)", count)

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
        log.info(
            "Data: %d training samples, %d micro-batches/epoch/rank, %d optimizer steps (batch %d "
            "x accumulation %d x %d ranks)",
            len(self.train_data),
            per_epoch,
            self.total_steps,
            tc.batch_size,
            accum,
            fabric.world_size,
        )

    def eval_loader(self, dataset: Any) -> Any:
        """See :func:`eval_dataloader`."""
        return eval_dataloader(self.fabric, self.task, dataset, self.cfg.trainer)

    def build_optimizer(self) -> None:
        """Optimizer over the task's parameter groups, and the warmup + decay schedule."""
        fabric = self.fabric
        groups = self.task.parameter_groups(self.module if self.deepspeed else self.model.module)
        optimizer = build_optimizer(groups, self.cfg.optim, fabric.device.type)
        if self.deepspeed:
            self.model, self.optimizer = fabric.setup(self.module, optimizer)
        else:
            self.optimizer = fabric.setup_optimizers(optimizer)
        self.scheduler = build_scheduler(optimizer, self.cfg.optim, self.total_steps)

    def resume(self) -> None:
        """Load a checkpoint if ``trainer.resume`` asks for one (``auto``: the run folder's
        newest intact one).

        Raises:
            CheckpointCorrupt: no intact checkpoint to continue from (exit 1).
            UserError: the data files or the model changed since the checkpoint (exit 2).
        """
        choice = self.cfg.trainer.resume
        if choice is None or str(choice).lower() in ("none", "false", "no", ""):
            existing = self.checkpoints.latest()
            if existing is not None:
                raise UserError(
                    f"Run folder {self.run.path} already has checkpoints (newest: "
                    f"{existing.path.name}) and "
                    "trainer.resume is off; set trainer.resume=auto to continue it, or choose "
                    "another run.dir."
                )
            return
        # Rank 0 reads and verifies (one pass over the bytes), every rank loads its choice.
        info = broadcast_object(on_rank_zero(self.fabric, lambda: self.choose_checkpoint(choice)))
        if info is None:
            return
        self.load(info)
        dropped = self.logger.truncate_after(self.progress.step)
        log.info(
            "Resumed from %s: step %d, epoch %d, batch %d%s",
            info.path,
            self.progress.step,
            self.progress.epoch,
            self.progress.batch,
            f" ({dropped} log records after that step moved to metrics.discarded.jsonl)"
            if dropped
            else "",
        )

    def choose_checkpoint(self, choice: str) -> CheckpointInfo | None:
        """The checkpoint to resume from (rank 0): ``auto`` the newest intact one of the run
        (damaged newer ones are skipped with a warning naming the bad file), else the one at
        path ``choice``, verified; its data files must be the ones it was trained on.

        Returns:
            The checkpoint, or None (``auto`` in a run without checkpoints).
        """
        if str(choice) == "auto":
            info, skipped = self.checkpoints.newest_intact()
            if info is None and skipped:
                listing = "; ".join(f"{path.name}: {problem}" for path, problem in skipped)
                raise CheckpointCorrupt(
                    f"No intact checkpoint to resume from in {self.checkpoints.root}: {listing}. "
                    "The damaged checkpoints are left there for inspection; to train anyway, "
                    "start a new run (without run.dir)."
                )
            if info is None:
                return None
            if skipped:
                # The run continues from an older step and writes the newer steps anew; the
                # damaged folders are kept for inspection under another name.
                moved = [self.checkpoints.set_aside(path).name for path, _ in skipped]
                log.warning(
                    "Resuming from %s, the newest intact checkpoint; the damaged newer ones are "
                    "set aside as %s (delete them when no longer needed).",
                    info.path.name,
                    ", ".join(moved),
                )
        else:
            info = read_checkpoint(Path(choice))
            problem = verify_checkpoint(info)
            if problem:
                raise CheckpointCorrupt(
                    f"Checkpoint {info.path} (trainer.resume) is damaged: {problem}. Resume "
                    "from another checkpoint (trainer.resume=PATH), or trainer.resume=auto for "
                    "the newest intact one of the run."
                )
        if info.files is None:
            log.warning(
                "Checkpoint %s was written before checkpoints carried checksums: it is loaded "
                "unverified.",
                info.path,
            )
        self.check_data(info)
        return info

    def data_hashes(self) -> dict[str, str | None]:
        """``{absolute path: sha256}`` of the task's data files now (None: missing); the
        hashes of ``manifest.json`` are reused while the files are unchanged."""
        return {
            str(Path(path).absolute()): data_file_sha256(Path(path))
            for path in self.task.data_files()
        }

    def check_data(self, info: CheckpointInfo) -> None:
        """Refuse to resume on data files that changed since the checkpoint was written
        (``trainer.resume_changed_data=true`` continues anyway, with a warning).

        The checkpoint's ``meta.json`` holds the hashes it was trained on; a checkpoint without
        them is compared with its run's ``manifest.json``.

        Raises:
            UserError: naming each changed file with both hashes.
        """
        recorded = _checkpoint_data_hashes(info)
        if recorded is None:
            return
        now = self.data_hashes()
        changes = []
        for path in sorted(set(recorded) | set(now)):
            before, after = recorded.get(path, "absent"), now.get(path, "absent")
            if before != after:
                changes.append(
                    f"'{path}' had sha256 {before or 'missing'}, now {after or 'missing'}"
                )
        if not changes:
            return
        listing = "; ".join(changes[:5]) + (
            f"; and {len(changes) - 5} more" if len(changes) > 5 else ""
        )
        if self.cfg.trainer.resume_changed_data:
            log.warning("Resuming on changed data (trainer.resume_changed_data=true): %s.", listing)
            return
        raise UserError(
            f"The data changed since checkpoint {info.path.name} was written: {listing}. "
            "Resuming would continue the run on other data than it was trained on. To continue "
            "on purpose set trainer.resume_changed_data=true; to train on the new data from "
            "the start, start a new run (without run.dir)."
        )

    # ==========================================================================================
    # training
    # ==========================================================================================

    def micro_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches across epochs from the saved position on; advances
        ``progress.epoch/batch``."""
        tc = self.cfg.trainer
        while (
            self.cfg.debug.overfit_batches
            or tc.epoch_limit is None
            or self.progress.epoch < tc.epoch_limit
        ):
            if self.progress.batch == 0:
                self.log_padding_share(self.progress.epoch)
            self.train_sampler.set_epoch(self.progress.epoch, start_batch=self.progress.batch)
            # Worker seeds come from the loader's generator; reseed per epoch so a resumed run's
            # workers get the same seeds as an uninterrupted run's.
            self.train_loader.generator.manual_seed(tc.seed + self.progress.epoch)
            for batch in self.train_loader:
                self.progress.batch += 1
                yield batch
            self.progress.epoch += 1
            self.progress.batch = 0

    def log_padding_share(self, epoch: int) -> None:
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
        self.logger.log({"data/padding_share": share, "data/epoch": epoch}, self.progress.step)
        log.info("Epoch %d: %.1f%% of the input tokens are padding", epoch, 100 * share)

    def train_loop(self, stop: StopSignal) -> str | None:
        """Optimizer steps until the end or a stop signal.

        Returns:
            The name of the stop signal, or None when training ran to its end.
        """
        tc = self.cfg.trainer
        accum = tc.accumulate_grad_batches
        stream = self.micro_batches()
        self.model.train()
        bar = self.progress_bar()
        clock = time.perf_counter()
        interval = {"start": clock, "samples": 0, "tokens": 0}
        budget = tc.max_seconds
        self._skips_in_a_row = 0
        if tc.val_at_start and self.progress.step == 0:
            self.val_loop()
        while self.progress.step < self.total_steps:
            position = (self.progress.epoch, self.progress.batch)
            window = list(itertools.islice(stream, accum))
            if not window:
                break  # data exhausted (max_epochs)
            time_up = (
                budget is not None
                and self.progress.train_seconds + time.perf_counter() - clock >= budget
            )
            counts = self.window_counts(window, stop, time_up)
            if counts["stop"] or counts["time_up"]:
                self.progress.epoch, self.progress.batch = position  # the window was not trained on
                self.progress.train_seconds += time.perf_counter() - clock
                bar.close()
                if counts["stop"]:
                    return stop.name or "SIGTERM"
                log.info(
                    "trainer.max_time=%s reached at step %d: finishing.",
                    tc.max_time,
                    self.progress.step,
                )
                return None
            loss_sum, loss_tokens, grad_norm = self.training_step(window, counts["loss_tokens"])
            self.progress.step += 1
            self.progress.samples += counts["samples"]
            self.progress.tokens += counts["input_tokens"]
            if self.step_skipped:  # its loss is not finite: left out of the logged mean
                self.progress.skipped_steps += 1
            else:
                self.accumulate_interval_loss(loss_sum, loss_tokens)
            interval["samples"] += counts["samples"]
            interval["tokens"] += counts["input_tokens"]
            step = self.progress.step
            if step % tc.log_every_n_steps == 0 or step == self.total_steps:
                now = time.perf_counter()
                self.log_train(
                    grad_norm, now - interval["start"], interval["samples"], interval["tokens"], bar
                )
                interval = {"start": now, "samples": 0, "tokens": 0}
            bar.update(1)
            validated = False
            if (
                tc.val_every_n_steps
                and step % tc.val_every_n_steps == 0
                and step < self.total_steps
            ):
                self.val_loop()
                validated = True
            every = tc.ckpt_every_n_steps or tc.val_every_n_steps
            if every and step % every == 0 and step < self.total_steps:
                self.save(metrics=self.metrics if validated else None)
        self.progress.train_seconds += time.perf_counter() - clock
        bar.close()
        return None

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
            ``self.step_skipped`` says whether the optimizer skipped the step for a non-finite
            value (``trainer.on_nonfinite=skip``).

        Raises:
            FaultError: a non-finite loss or gradient norm with ``trainer.on_nonfinite=stop``, or
            too many skipped steps in a row; the weights are not updated with it.
        """
        fabric, model, task = self.fabric, self.model, self.task
        per_token = self.cfg.trainer.loss_normalization == "token"
        offload = self.cfg.trainer.offload_activations
        # Several ranks agree on a non-finite loss through the gradients they sync anyway: a
        # rank whose loss is not finite multiplies its last micro-batch's loss by NaN (by exactly
        # 1 otherwise: no change), so every synced gradient and the global gradient norm become
        # NaN on every rank. Not under 16-mixed (the scaler skips inf gradients by itself) nor
        # DeepSpeed (no gradient norm here): there the loss flag is all-reduced instead.
        poison = fabric.world_size > 1 and not self.deepspeed and self.precision != "16-mixed"
        self.step_skipped = False
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
                if self.shape_logger is not None:
                    self.shape_logger.remove()
                    self.shape_logger = None
                if per_token:
                    # DDP averages gradients over ranks: multiply by world size to get a plain sum /
                    # total.
                    loss = out.loss_sum * (fabric.world_size / max(global_tokens, 1))
                else:
                    loss = (
                        out.loss_sum
                        / torch.clamp(
                            torch.as_tensor(out.num_tokens, device=out.loss_sum.device), min=1
                        )
                        / len(window)
                    )
                if poison and last:
                    seen = loss_sum + out.loss_sum.detach().float()
                    loss = loss * (1 + (seen - seen)).to(loss.dtype)  # NaN if seen is not finite
                fabric.backward(loss, model=model)
            loss_sum += out.loss_sum.detach().float()
            loss_tokens += torch.as_tensor(out.num_tokens, device=fabric.device).float()
        grad_norm = norm = None
        clip = self.cfg.trainer.gradient_clip_val
        if clip is not None or not self.deepspeed:
            # Without clipping the norm is still needed for the non-finite check: max_norm=inf
            # scales the gradients by exactly 1.
            norm = fabric.clip_gradients(
                model,
                self.optimizer,
                max_norm=clip if clip is not None else math.inf,
                error_if_nonfinite=False,
            )
            grad_norm = norm if clip is not None else None
        nonfinite = self.find_nonfinite(loss_sum, loss_tokens, norm)
        if nonfinite is None:
            self._skips_in_a_row = 0
            self.optimizer.step()
        else:
            self._skips_in_a_row = getattr(self, "_skips_in_a_row", 0) + 1
            if (
                self.cfg.trainer.on_nonfinite == "stop"
                or self._skips_in_a_row >= MAX_SKIPS_IN_A_ROW
            ):
                self.optimizer.zero_grad(set_to_none=True)
                raise self.nonfinite_fault(nonfinite)
            self.step_skipped = True
            self.optimizer.zero_grad(set_to_none=True)
            if not self.deepspeed:
                # A no-op on parameters without gradients (torch, bitsandbytes and transformers
                # optimizers skip them); it keeps 16-mixed's gradient scaler in step (it was
                # unscaled for the norm) and the scheduler's "optimizer stepped first" check.
                self.optimizer.step()
            log.warning(
                "Step %d skipped (trainer.on_nonfinite=skip): %s.",
                self.progress.step + 1,
                nonfinite,
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.step_lrs = [
            group["lr"] for group in self.optimizer.param_groups
        ]  # what this step used
        # Also after a skipped step: the schedule stays a function of the step number.
        self.scheduler.step()
        return loss_sum, loss_tokens, grad_norm

    def find_nonfinite(
        self, loss_sum: torch.Tensor, loss_tokens: torch.Tensor, grad_norm: torch.Tensor | None
    ) -> str | None:
        """Whether this step's loss or gradient norm is NaN / inf, the same answer on every rank.

        One host sync per step; a collective only where gradients cannot carry the answer
        (16-mixed, DeepSpeed: see ``training_step``) and, on every rank at once, when something
        was found (for the global loss in the message).

        Args:
            loss_sum, loss_tokens: this rank's summed loss and loss tokens of the step.
            grad_norm: the global gradient norm before clipping, or None (DeepSpeed).

        Returns:
            None, or what was not finite (``"the training loss was nan, the gradient norm was
            nan"``).
        """
        from torch.distributed.tensor import DTensor

        fabric = self.fabric
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        # Under 16-mixed an inf gradient is the scaler's business (it skips and lowers the scale).
        grads_count = grad_norm is not None and self.precision != "16-mixed"
        loss_bad = ~torch.isfinite(loss_sum)
        if grads_count:
            grad_bad = ~torch.isfinite(grad_norm.to(loss_sum.device))
            # Several ranks: the synced gradients carry every rank's loss (poisoned) -- agreed.
            bad = grad_bad if fabric.world_size > 1 else grad_bad | loss_bad
        elif fabric.world_size > 1:
            bad = fabric.all_reduce(loss_bad.float(), reduce_op="sum") > 0
        else:
            bad = loss_bad
        if not bool(bad):
            return None
        sums = torch.stack([loss_sum.double(), loss_tokens.double()])
        if fabric.world_size > 1:
            sums = fabric.all_reduce(sums, reduce_op="sum")
        total, tokens = sums.tolist()
        loss = total / max(tokens, 1.0)
        found = [] if math.isfinite(loss) else [f"the training loss was {loss}"]
        if grads_count and not math.isfinite(float(grad_norm)):
            found.append(f"the gradient norm was {float(grad_norm)}")
        return ", ".join(found) or "the training loss was not finite on one rank"

    def nonfinite_fault(self, what: str) -> FaultError:
        """The one-paragraph error of a step with a non-finite value: the step, the value, the
        last good checkpoint and how to go on from it."""
        tc = self.cfg.trainer
        step = self.progress.step + 1
        lower = f"optim.lr={self.cfg.optim.lr / 10:g}"
        if tc.on_nonfinite == "skip":
            head = (
                f"Training stopped at step {step}: {what}, the {MAX_SKIPS_IN_A_ROW}th step in a "
                "row skipped for a non-finite value (trainer.on_nonfinite=skip)"
            )
        else:
            head = f"Training stopped at step {step}: {what} (trainer.on_nonfinite=stop)"
        head += "; the weights were not updated with it and no final/ was exported."
        latest = self.checkpoints.latest() if self.checkpoints is not None else None
        if latest is not None:
            where = (
                f" The last good checkpoint is {latest.path} (step {latest.step}); continue "
                f"from it with a lower learning rate: train run.dir={self.run.path} {lower}"
            )
        else:
            where = (
                " No checkpoint was written before it; start again with a lower learning rate "
                f"({lower}) or a longer warmup (optim.warmup_steps)"
            )
        return FaultError(
            f"{head}{where}, or check the data of that step (trainer.on_nonfinite=skip skips "
            "such steps)."
        )

    def keep_config_lr(self, config_lrs: list[float]) -> None:
        """After loading a checkpoint: the learning rates follow this run's ``optim.lr`` (the
        optimizer and scheduler states hold the saved run's), so a run stopped for a non-finite
        value can go on from its checkpoint with a lower one. The same ``optim.lr`` gives the
        same floats as saved (exact resume).

        Args:
            config_lrs: the scheduler's base learning rates as built from this run's config.
        """
        saved = list(self.scheduler.base_lrs)
        if saved == config_lrs:
            return
        log.warning(
            "optim.lr differs from the checkpoint's: the learning rates go on from %s (saved: %s)",
            ", ".join(f"{lr:g}" for lr in config_lrs),
            ", ".join(f"{lr:g}" for lr in saved),
        )
        self.scheduler.base_lrs = list(config_lrs)
        step = self.scheduler.last_epoch
        for group, base, lam in zip(
            self.optimizer.param_groups, config_lrs, self.scheduler.lr_lambdas
        ):
            group["initial_lr"] = base
            group["lr"] = base * lam(step)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

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
        self, grad_norm: torch.Tensor | None, seconds: float, samples: int, tokens: int, bar: Any
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
            "lr": self.step_lrs[0],
            "epoch": self.epochs_done(),
            "throughput/samples_per_sec": samples / max(seconds, 1e-9),
            "throughput/tokens_per_sec": tokens / max(seconds, 1e-9),
        }
        names = {
            g.get("name", "").removesuffix("/decay").removesuffix("/no_decay")
            for g in self.optimizer.param_groups
        }
        if (
            len(names - {"", "decay", "no_decay"}) > 1
        ):  # several named groups (e.g. vision / llm): one lr each
            for group, lr in zip(self.optimizer.param_groups, self.step_lrs):
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
        self.logger.log(metrics, self.progress.step)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{metrics['lr']:.2e}", refresh=False)

    def epochs_done(self) -> float:
        """Fractional epochs consumed so far."""
        return self.progress.epoch + self.progress.batch / max(1, self.train_sampler.num_batches())

    def mfu(self, tokens: int, seconds: float) -> float | None:
        """Model FLOPs utilisation per device over an interval, when the FLOPs are known."""
        from lightning.fabric.utilities.throughput import get_available_flops

        if not self.flops_per_token:
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
            self.flops_per_token * tokens / max(seconds, 1e-9) / self.fabric.world_size / available
        )

    def progress_bar(self) -> Any:
        """Progress on rank 0: a tqdm bar on a terminal; in a log file (SLURM) a plain log line
        every 30 s instead, since a bar's carriage returns make one endless line there."""
        from tqdm.auto import tqdm

        enabled = self.cfg.logger.progress_bar and self.fabric.global_rank == 0
        if enabled and not sys.stderr.isatty():
            return LogProgress(self.total_steps, self.progress.step)
        return tqdm(
            total=self.total_steps,
            initial=self.progress.step,
            disable=not enabled,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            mininterval=0.5,
            file=sys.stderr,
        )

    # ==========================================================================================
    # validation
    # ==========================================================================================

    def val_loop(self) -> dict[str, float]:
        """Validate on every rank at once; metrics are computed on the gathered records.

        Returns:
            ``{"val/<name>": value}``; also logged and kept in ``self.metrics``.
        """
        if self.val_loader is None:
            return {}
        start = time.perf_counter()
        result = evaluate(
            self.fabric, self.task, self.model, self.val_loader, self.cfg.trainer.limit_val_batches
        )
        self.metrics = {f"val/{k}": v for k, v in result.metrics.items()}
        self.metrics_step = self.progress.step
        self.logger.log(
            {**self.metrics, "val/seconds": time.perf_counter() - start}, self.progress.step
        )
        log.info(
            "step %d validation: %s",
            self.progress.step,
            ", ".join(f"{k}={v:.4f}" for k, v in self.metrics.items()),
        )
        return self.metrics

    # ==========================================================================================
    # save / load
    # ==========================================================================================

    def checkpoint_state(self) -> dict[str, Any]:
        """The state a checkpoint holds (objects with ``state_dict`` are converted by Fabric)."""
        loss, tokens = self.reduce_interval_loss()
        self.progress.interval_loss_sum, self.progress.interval_tokens = loss, tokens
        # Continue from the reduced sums exactly as a resumed run would (rank 0 holds them).
        self._interval_loss = None
        return {
            "model": self.model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "progress": self.progress.state_dict(),
            "rng": gather_objects(rng_state()),
            "trainable_names": self.trainable_names if self.cfg.checkpoint.trainable_only else None,
        }

    def save(self, metrics: dict[str, float] | None = None) -> Path:
        """Write a checkpoint of the current step (all ranks).

        Args:
            metrics: validation metrics of this step (for best-k), or None.
        """
        keep = set(self.trainable_names)
        filter_ = (
            {"model": lambda name, _: name in keep} if self.cfg.checkpoint.trainable_only else None
        )
        path = self.checkpoints.save(
            self.fabric,
            self.checkpoint_state(),
            self.progress.step,
            metrics,
            filter=filter_,
            # what the checkpoint was trained on, compared at resume (check_data)
            extra={"data_files": self.data_hashes()} if self.fabric.global_rank == 0 else None,
        )
        log.info("Saved checkpoint %s", path)
        return path

    def load(self, info: CheckpointInfo) -> None:
        """Restore model, optimizer, scheduler, counters and this rank's RNG states from
        ``info``."""
        state = {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler}
        trainable_only = self.cfg.checkpoint.trainable_only
        self.check_architecture(info)
        config_lrs = list(self.scheduler.base_lrs)  # from this run's optim.lr
        try:
            rest = self.fabric.load(
                info.state_path, state, strict=not trainable_only, weights_only=False
            )
        except (KeyError, RuntimeError, ValueError) as err:
            raise UserError(
                f"Checkpoint {info.path} does not match this model / optimizer: {err}"
            ) from None
        self.keep_config_lr(config_lrs)
        saved_names = rest.get("trainable_names")
        if (
            trainable_only
            and saved_names is not None
            and sorted(saved_names) != sorted(self.trainable_names)
        ):
            raise UserError(
                f"Checkpoint {info.path} holds other trainable parameters than this model "
                f"({len(saved_names)} saved vs {len(self.trainable_names)} now): the model or "
                "adapter settings changed."
            )
        self.progress.load_state_dict(rest["progress"])
        rng = rest["rng"]
        set_rng_state(
            rng[self.fabric.global_rank] if len(rng) == self.fabric.world_size else rng[0]
        )
        self._interval_loss = None

    def model_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{name: shape}`` of the model tensors a checkpoint of this model holds (only the
        trainable ones with ``checkpoint.trainable_only``); sharded tensors at full shape."""
        keep = set(map(_canonical_name, self.trainable_names))
        shapes = {
            _canonical_name(name): tuple(tensor.shape)
            for name, tensor in self.module.state_dict().items()
        }
        if self.cfg.checkpoint.trainable_only:
            shapes = {k: v for k, v in shapes.items() if k in keep}
        return shapes

    def check_architecture(self, info: CheckpointInfo) -> None:
        """Refuse a checkpoint of another architecture, naming the tensors that differ.

        Raises:
            UserError: tensors missing from the checkpoint, unexpected in it, or of another
                shape (a few of each, and how many).
        """
        try:
            shapes = checkpoint_shapes(info)
        except Exception as err:  # unreadable: a checkpoint without a manifest that is damaged
            raise CheckpointCorrupt(
                f"Checkpoint {info.path} cannot be read ({type(err).__name__}: {err}); it is "
                "damaged. Resume from another checkpoint (trainer.resume=PATH)."
            ) from None
        if shapes is None:
            return  # a layout without readable shapes: fabric.load reports a mismatch
        saved = {_canonical_name(k): v for k, v in shapes.items()}
        model = self.model_shapes()
        missing = sorted(set(model) - set(saved))
        unexpected = sorted(set(saved) - set(model))
        reshaped = sorted(k for k in set(model) & set(saved) if tuple(model[k]) != tuple(saved[k]))
        if not (missing or unexpected or reshaped):
            return

        def few(names: list[str], describe: Any = str) -> str:
            shown = ", ".join(describe(n) for n in names[:3])
            return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")

        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors of the model are not in it ({few(missing)})")
        if unexpected:
            parts.append(
                f"{len(unexpected)} of its tensors are not in the model ({few(unexpected)})"
            )
        if reshaped:

            def size(shape: Any) -> str:
                return "x".join(map(str, shape)) or "scalar"

            parts.append(
                f"{len(reshaped)} have another shape, saved -> now ("
                + few(reshaped, lambda k: f"{k} {size(saved[k])} -> {size(model[k])}")
                + ")"
            )
        raise UserError(
            f"Checkpoint {info.path.name} of {info.path.parent.parent} holds another model "
            f"architecture than the one configured now: {'; '.join(parts)}. The model settings "
            "changed since the checkpoint was written (compare with the run's config.yaml). To "
            "train the new architecture, start a new run (without run.dir, or with run.dir set "
            "to a new folder); to continue this run, resume it with its own model settings."
        )

    # ==========================================================================================
    # storage and the summary of a run that fails early
    # ==========================================================================================

    def check_run_storage(self) -> None:
        """Refuse a run folder (or runs root) on a read-only mount or without write permission,
        before anything is launched, built or written.

        Raises:
            StorageError: naming the folder (exit code 1).
        """
        run = self.cfg.run
        if run.dir is not None and str(run.dir) != "latest":
            folder = Path(run.dir)
            if folder.is_dir() and any(folder.iterdir()):
                hint = (
                    "A run continues in its own folder: copy it to a writable file system and "
                    "resume the copy (train run.dir=COPY), or start a new run with run.root on "
                    "a writable disk."
                )
            else:
                hint = "Choose a run.dir on a writable file system."
            check_writable(folder, "the run folder", hint=hint)
        else:
            check_writable(
                Path(run.root),
                "the runs folder (run.root)",
                hint="Set run.root to a folder on a writable file system.",
            )

    def setup_failed(self, err: BaseException) -> None:
        """Record a failure during set-up (model, data loaders, optimizer, resume).

        A run this process started is marked ``failed``. An existing run that it only tried to
        continue keeps its ``summary.json`` as it was: a completed run stays completed when a
        resume attempt finds a damaged checkpoint or another architecture.
        """
        if self.run is None:
            return
        if self.run.created or not self._summary_read or self._summary_before is None:
            self.write_summary("failed", 0.0, error=f"{type(err).__name__}: {err}")
            return
        if self.fabric.global_rank == 0:
            path = self.run.path / "summary.json"
            tmp = path.with_name("summary.json.tmp")
            try:
                tmp.write_text(self._summary_before, encoding="utf-8")
                os.replace(tmp, path)
            except OSError as write_err:
                log.warning("Could not restore %s: %s", path, write_err)
            else:
                log.info("%s left as it was: the run was not continued.", path)

    # ==========================================================================================
    # the end
    # ==========================================================================================

    def interrupt(self, signal_name: str, seconds: float) -> FitResult:
        """Checkpoint at this step boundary, mark the run interrupted, requeue under SLURM."""
        self.save(metrics=self.metrics if self.metrics_step == self.progress.step else None)
        self.write_summary("interrupted", seconds, signal=signal_name)
        log.warning(
            "Stopped by %s at step %d (checkpoint written); resume with: train run.dir=%s",
            signal_name,
            self.progress.step,
            self.run.path,
        )
        if (
            signal_name == "SIGUSR1"
            and self.fabric.global_rank == 0
            and os.environ.get("SLURM_JOB_ID")
        ):
            requeue_slurm_job()
        return FitResult(
            "interrupted",
            self.run.path,
            self.progress.step,
            self.best_summary(),
            self.metrics,
            self.fabric.global_rank,
        )

    def finish(self, seconds: float) -> FitResult:
        """Last validation and checkpoint, export of the best (or last) model, summary and plot."""
        cfg = self.cfg
        if (
            cfg.trainer.val_at_end
            and self.val_loader is not None
            and self.metrics_step != self.progress.step
        ):
            self.val_loop()
        latest = self.checkpoints.latest()
        if latest is None or latest.step != self.progress.step:
            self.save(metrics=self.metrics if self.metrics_step == self.progress.step else None)
        checksums = self.replica_checksums()
        self.export_final()
        summary = self.write_summary("completed", seconds, rank_weight_sha256=checksums)
        if self.fabric.global_rank == 0:
            self.logger.write_csv()
            if cfg.logger.plot:
                self.plot()
        log.info(
            "Done: %s",
            json.dumps(
                {k: summary[k] for k in ("status", "global_step", "best", "final_dir")}, default=str
            ),
        )
        return FitResult(
            "completed",
            self.run.path,
            self.progress.step,
            self.best_summary(),
            self.metrics,
            self.fabric.global_rank,
        )

    def plot(self) -> None:
        """``curves.png`` of the finished run; a full or read-only disk costs only the picture
        (the run is complete and recorded: a warning, not a failed run)."""
        out = self.run.path / "curves.png"
        try:
            with storage_errors("the loss curves (curves.png)", out):
                plot_curves(self.logger.path, out, self.run.path.name)
        except StorageError as err:
            with contextlib.suppress(OSError):
                out.unlink(missing_ok=True)  # half a PNG is worse than none
            log.warning("%s The run itself is complete.", err)

    def replica_checksums(self) -> list[str] | None:
        """Each rank's weight checksum (data-parallel replicas must agree); None when sharded."""
        if is_sharded(self.fabric):
            return None
        sums = gather_objects(weights_checksum(self.model.module))
        if len(set(sums)) > 1:
            log.error("Model replicas differ across ranks after training: %s", sums)
        return sums

    def export_final(self) -> Path:
        """Load the best intact checkpoint's weights (if asked and known) and save the model to
        ``final/``.

        Raises:
            StorageError: ``final/`` could not be written (``final.tmp`` is removed, an earlier
                ``final/`` stays).
        """
        best = None
        if self.cfg.checkpoint.load_best_at_end:
            best = broadcast_object(on_rank_zero(self.fabric, self.checkpoints.best_intact))
        if best is not None and best.step != self.progress.step:
            log.info(
                "Loading the best checkpoint (%s=%.4f at step %d) for final/",
                self.cfg.checkpoint.monitor,
                best.metrics[self.cfg.checkpoint.monitor],
                best.step,
            )
            self.fabric.load(
                best.state_path,
                {"model": self.model},
                strict=not self.cfg.checkpoint.trainable_only,
                weights_only=False,
            )
        state_dict = full_state_dict(self.fabric, self.model)
        final = self.run.final

        def write() -> None:
            import shutil

            tmp = final.with_name("final.tmp")
            try:
                with storage_errors(
                    "the trained model (final/)",
                    tmp,
                    hint="Free space there (or move the run folder to a larger disk) and run "
                    f"the same command again: it resumes from the last checkpoint and writes "
                    f"{final.name}/.",
                ):
                    shutil.rmtree(tmp, ignore_errors=True)
                    tmp.mkdir(parents=True)
                    self.task.save_final(self.model.module, state_dict, tmp)
                    if final.exists():
                        shutil.rmtree(final)
                    os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)  # no half-written model stays behind
                raise
            log.info("Saved the trained model to %s", final)

        on_rank_zero(self.fabric, write)
        self.fabric.barrier()
        return final

    def best_summary(self) -> dict[str, Any] | None:
        """The best checkpoint as ``{"metric", "value", "step", "path"}``, or None."""
        best = self.checkpoints.best() if self.checkpoints else None
        if best is None:
            return None
        metric = self.cfg.checkpoint.monitor
        return {
            "metric": metric,
            "value": best.metrics[metric],
            "step": best.step,
            "path": str(best.path),
        }

    def write_summary(self, status: str, seconds: float, **extra: Any) -> dict[str, Any]:
        """Write ``summary.json`` (rank 0): status, step, best metric, wall time, throughput."""
        train_seconds = self.progress.train_seconds
        summary = {
            "status": status,
            "global_step": self.progress.step,
            "total_steps": self.total_steps,
            "epoch": self.epochs_done() if self.train_sampler is not None else 0.0,
            "best": self.best_summary(),
            "last_metrics": self.metrics,
            "wall_seconds": seconds,
            "train_seconds": train_seconds,
            "samples_per_sec": self.progress.samples / train_seconds if train_seconds > 0 else None,
            "tokens_per_sec": self.progress.tokens / train_seconds if train_seconds > 0 else None,
            "samples_seen": self.progress.samples,
            "tokens_seen": self.progress.tokens,
            "skipped_steps": self.progress.skipped_steps,
            "parameters": self.param_counts,
            "final_dir": str(self.run.final) if self.run and status == "completed" else None,
            **extra,
        }
        if self.run is not None and self.fabric.global_rank == 0:
            path = self.run.path / "summary.json"
            if not self._summary_read:  # what an existing run's summary said before this process
                self._summary_read = True
                with contextlib.suppress(OSError, UnicodeDecodeError):
                    self._summary_before = path.read_text(encoding="utf-8")
            text = json.dumps(summary, indent=1, default=str)
            try:
                _write_summary_file(path, text)
            except StorageError as err:
                if status != "failed":
                    raise
                # Recording the failure must not hide the fault that caused it.
                log.warning("Could not record the failure in %s: %s", path, err)
        return summary


def _canonical_name(name: str) -> str:
    """A tensor name without the prefixes of wrappers (activation checkpointing, compile)."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def _checkpoint_data_hashes(info: CheckpointInfo) -> dict[str, str | None] | None:
    """``{absolute path: sha256}`` of the data a checkpoint was trained on: from its
    ``meta.json``, else from its run's ``manifest.json``; None when neither records them."""
    recorded = info.meta.get("data_files")
    if isinstance(recorded, dict):
        return recorded
    manifest = info.path.parent.parent / "manifest.json"
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    base = Path(data.get("cwd") or ".")
    files = data.get("data_files")
    if not isinstance(files, dict):
        return None
    return {
        str(base / path if not Path(path).is_absolute() else Path(path)): (
            entry.get("sha256") if isinstance(entry, dict) else None
        )
        for path, entry in files.items()
    }


def _write_summary_file(path: Path, text: str) -> None:
    """Replace ``summary.json`` atomically; on a full disk (the temporary copy does not fit)
    overwrite it in place, which needs no new blocks for a summary of about the same size.

    Raises:
        StorageError: neither worked.
    """
    tmp = path.with_name("summary.json.tmp")
    try:
        with storage_errors("the run summary", path):
            try:
                tmp.write_text(text, encoding="utf-8")
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
    except StorageError:
        if not path.is_file():
            raise
        with storage_errors("the run summary", path):
            with open(path, "r+", encoding="utf-8") as handle:
                handle.truncate(0)
                handle.write(text)


def weights_checksum(model: nn.Module) -> str:
    """sha256 over every parameter's bytes, in name order (to compare replicas across ranks)."""
    import hashlib

    from torch.distributed.tensor import DTensor

    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        tensor = param.detach()
        if isinstance(tensor, DTensor):  # FSDP2 on one process: the shard is the whole tensor
            tensor = tensor.full_tensor()
        digest.update(name.encode())
        digest.update(tensor.float().cpu().numpy().tobytes())
    return digest.hexdigest()


def full_state_dict(fabric: Fabric, model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on the CPU (gathered from the shards under FSDP2).

    Call on every rank; under FSDP2 the result is only complete on rank 0.
    """
    if is_fsdp2(fabric.strategy):
        return gather_full_state_dict(model.module if hasattr(model, "module") else model)
    module = model.module if hasattr(model, "module") else model
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}
