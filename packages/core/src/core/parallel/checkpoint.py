"""Atomic, verified checkpoints with keep-last-k and best-k retention.

Layout: ``<run>/checkpoints/step-0000100/`` holds ``state`` (written by ``fabric.save``: one file
for single-device / DDP, a folder of shards for FSDP) and ``meta.json`` (step, metrics, time and
the manifest: every file of the checkpoint with its size and sha256).

Atomicity: a checkpoint is written into ``.tmp-step-0000100/`` *next to* its destination (same
file system; :class:`DirectCheckpointIO` writes ``state`` straight into it instead of staging it
under ``$TMPDIR`` as Fabric's own plugin does), flushed to disk, and then renamed to
``step-0000100/`` — a rename is atomic, so a kill at any moment leaves either the complete new
checkpoint or none, and the previous checkpoints untouched. ``meta.json`` is written last. Only
folders named ``step-*`` with a readable ``meta.json`` whose files are all present at their
recorded sizes count (:meth:`CheckpointManager.list`); resume also compares every sha256
(:func:`verify_checkpoint`) and falls back to the newest intact checkpoint. Checkpoints from
before the manifest (no ``files`` in ``meta.json``) still load, unverified. Leftover ``.tmp-*``
folders are removed at the next save.

Storage: before a save the free space is checked against the previous checkpoint's size (or the
bytes of the state's tensors); a full or read-only disk ends the save with a
:class:`core.run.storage.StorageError` naming the path and the space, on every rank, and the partial
folder is removed.

Hashing costs about 0.1 s per 100 MB (sha256 with CPU support); the single file of single-device
and DDP checkpoints is hashed while it is written, the shards of FSDP2 checkpoints after, shared
out over the ranks.

Self-check: ``python -m core.parallel.checkpoint``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from core.config.schema import CheckpointConfig
from core.errors import FaultError, UserError
from core.run.manifest import sha256_file
from core.run.storage import StorageError, check_free_space, storage_errors, tree_bytes

log = logging.getLogger(__name__)

CKPT_PATTERN = re.compile(r"^step-(\d+)$")
STATE_NAME = "state"
META_NAME = "meta.json"
CHECKPOINT_FORMAT = 2
"""``meta.json`` format: 2 carries ``files`` (the manifest); 1 (no ``format`` key) did not."""

# Files written (and hashed while being written) by this process: absolute path -> (bytes,
# sha256). CheckpointManager.save takes the entries of its checkpoint; the rest it hashes after.
_WRITTEN: dict[str, tuple[int, str]] = {}
# While CheckpointManager.save runs fabric.save: write errors are collected here instead of
# raised, so that rank 0 does not leave the other ranks waiting in fabric.save's barrier.
_DEFERRED: list[BaseException] | None = None


class CheckpointCorrupt(FaultError):
    """A checkpoint that is incomplete or damaged; the message names the bad file."""


@dataclass
class CheckpointInfo:
    """A complete checkpoint on disk.

    Attributes:
        path: the ``step-*`` folder.
        step: optimizer step it was saved at.
        metrics: validation metrics of that step (may be empty).
        files: the manifest, ``{relative path: {"bytes", "sha256"}}``; None for a checkpoint
            written before checkpoints carried one.
        meta: everything ``meta.json`` holds.
    """

    path: Path
    step: int
    metrics: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def state_path(self) -> Path:
        """What ``fabric.load`` reads."""
        return self.path / STATE_NAME


class _HashingWriter:
    """A write-only file object that hashes and counts what passes through it."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        self.digest.update(data)
        self.size += len(memoryview(data).cast("B"))
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def write_torch_file(obj: Any, path: Path) -> tuple[int, str]:
    """``torch.save`` straight into ``path`` (no temp file elsewhere), hashed while written and
    flushed to disk; a failed write removes the partial file.

    Returns:
        ``(bytes, sha256)``; also remembered for the manifest of the checkpoint being saved.
    """
    path = Path(path)
    try:
        with open(path, "wb") as handle:
            writer = _HashingWriter(handle)
            torch.save(obj, writer)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    _WRITTEN[str(path.absolute())] = (writer.size, writer.digest.hexdigest())
    return _WRITTEN[str(path.absolute())]


class DirectCheckpointIO(TorchCheckpointIO):
    """Fabric's checkpoint plugin, writing where it is told to.

    Fabric's ``TorchCheckpointIO`` serialises the whole state into memory, writes it to a file
    under ``$TMPDIR`` (an fsspec transaction) and moves it: a small node-local ``/tmp`` fails
    the checkpoint however large the run root is, and a move across file systems is a copy, not
    atomic. This plugin writes the file in place (the checkpoint's own ``.tmp-step-*`` folder,
    whose rename is the atomic step), hashes it while writing and fsyncs it. Used for the
    single-device and DDP strategies (:func:`core.parallel.strategy.build_fabric`); FSDP2 writes its
    shards in place itself.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` to ``path`` (its folder is created)."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_torch_file(checkpoint, path)
        except Exception as err:
            if _DEFERRED is None:
                raise
            _DEFERRED.append(err)


@contextmanager
def _deferred_write_errors() -> Iterator[list[BaseException]]:
    global _DEFERRED
    _DEFERRED = errors = []
    try:
        yield errors
    finally:
        _DEFERRED = None


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


def _files_below(path: Path) -> list[str]:
    """Relative POSIX paths of the files below ``path`` (``path`` itself if it is a file)."""
    if path.is_file():
        return [path.name]
    return sorted(
        Path(folder, name).relative_to(path.parent).as_posix()
        for folder, _, files in os.walk(path)
        for name in files
    )


def read_checkpoint(path: Path) -> CheckpointInfo:
    """Describe the checkpoint folder ``path`` (a ``step-*`` folder with ``meta.json``).

    Raises:
        UserError: not a checkpoint folder at all.
        CheckpointCorrupt: ``meta.json`` that cannot be read (torn or edited).
    """
    path = Path(path)
    meta = path / META_NAME
    if not meta.is_file() or not (path / STATE_NAME).exists():
        raise UserError(
            f"'{path}' is not a complete checkpoint: expected a 'step-NNNNNNN' folder with "
            f"'{STATE_NAME}' and '{META_NAME}' (see <run>/checkpoints/)."
        )
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
        step = int(data["step"])
        files = data.get("files")
        if files is not None and not all(
            isinstance(v, dict) and "bytes" in v and "sha256" in v for v in files.values()
        ):
            raise ValueError("bad 'files' entries")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CheckpointCorrupt(
            f"'{meta}' cannot be read ({type(err).__name__}: {err}): the checkpoint is damaged"
        ) from None
    return CheckpointInfo(
        path=path, step=step, metrics=data.get("metrics") or {}, files=files, meta=data
    )


def verify_checkpoint(info: CheckpointInfo, checksums: bool = True) -> str | None:
    """What is wrong with a checkpoint's files, or None when they match its manifest.

    Args:
        info: the checkpoint (one without a manifest passes unverified).
        checksums: also compare each file's sha256 (reads every byte; without it only presence
            and sizes are checked).

    Returns:
        One sentence naming the bad file, or None.
    """
    if info.files is None:
        return None
    for name, entry in sorted(info.files.items()):
        file = info.path / name
        try:
            size = file.stat().st_size
        except OSError:
            return f"'{file}' is missing (the checkpoint is incomplete)"
        if size != entry["bytes"]:
            return (
                f"'{file}' has {size} bytes, its manifest says {entry['bytes']} (truncated or "
                "incomplete)"
            )
    if checksums:
        for name, entry in sorted(info.files.items()):
            file = info.path / name
            actual = sha256_file(file)
            if actual != entry["sha256"]:
                return (
                    f"'{file}' does not match its checksum (sha256 {actual[:16]}..., manifest "
                    f"{entry['sha256'][:16]}...): the file is corrupt"
                )
    return None


def checkpoint_shapes(
    info: CheckpointInfo, key: str = "model"
) -> dict[str, tuple[int, ...]] | None:
    """``{parameter name: shape}`` of the model tensors a checkpoint holds (read lazily: a
    memory-mapped file, or the metadata of a sharded folder); None for a layout it does not
    know (DeepSpeed's)."""
    state = info.state_path
    if state.is_dir():
        if not (state / ".metadata").is_file():
            return None
        from torch.distributed.checkpoint import FileSystemReader

        metadata = FileSystemReader(str(state)).read_metadata().state_dict_metadata
        prefix = f"{key}."
        return {
            name[len(prefix) :]: tuple(getattr(entry, "size", ()))
            for name, entry in metadata.items()
            if name.startswith(prefix)
        }
    loaded = torch.load(state, map_location="cpu", mmap=True, weights_only=False)
    return {
        name: tuple(value.shape)
        for name, value in (loaded.get(key) or {}).items()
        if isinstance(value, torch.Tensor)
    }


def state_bytes(obj: Any) -> int:
    """Bytes of the tensors in a checkpoint state (modules and optimizers by their state dicts;
    sharded tensors at their full size): what a checkpoint of it will take, roughly."""
    from torch import nn

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, nn.Module):
        return state_bytes(obj.state_dict())
    if isinstance(obj, torch.optim.Optimizer) or (
        hasattr(obj, "state_dict") and hasattr(obj, "param_groups")
    ):
        return state_bytes(obj.state_dict().get("state", {}))
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


def on_rank_zero(fabric: Any, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0; if it fails, every rank raises (rank 0 its own error, the others a
    copy of the same :class:`UserError` class with its message, or a ``RuntimeError``), so no
    rank waits for rank 0 at the next collective.

    Returns:
        ``fn()`` on rank 0, None elsewhere.
    """
    result, error = None, None
    if fabric.global_rank == 0:
        try:
            result = fn()
        except Exception as err:
            error = err
    if fabric.world_size > 1:
        from core.parallel.collectives import broadcast_object

        copies = {c.__name__: c for c in (StorageError, CheckpointCorrupt, FaultError, UserError)}
        sent = None
        if error is not None:
            kind = next((c.__name__ for c in type(error).__mro__ if c.__name__ in copies), None)
            sent = (kind, f"{error}")
        sent = broadcast_object(sent if fabric.global_rank == 0 else None)
        if sent is not None and error is None and fabric.global_rank != 0:
            kind, message = sent
            raise copies[kind](message) if kind else RuntimeError(f"rank 0 failed: {message}")
    if error is not None:
        raise error
    return result


class CheckpointManager:
    """Saves, finds, verifies and prunes the checkpoints of one run.

    Args:
        root: ``<run>/checkpoints``.
        cfg: the ``checkpoint`` config group.
    """

    def __init__(self, root: Path, cfg: CheckpointConfig) -> None:
        self.root = Path(root)
        self.cfg = cfg
        self._warned: set[tuple[Path, str]] = set()

    # -- finding -------------------------------------------------------------------------------

    def scan(self) -> tuple[list[CheckpointInfo], list[tuple[Path, str]]]:
        """Checkpoint folders of the run, split into usable ones (oldest step first; files
        present at their recorded sizes, checksums not read) and damaged ones
        (``(folder, what is wrong)``, newest first)."""
        good, bad = [], []
        if self.root.is_dir():
            for entry in self.root.iterdir():
                if not CKPT_PATTERN.match(entry.name) or not (entry / META_NAME).is_file():
                    continue
                try:
                    info = read_checkpoint(entry)
                except UserError as err:  # CheckpointCorrupt, or its state went missing
                    bad.append((entry, str(err)))
                    continue
                problem = verify_checkpoint(info, checksums=False)
                if problem:
                    bad.append((entry, problem))
                else:
                    good.append(info)
        bad.sort(key=lambda item: item[0].name, reverse=True)
        return sorted(good, key=lambda c: c.step), bad

    def _warn(self, path: Path, problem: str) -> None:
        if (path, problem) not in self._warned:
            self._warned.add((path, problem))
            log.warning("Skipping checkpoint %s: %s.", path.name, problem.rstrip("."))

    def list(self) -> list[CheckpointInfo]:
        """Usable checkpoints, oldest step first; damaged ones are skipped with a warning."""
        good, bad = self.scan()
        for path, problem in bad:
            self._warn(path, problem)
        return good

    def latest(self) -> CheckpointInfo | None:
        """The usable checkpoint with the highest step."""
        found = self.list()
        return found[-1] if found else None

    def newest_intact(self) -> tuple[CheckpointInfo | None, list[tuple[Path, str]]]:
        """The newest checkpoint whose files all match their checksums (a checkpoint without a
        manifest counts, unverified), and the newer ones that were skipped, each with what is
        wrong (a warning names the bad file)."""
        good, bad = self.scan()
        skipped = list(bad)
        for path, problem in bad:
            self._warn(path, problem)
        for info in reversed(good):
            problem = verify_checkpoint(info)
            if problem is None:
                return info, [s for s in skipped if s[0].name > info.path.name]
            self._warn(info.path, problem)
            skipped.append((info.path, problem))
        return None, sorted(skipped, key=lambda item: item[0].name, reverse=True)

    def set_aside(self, path: Path) -> Path:
        """Rename a damaged checkpoint folder to ``.damaged-step-*`` (not listed, not pruned,
        kept for inspection), so that the run can write that step anew.

        Returns:
            The new path.
        """
        target = self.root / f".damaged-{path.name}"
        count = 1
        while target.exists():
            count += 1
            target = self.root / f".damaged-{path.name}-{count}"
        os.replace(path, target)
        return target

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

    def best_intact(self) -> CheckpointInfo | None:
        """The best checkpoint whose files match their checksums (damaged ones are skipped with
        a warning naming the bad file)."""
        for info in self.ranked():
            problem = verify_checkpoint(info)
            if problem is None:
                return info
            self._warn(info.path, problem)
        return None

    # -- saving --------------------------------------------------------------------------------

    def expected_bytes(self, state: dict[str, Any]) -> int:
        """What the next checkpoint will take: the newest one's size, else the bytes of the
        state's tensors."""
        latest = self.latest()
        if latest is not None:
            return tree_bytes(latest.path)
        return state_bytes(state)

    def save(
        self,
        fabric: Any,
        state: dict[str, Any],
        step: int,
        metrics: dict[str, Any] | None = None,
        filter: dict[str, Callable[[str, Any], bool]] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Path:
        """Write a checkpoint atomically (call on every rank), then prune old ones.

        Args:
            fabric: the Fabric object (``fabric.save`` decides which ranks write).
            state: ``{"model": ..., "optimizer": ..., ...}`` as for ``fabric.save``.
            step: the optimizer step.
            metrics: validation metrics of this step, stored in ``meta.json`` for best-k.
            filter: ``fabric.save`` filter, e.g. only trainable parameters.
            extra: more entries for ``meta.json`` (rank 0's are written).

        Returns:
            The final ``step-*`` folder.

        Raises:
            StorageError: on every rank, when the checkpoint does not fit (checked before
                writing) or the disk is full, read-only or refuses access while writing; the
                partial folder is removed and the earlier checkpoints stay as they were.
        """
        final = self.root / f"step-{step:07d}"
        tmp = self.root / f".tmp-step-{step:07d}"
        what = f"checkpoint {final.name}"
        # Bytes the checkpoint will take: known on rank 0, which reports storage errors.
        needed = on_rank_zero(fabric, lambda: self._prepare_save(tmp, state, what))
        try:
            self._write_state(fabric, tmp / STATE_NAME, state, filter, what, needed)
            files = self._hash_files(fabric, tmp)

            def finish() -> None:
                meta = {
                    "step": step,
                    "metrics": metrics or {},
                    "time": time.time(),
                    "world_size": fabric.world_size,
                    **(extra or {}),
                    "format": CHECKPOINT_FORMAT,
                    "files": files,
                }
                self._publish(tmp, final, meta, what, needed)

            on_rank_zero(fabric, finish)
        except Exception:
            if fabric.global_rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        fabric.barrier()
        return final

    def _prepare_save(self, tmp: Path, state: dict[str, Any], what: str) -> int:
        """Rank 0, before a save: remove stale temporary folders, check the free space, create
        ``tmp``.

        Returns:
            The bytes the checkpoint is expected to take.

        Raises:
            StorageError: the checkpoint does not fit, or the folder cannot be written.
        """
        with storage_errors(what, self.root):
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            needed = self.expected_bytes(state)
            check_free_space(
                self.root,
                needed,
                what,
                hint="Free space there (older runs' checkpoints, checkpoint.keep_last) or "
                "move run.root to a larger disk, then resume the run.",
            )
            tmp.mkdir()
        return needed

    @staticmethod
    def _write_state(
        fabric: Any,
        path: Path,
        state: dict[str, Any],
        filter: dict[str, Callable[[str, Any], bool]] | None,
        what: str,
        needed: int | None,
    ) -> None:
        """``fabric.save`` the state to ``path`` (every rank); a write error on rank 0 that
        the save swallowed is raised on every rank after its closing barrier.

        Raises:
            StorageError: the disk is full, read-only or refuses access.
        """
        with storage_errors(what, path, needed):
            with _deferred_write_errors() as errors:
                fabric.save(path, state, filter=filter)  # ends with a barrier

        def written() -> None:
            if errors:
                with storage_errors(what, path, needed):
                    raise errors[0]

        on_rank_zero(fabric, written)

    def _publish(
        self, tmp: Path, final: Path, meta: dict[str, Any], what: str, needed: int | None
    ) -> None:
        """Rank 0, after a save: write the manifest into ``tmp``, sync it and rename it to
        ``final`` (replacing an earlier save of the same step), then prune old checkpoints."""
        with storage_errors(what, tmp, needed):
            # The manifest goes last: a folder whose meta.json lists every file is complete.
            (tmp / META_NAME).write_text(json.dumps(meta, indent=1), encoding="utf-8")
            _fsync_tree(tmp)
            if final.exists():  # the same step saved again (e.g. after a resume): replace it
                old = self.root / f".old-{final.name}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync_dir(self.root)
        self.prune()

    def _hash_files(self, fabric: Any, tmp: Path) -> dict[str, dict[str, Any]]:
        """The manifest of the files below ``tmp`` (on rank 0): files this rank hashed while
        writing them are taken as they are; the rest are shared out over the ranks to hash."""
        from core.parallel.collectives import broadcast_object, gather_objects

        names = broadcast_object(
            _files_below(tmp / STATE_NAME) if fabric.global_rank == 0 else None
        )
        mine: dict[str, dict[str, Any]] = {}
        for i, name in enumerate(names):
            known = _WRITTEN.pop(str((tmp / name).absolute()), None)
            if known is None and i % fabric.world_size != fabric.global_rank:
                continue
            try:
                size, digest = known or ((tmp / name).stat().st_size, sha256_file(tmp / name))
            except OSError:
                continue  # not visible from this rank: rank 0 hashes it below
            mine[name] = {"bytes": size, "sha256": digest}
        files: dict[str, dict[str, Any]] = {}
        for part in gather_objects(mine):
            files.update(part)
        if fabric.global_rank == 0:
            for name in names:
                if name not in files:
                    files[name] = {
                        "bytes": (tmp / name).stat().st_size,
                        "sha256": sha256_file(tmp / name),
                    }
        return dict(sorted(files.items()))

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


if __name__ == "__main__":  # self-check: python -m core.parallel.checkpoint
    import tempfile

    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1, plugins=[DirectCheckpointIO()])
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
        latest = manager.latest()
        assert set(latest.files) == {STATE_NAME} and verify_checkpoint(latest) is None
        # A flipped byte: still listed (sizes match), but not intact; resume takes step 3.
        data = bytearray(latest.state_path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        latest.state_path.write_bytes(bytes(data))
        intact, skipped = manager.newest_intact()
        assert intact.step == 3 and skipped[0][0] == latest.path, (intact, skipped)
        # Cut short: not even listed.
        latest.state_path.write_bytes(bytes(data[:100]))
        assert [c.step for c in manager.list()] == [1, 3]
        print("kept steps", kept, "best", manager.best().step, "damaged:", skipped[0][1])
    print("core.parallel.checkpoint: ok")
