"""RunRecord: the run folder of a :class:`core.engine.trainer.Trainer` run and what it says.

- before anything is launched: the run folder (or runs root) must be writable and not locked by
  another live process (:func:`check_run_folder`);
- :meth:`RunRecord.open_run`: rank 0 chooses and locks the folder, every rank learns it;
  ``config.yaml`` and ``manifest.json`` are written (kept on a resume, with a timestamped copy
  when they changed), the metrics logger and the checkpoint manager opened;
- ``summary.json``: ``running`` at the start, then ``completed`` / ``interrupted`` / ``failed``
  (a run that only tried to continue an existing folder and failed during set-up leaves the
  summary as it was), with the best checkpoint (:meth:`RunRecord.best_summary`);
- the one-paragraph error when a peer rank is gone, naming the newest checkpoint;
- at the end, ``metrics.csv`` and ``curves.png``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric import Fabric

from core.config.loader import to_dict, to_yaml
from core.config.schema import RunConfig, TrainConfig
from core.errors import FaultError, UserError
from core.parallel.checkpoint import CheckpointManager
from core.parallel.collectives import broadcast_object, gather_objects
from core.run.folder import RunDir, RunLock, check_not_locked, check_run_dir, resolve_run_dir
from core.run.logs import MetricsLogger, setup_logging
from core.run.manifest import build_manifest
from core.run.plots import plot_curves
from core.run.storage import StorageError, check_writable, storage_errors
from core.task.base import Task

if TYPE_CHECKING:
    from core.engine.batches import Batches
    from core.engine.state import Progress

# The Trainer's log lines keep their logger name (``core.engine.trainer``) wherever they are
# written.
log = logging.getLogger("core.engine.trainer")

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
class FitResult:
    """What :meth:`core.engine.trainer.Trainer.fit` returns.

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


def check_run_folder(cfg: TrainConfig, task_name: str) -> None:
    """Refuse, before anything is launched, built or written: a ``run.dir`` of another task or
    one that another live process trains, and a run folder (or runs root) that is not writable.

    Raises:
        UserError: the folder belongs to another task, or is locked by a live process.
        StorageError: the folder is on a read-only mount or without write permission (exit 1).
    """
    if cfg.run.dir is not None and str(cfg.run.dir) != "latest":
        check_run_dir(Path(cfg.run.dir), task_name)
        check_not_locked(Path(cfg.run.dir))  # a run another process trains: refused now
    check_run_storage(cfg.run)


def check_run_storage(run: RunConfig) -> None:
    """Refuse a run folder (or runs root) on a read-only mount or without write permission,
    before anything is launched, built or written.

    Raises:
        StorageError: naming the folder (exit code 1).
    """
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


class RunRecord:
    """The run folder and its records: lock, config, manifest, metrics logger, checkpoints,
    summary, best checkpoint, curves.

    Args:
        cfg: the task's root config.
        task: the task (name, data files, manifest entries).
        fabric: the launched Fabric (rank 0 writes, every rank learns the folder).
        argv: the command line to record.
        precision: the resolved precision (``config.yaml`` records it instead of ``auto``).
        progress: the run's counters (the summary's step and throughput).
        batches: the data side (the summary's total steps and epoch).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        task: Task,
        fabric: Fabric,
        argv: list[str],
        precision: str,
        progress: Progress,
        batches: Batches,
    ) -> None:
        self.cfg = cfg
        self.task = task
        self.fabric = fabric
        self.argv = argv
        self.precision = precision
        self.progress = progress
        self.batches = batches
        # Set by open_run().
        self.run: RunDir | None = None
        self.run_lock: RunLock | None = None  # rank 0's lock (core.run.folder.RunLock)
        self.resolved_config: dict[str, Any] = {}
        self.logger: MetricsLogger | None = None
        self.checkpoints: CheckpointManager | None = None
        # {"total", "trainable"} parameter counts, once the model is built.
        self.parameters: dict[str, int] | None = None
        # summary.json as it was before this process wrote "running" into an existing run
        # folder (restored when the run fails before it was really continued; see setup_failed).
        self._summary_before: str | None = None
        self._summary_read = False

    @contextlib.contextmanager
    def lock_scope(self) -> Iterator[None]:
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
        # Every rank's host (a collective: all ranks): the nodes the run really spans.
        hosts = gather_objects(socket.gethostname())
        if fabric.global_rank == 0:
            self.write_config_and_manifest(hosts)
        self.logger = MetricsLogger(
            self.run.path,
            cfg.logger,
            self.resolved_config,
            self.run.path.name,
            enabled=fabric.global_rank == 0,
        )
        self.write_summary("running", 0.0, {})

    def write_config_and_manifest(self, hosts: list[str]) -> None:
        """Rank 0: ``config.yaml`` (as resolved) and ``manifest.json`` (seed, data hashes,
        command, environment, nodes, task entries), each kept when it exists (see
        :meth:`_write_once`). ``hosts``: the hostname of each rank, in rank order."""
        cfg, fabric = self.cfg, self.fabric
        nodes = list(dict.fromkeys(hosts))
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
                "nodes": len(nodes),
                "ranks_per_node": fabric.world_size // len(nodes),
                "node_names": nodes,
                "strategy": type(fabric.strategy).__name__,
                "precision": self.precision,
                "run_dir": str(self.run.path),
                "run_dir_reason": self.run.reason,
                **entries,
            },
        )
        self._write_once("manifest.json", json.dumps(manifest, indent=1, default=str))

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

    def setup_failed(self, err: BaseException) -> None:
        """Record a failure during set-up (model, data loaders, optimizer, resume).

        A run this process started is marked ``failed``. An existing run that it only tried to
        continue keeps its ``summary.json`` as it was: a completed run stays completed when a
        resume attempt finds a damaged checkpoint or another architecture.
        """
        if self.run is None:
            return
        if self.run.created or not self._summary_read or self._summary_before is None:
            self.write_summary("failed", 0.0, {}, error=f"{type(err).__name__}: {err}")
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

    def peer_lost_fault(self, err: RuntimeError) -> FaultError | None:
        """The one-paragraph error for a collective that failed because a peer rank is gone or
        did not answer within ``trainer.dist_timeout``; None for any other error.

        On rank 0 of a local launch it also ends the ranks it launched (see
        :func:`core.parallel.strategy.release_child_ranks`), which names the rank that died.
        """
        from core.parallel.strategy import (
            LaunchedRankEnded,
            release_child_ranks,
            stand_down_rank_watch,
        )

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
        step, total = self.progress.step, self.batches.total_steps
        latest = self.checkpoints.latest() if self.checkpoints is not None else None
        where = (
            f"The newest checkpoint is {latest.path} (step {latest.step}); resume with: train "
            f"run.dir={self.run.path}"
            if latest is not None and self.run is not None
            else "No checkpoint was written yet"
        )
        return FaultError(
            f"Rank {me} stopped at step {step} of {total}: {what}. The "
            f"other ranks stop too and the run is marked failed; the log of {who} (or the job's "
            f"output) says why it ended. {where}."
        )

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

    def write_summary(
        self, status: str, seconds: float, metrics: dict[str, float], **extra: Any
    ) -> dict[str, Any]:
        """Write ``summary.json`` (rank 0): status, step, best metric, the last validation
        ``metrics``, wall time, throughput; ``extra`` keys are added at the end."""
        train_seconds = self.progress.train_seconds
        summary = {
            "status": status,
            "global_step": self.progress.step,
            "total_steps": self.batches.total_steps,
            "epoch": self.batches.epochs_done() if self.batches.train_sampler is not None else 0.0,
            "best": self.best_summary(),
            "last_metrics": metrics,
            "wall_seconds": seconds,
            "train_seconds": train_seconds,
            "samples_per_sec": self.progress.samples / train_seconds if train_seconds > 0 else None,
            "tokens_per_sec": self.progress.tokens / train_seconds if train_seconds > 0 else None,
            "samples_seen": self.progress.samples,
            "tokens_seen": self.progress.tokens,
            "skipped_steps": self.progress.skipped_steps,
            "parameters": self.parameters,
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

    def write_curves(self) -> None:
        """Rank 0, at the end of a completed run: ``metrics.csv``, and ``curves.png`` when
        ``logger.plot`` is on."""
        if self.fabric.global_rank == 0:
            self.logger.write_csv()
            if self.cfg.logger.plot:
                self.plot()

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

    def result(self, status: str, metrics: dict[str, float]) -> FitResult:
        """The :class:`FitResult` of the run as it stands: ``status``, the last validation
        ``metrics``."""
        return FitResult(
            status,
            self.run.path,
            self.progress.step,
            self.best_summary(),
            metrics,
            self.fabric.global_rank,
        )


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


if __name__ == "__main__":
    # Self-check: open a toy run's folder on one CPU process, check its files, finish it.
    import tempfile

    from core.config.loader import load_config
    from core.engine.batches import Batches
    from core.engine.state import Progress
    from core.testing.toy import ToyConfig, ToyTask

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ToyConfig, overrides=[f"run.root={tmp}", "trainer.accelerator=cpu"])
        check_run_folder(cfg, "toy")
        task = ToyTask(cfg)
        task.setup()
        fabric, progress = Fabric(accelerator="cpu", devices=1), Progress()
        batches = Batches(cfg, task, fabric, progress)
        record = RunRecord(cfg, task, fabric, ["self-check"], "32-true", progress, batches)
        with record.lock_scope():
            record.open_run()
            folder = record.run.path
            assert record.run_lock is not None and record.checkpoints is not None
            assert {"config.yaml", "manifest.json", "summary.json"} <= {
                p.name for p in folder.iterdir()
            }
            running = json.loads((folder / "summary.json").read_text())
            assert running["status"] == "running" and running["global_step"] == 0, running
            progress.step = 3
            record.write_summary("completed", 1.5, {"val/loss": 2.0}, rank_weight_sha256=None)
            record.logger.close()
        assert record.run_lock is None  # released by lock_scope
        done = json.loads((folder / "summary.json").read_text())
        assert done["status"] == "completed" and done["global_step"] == 3, done
        assert done["last_metrics"] == {"val/loss": 2.0} and "rank_weight_sha256" in done
        assert record.result("completed", {}).run_dir == folder
        print("core.engine.record: ok", folder.name, sorted(done))
