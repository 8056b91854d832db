"""TrainState: what a :class:`core.engine.trainer.Trainer` run learns and where it stands.

The model (built on the device, wrapped by Fabric), optimizer and schedule, the progress
counters, and their round trip through checkpoints:

- :meth:`TrainState.build_model` / :meth:`TrainState.build_optimizer`;
- :meth:`TrainState.optimizer_step`: clip, then update, or refuse a non-finite loss or gradient
  norm (``trainer.on_nonfinite``: ``stop`` raises, ``skip`` leaves the weights as they were);
- :meth:`TrainState.save` / :meth:`TrainState.load` / :meth:`TrainState.resume`;
- :meth:`TrainState.export_final` (the best or last weights into ``final/``) and
  :meth:`TrainState.replica_checksums` (data-parallel replicas must agree).

**Exact resume**: a checkpoint holds model (or only trainable parameters), optimizer,
scheduler, step / epoch / batch counters, every rank's RNG states and the running loss sums of
the current logging interval. Data order is a pure function of (seed, epoch), so a resumed run
skips consumed batches by index. On the CPU with ``trainer.deterministic=true`` a run stopped at
step k and resumed ends with bit-identical weights and the same logged losses.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric import Fabric
from torch import nn

from core.config.schema import TrainConfig
from core.errors import ConfigError, FaultError, UserError
from core.nn.debug import ShapeLogger
from core.nn.optim import build_optimizer, build_scheduler
from core.parallel.checkpoint import (
    CheckpointCorrupt,
    CheckpointInfo,
    checkpoint_shapes,
    on_rank_zero,
    read_checkpoint,
    verify_checkpoint,
)
from core.parallel.collectives import broadcast_object, gather_objects
from core.parallel.fsdp import full_state_dict as gather_full_state_dict
from core.parallel.fsdp import is_fsdp2
from core.parallel.seeding import rng_state, set_rng_state
from core.parallel.strategy import is_sharded
from core.run.manifest import data_file_sha256
from core.run.storage import storage_errors
from core.task.base import Task

if TYPE_CHECKING:
    from core.engine.record import RunRecord

# The Trainer's log lines keep their logger name (``core.engine.trainer``) wherever they are
# written.
log = logging.getLogger("core.engine.trainer")

# trainer.on_nonfinite=skip: this many skipped steps in a row stop the run as ``stop`` would
# (the weights no longer produce finite values; skipping more only burns the allocation).
MAX_SKIPS_IN_A_ROW = 5


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


class TrainState:
    """Model, optimizer, schedule and progress of a run, and their checkpoints.

    Args:
        cfg: the task's root config.
        task: the task (model, parameter groups, final export).
        fabric: the launched Fabric.
        precision: the resolved precision.
        progress: the run's counters (saved in every checkpoint).
        record: the run record (its run folder, checkpoint manager and metrics logger).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        task: Task,
        fabric: Fabric,
        precision: str,
        progress: Progress,
        record: RunRecord,
    ) -> None:
        self.cfg = cfg
        self.task = task
        self.fabric = fabric
        self.precision = precision
        self.progress = progress
        self.record = record
        self.deepspeed = cfg.trainer.strategy.startswith("deepspeed")
        # Set by build_model() and build_optimizer().
        self.module: nn.Module | None = None  # the task's model, unwrapped
        self.model: Any = None  # the same, set up by Fabric (DDP / FSDP2 / DeepSpeed)
        self.param_counts: dict[str, int] | None = None
        self.trainable_names: list[str] = []
        self.flops_per_token: float | None = None
        self.shape_logger: ShapeLogger | None = None
        self.optimizer: Any = None
        self.scheduler: Any = None
        # Set by each optimizer step: the learning rates it used (one per parameter group),
        # whether it was skipped for a non-finite value, and how many were skipped in a row.
        self.step_lrs: list[float] = []
        self.step_skipped = False
        self.skips_in_a_row = 0

    def build_model(self) -> None:
        """Build the model on the device (``fabric.init_module``), add shape hooks if asked, wrap
        it; the run record notes the parameter counts (its summary says them, also when the
        set-up fails later)."""
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
        self.param_counts = self.record.parameters = {"total": total, "trainable": trainable}
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
        wrap the model (see ``core.nn.acceleration``)."""
        from core.nn.acceleration import compile_blocks
        from core.parallel.fsdp import resolve_wrap_classes

        if self.cfg.trainer.strategy == "fsdp":
            return  # core.parallel.fsdp.parallelize compiles the units, after activation
            # checkpointing
        classes = resolve_wrap_classes(self.cfg.fsdp.auto_wrap, self.task.fsdp_wrap_classes())
        try:
            count = compile_blocks(module, classes)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        log.info("trainer.compile: %d blocks compiled (dynamic shapes)", count)

    def build_optimizer(self, total_steps: int) -> None:
        """Optimizer over the task's parameter groups, and the warmup + decay schedule over
        ``total_steps`` optimizer steps."""
        fabric = self.fabric
        groups = self.task.parameter_groups(self.module if self.deepspeed else self.model.module)
        optimizer = build_optimizer(groups, self.cfg.optim, fabric.device.type)
        if self.deepspeed:
            self.model, self.optimizer = fabric.setup(self.module, optimizer)
        else:
            self.optimizer = fabric.setup_optimizers(optimizer)
        self.scheduler = build_scheduler(optimizer, self.cfg.optim, total_steps)

    def optimizer_step(
        self, loss_sum: torch.Tensor, loss_tokens: torch.Tensor
    ) -> torch.Tensor | None:
        """Clip the gradients of the window just run backward, then update the weights, or skip
        the update for a non-finite loss or gradient norm (``self.step_skipped``); zero the
        gradients and advance the schedule either way.

        Args:
            loss_sum, loss_tokens: this rank's summed token loss and token count of the step.

        Returns:
            The gradient norm before clipping, or None (no ``trainer.gradient_clip_val``).

        Raises:
            FaultError: a non-finite value with ``trainer.on_nonfinite=stop``, or too many skipped
            steps in a row; the weights are not updated with it.
        """
        fabric = self.fabric
        self.step_skipped = False
        grad_norm = norm = None
        clip = self.cfg.trainer.gradient_clip_val
        if clip is not None or not self.deepspeed:
            # Without clipping the norm is still needed for the non-finite check: max_norm=inf
            # scales the gradients by exactly 1.
            norm = fabric.clip_gradients(
                self.model,
                self.optimizer,
                max_norm=clip if clip is not None else math.inf,
                error_if_nonfinite=False,
            )
            grad_norm = norm if clip is not None else None
        nonfinite = self.find_nonfinite(loss_sum, loss_tokens, norm)
        if nonfinite is None:
            self.skips_in_a_row = 0
            self.optimizer.step()
        else:
            self.skips_in_a_row += 1
            if self.cfg.trainer.on_nonfinite == "stop" or self.skips_in_a_row >= MAX_SKIPS_IN_A_ROW:
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
        return grad_norm

    def find_nonfinite(
        self, loss_sum: torch.Tensor, loss_tokens: torch.Tensor, grad_norm: torch.Tensor | None
    ) -> str | None:
        """Whether this step's loss or gradient norm is NaN / inf, the same answer on every rank.

        One host sync per step; a collective only where gradients cannot carry the answer
        (16-mixed, DeepSpeed: see ``Trainer.training_step``) and, on every rank at once, when
        something was found (for the global loss in the message).

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
        checkpoints = self.record.checkpoints
        latest = checkpoints.latest() if checkpoints is not None else None
        if latest is not None:
            where = (
                f" The last good checkpoint is {latest.path} (step {latest.step}); continue "
                f"from it with a lower learning rate: train run.dir={self.record.run.path} {lower}"
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

    def checkpoint_state(self) -> dict[str, Any]:
        """The state a checkpoint holds (objects with ``state_dict`` are converted by Fabric); the
        progress counters hold the logging interval's loss sums (see
        :meth:`core.engine.meter.Meter.fold_interval`, called first)."""
        return {
            "model": self.model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "progress": self.progress.state_dict(),
            "rng": gather_objects(rng_state()),
            "trainable_names": self.trainable_names if self.cfg.checkpoint.trainable_only else None,
        }

    def save(self, metrics: dict[str, float] | None = None) -> Path:
        """Write a checkpoint of the current step (all ranks; after
        :meth:`core.engine.meter.Meter.fold_interval`).

        Args:
            metrics: validation metrics of this step (for best-k), or None.
        """
        keep = set(self.trainable_names)
        filter_ = (
            {"model": lambda name, _: name in keep} if self.cfg.checkpoint.trainable_only else None
        )
        path = self.record.checkpoints.save(
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

    def resume(self) -> None:
        """Load a checkpoint if ``trainer.resume`` asks for one (``auto``: the run folder's
        newest intact one).

        Raises:
            CheckpointCorrupt: no intact checkpoint to continue from (exit 1).
            UserError: the data files or the model changed since the checkpoint (exit 2).
        """
        choice = self.cfg.trainer.resume
        if choice is None or str(choice).lower() in ("none", "false", "no", ""):
            existing = self.record.checkpoints.latest()
            if existing is not None:
                raise UserError(
                    f"Run folder {self.record.run.path} already has checkpoints (newest: "
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
        dropped = self.record.logger.truncate_after(self.progress.step)
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
            checkpoints = self.record.checkpoints
            info, skipped = checkpoints.newest_intact()
            if info is None and skipped:
                listing = "; ".join(f"{path.name}: {problem}" for path, problem in skipped)
                raise CheckpointCorrupt(
                    f"No intact checkpoint to resume from in {checkpoints.root}: {listing}. "
                    "The damaged checkpoints are left there for inspection; to train anyway, "
                    "start a new run (without run.dir)."
                )
            if info is None:
                return None
            if skipped:
                # The run continues from an older step and writes the newer steps anew; the
                # damaged folders are kept for inspection under another name.
                moved = [checkpoints.set_aside(path).name for path, _ in skipped]
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
        if recorded != now and _moved(recorded, now):
            log.info(
                "The data files are at another place than when checkpoint %s was written, with "
                "the same contents (a new checkout or environment): resuming.",
                info.path.name,
            )
            return
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
            best = broadcast_object(on_rank_zero(self.fabric, self.record.checkpoints.best_intact))
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
        final = self.record.run.final

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


def _canonical_name(name: str) -> str:
    """A tensor name without the prefixes of wrappers (activation checkpointing, compile)."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def _moved(recorded: dict[str, str | None], now: dict[str, str | None]) -> bool:
    """Whether the data files only moved: the same contents, file for file (a run resumed from
    another checkout, or a task package installed into a job's own environment)."""
    before, after = list(recorded.values()), list(now.values())
    return None not in before and len(before) == len(after) and sorted(before) == sorted(after)


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


if __name__ == "__main__":
    # Self-check: a toy run on one CPU process builds its model and optimizer, takes one
    # optimizer step, saves a checkpoint; after another step, loading it restores the weights
    # (same checksum) and the counters.
    import tempfile

    from core.config.loader import load_config
    from core.engine.batches import Batches
    from core.engine.record import RunRecord
    from core.testing.toy import ToyConfig, ToyTask

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ToyConfig, overrides=[f"run.root={tmp}", "trainer.accelerator=cpu"])
        task = ToyTask(cfg)
        task.setup()
        fabric, progress = Fabric(accelerator="cpu", devices=1), Progress()
        batches = Batches(cfg, task, fabric, progress)
        record = RunRecord(cfg, task, fabric, ["self-check"], "32-true", progress, batches)
        state = TrainState(cfg, task, fabric, "32-true", progress, record)
        with record.lock_scope():
            record.open_run()
            state.build_model()
            counts = record.parameters
            state.build_optimizer(total_steps=4)

            def step() -> None:
                batch = task.collate([task.train[i] for i in range(4)])
                out = task.training_step(state.model, batch)
                fabric.backward(out.loss_sum / out.num_tokens, model=state.model)
                state.optimizer_step(out.loss_sum.detach(), torch.as_tensor(out.num_tokens))
                progress.step += 1

            step()
            saved = weights_checksum(state.module)
            path = state.save()
            step()
            assert weights_checksum(state.module) != saved and progress.step == 2
            state.load(read_checkpoint(path))
            record.logger.close()
        assert weights_checksum(state.module) == saved and progress.step == 1
        assert counts["trainable"] == counts["total"] > 0 and not state.step_skipped
        assert set(full_state_dict(fabric, state.model)) == set(state.module.state_dict())
        print("core.engine.state: ok", path.name, counts, saved[:12])
