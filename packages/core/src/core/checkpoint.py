"""Atomic checkpoints with keep-last-k and best-k retention.

Layout: ``<run>/checkpoints/step-0000100/`` holds ``state`` (written by ``fabric.save``: one file
for single-device / DDP, a folder of shards for FSDP) and ``meta.json`` (step, metrics, time).

Atomicity: a checkpoint is written into ``.tmp-step-0000100/``, flushed to disk, and then
renamed to ``step-0000100/`` — a rename is atomic, so a kill at any moment leaves either the
complete new checkpoint or none, and the previous checkpoints untouched. Only folders named
``step-*`` with a ``meta.json`` count as complete; leftover ``.tmp-*`` folders are removed at the
next save.

Self-check: ``python -m core.checkpoint``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import UserError
from core.settings import CheckpointConfig

log = logging.getLogger(__name__)

CKPT_PATTERN = re.compile(r"^step-(\d+)$")
STATE_NAME = "state"
META_NAME = "meta.json"


@dataclass
class CheckpointInfo:
    """A complete checkpoint on disk.

    Attributes:
        path: the ``step-*`` folder.
        step: optimizer step it was saved at.
        metrics: validation metrics of that step (may be empty).
    """

    path: Path
    step: int
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def state_path(self) -> Path:
        """What ``fabric.load`` reads."""
        return self.path / STATE_NAME


def _fsync_tree(path: Path) -> None:
    """Flush every file below ``path`` and the folders themselves to disk."""
    for folder, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(folder))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_checkpoint(path: Path) -> CheckpointInfo:
    """Describe the checkpoint folder ``path`` (a ``step-*`` folder with ``meta.json``).

    Raises:
        UserError: not a complete checkpoint.
    """
    path = Path(path)
    meta = path / META_NAME
    if not meta.is_file() or not (path / STATE_NAME).exists():
        raise UserError(
            f"'{path}' is not a complete checkpoint: expected a 'step-NNNNNNN' folder with "
            f"'{STATE_NAME}' and '{META_NAME}' (see <run>/checkpoints/)."
        )
    data = json.loads(meta.read_text(encoding="utf-8"))
    return CheckpointInfo(path=path, step=int(data["step"]), metrics=data.get("metrics") or {})


class CheckpointManager:
    """Saves, finds and prunes the checkpoints of one run.

    Args:
        root: ``<run>/checkpoints``.
        cfg: the ``checkpoint`` config group.
    """

    def __init__(self, root: Path, cfg: CheckpointConfig) -> None:
        self.root = Path(root)
        self.cfg = cfg

    # -- finding -------------------------------------------------------------------------------

    def list(self) -> list[CheckpointInfo]:
        """Complete checkpoints, oldest step first."""
        found = []
        if self.root.is_dir():
            for entry in self.root.iterdir():
                if CKPT_PATTERN.match(entry.name) and (entry / META_NAME).is_file():
                    found.append(read_checkpoint(entry))
        return sorted(found, key=lambda c: c.step)

    def latest(self) -> CheckpointInfo | None:
        """The complete checkpoint with the highest step."""
        found = self.list()
        return found[-1] if found else None

    def _score(self, info: CheckpointInfo) -> float | None:
        value = info.metrics.get(self.cfg.monitor) if self.cfg.monitor else None
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        return float(value)

    def ranked(self) -> list[CheckpointInfo]:
        """Checkpoints with a finite monitored metric, best first (ties: earlier step first)."""
        scored = [c for c in self.list() if self._score(c) is not None]
        sign = 1.0 if self.cfg.mode == "min" else -1.0
        return sorted(scored, key=lambda c: (sign * self._score(c), c.step))

    def best(self) -> CheckpointInfo | None:
        """The best checkpoint by ``checkpoint.monitor`` / ``checkpoint.mode``, if any has the
        metric."""
        ranked = self.ranked()
        return ranked[0] if ranked else None

    # -- saving --------------------------------------------------------------------------------

    def save(
        self,
        fabric: Any,
        state: dict[str, Any],
        step: int,
        metrics: dict[str, Any] | None = None,
        filter: dict[str, Callable[[str, Any], bool]] | None = None,
    ) -> Path:
        """Write a checkpoint atomically (call on every rank), then prune old ones.

        Args:
            fabric: the Fabric object (``fabric.save`` decides which ranks write).
            state: ``{"model": ..., "optimizer": ..., ...}`` as for ``fabric.save``.
            step: the optimizer step.
            metrics: validation metrics of this step, stored in ``meta.json`` for best-k.
            filter: ``fabric.save`` filter, e.g. only trainable parameters.

        Returns:
            The final ``step-*`` folder.
        """
        final = self.root / f"step-{step:07d}"
        tmp = self.root / f".tmp-step-{step:07d}"
        if fabric.global_rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        fabric.barrier()
        fabric.save(tmp / STATE_NAME, state, filter=filter)  # ends with a barrier
        if fabric.global_rank == 0:
            meta = {
                "step": step,
                "metrics": metrics or {},
                "time": time.time(),
                "world_size": fabric.world_size,
            }
            (tmp / META_NAME).write_text(json.dumps(meta, indent=1), encoding="utf-8")
            _fsync_tree(tmp)
            if final.exists():  # the same step saved again (e.g. after a resume): replace it
                old = self.root / f".old-step-{step:07d}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync_dir(self.root)
            self.prune()
        fabric.barrier()
        return final

    def prune(self) -> list[Path]:
        """Delete checkpoints outside keep-last-k and best-k (the newest one always stays).

        Returns:
            The deleted folders.
        """
        found = self.list()
        if not found:
            return []
        keep = {c.path for c in found[-max(1, self.cfg.keep_last) :]}
        keep |= {c.path for c in self.ranked()[: self.cfg.keep_best]}
        removed = []
        for info in found:
            if info.path not in keep:
                # Rename first so a kill mid-delete never leaves a half-deleted "complete"
                # checkpoint.
                doomed = self.root / f".tmp-delete-{info.path.name}"
                os.replace(info.path, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
                removed.append(info.path)
        if removed:
            log.info("Removed old checkpoints: %s", ", ".join(p.name for p in removed))
        return removed


if __name__ == "__main__":  # self-check: python -m core.checkpoint
    import tempfile

    import torch
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1)
    model = torch.nn.Linear(2, 2)
    with tempfile.TemporaryDirectory() as tmp:
        manager = CheckpointManager(
            Path(tmp), CheckpointConfig(keep_last=2, keep_best=1, monitor="val/loss")
        )
        for step, loss in [(1, 0.5), (2, 0.9), (3, 0.8), (4, 0.7)]:
            manager.save(fabric, {"model": model, "step": step}, step, {"val/loss": loss})
        kept = [c.step for c in manager.list()]
        assert kept == [1, 3, 4], kept
        assert manager.best().step == 1 and manager.latest().step == 4
        print("kept steps", kept, "best", manager.best().step)
    print("core.checkpoint: ok")
