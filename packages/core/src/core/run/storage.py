"""Storage faults as one clear message: a full disk, a read-only mount, a folder without rights.

Every command that writes (checkpoints, ``final/``, the summary, caches, merged models, evaluate
outputs) runs its writes inside :func:`storage_errors`. An ``OSError`` of the kinds a user meets
on a cluster (``ENOSPC``, ``EDQUOT``, ``EROFS``, ``EACCES``, ``EPERM``) becomes a
:class:`StorageError` that names what was being written, the path, the space it needed and the
space that was free, and how to go on; the command prints it as one paragraph and exits with
code 1, without a traceback. Any other ``OSError`` keeps its traceback (it is a bug or an
unexpected fault).

:func:`check_free_space` and :func:`check_writable` run *before* a write, so a checkpoint that
cannot fit is refused before half of it fills the disk, and a read-only run root is refused
before training starts.

Self-check: ``python -m core.run.storage``.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from core.errors import FaultError

STORAGE_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
"""errno -> the words a message uses for it."""

FREE_SPACE_MARGIN = 1.05
"""A write must fit with 5% to spare: file-system overhead and the metadata files beside it."""


class StorageError(FaultError):
    """A write failed (or would fail) for lack of space or rights; the message names the path."""


def human_bytes(count: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover


def existing_parent(path: Path) -> Path:
    """``path`` itself or its nearest existing ancestor (what a new file would be made in)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer can still use on the file system that holds ``path``."""
    return shutil.disk_usage(existing_parent(path)).free


def is_storage_error(err: BaseException) -> bool:
    """Whether ``err`` is an ``OSError`` of the kinds :data:`STORAGE_ERRNOS` names (also when a
    library wrapped it, e.g. ``RuntimeError`` from ``torch.save`` with the errno in its text)."""
    if isinstance(err, OSError) and err.errno in STORAGE_ERRNOS:
        return True
    cause = err.__cause__ or err.__context__
    if cause is not None and cause is not err and is_storage_error(cause):
        return True
    text = str(err)
    return any(os.strerror(code) in text for code in STORAGE_ERRNOS)


def storage_message(
    err: BaseException, what: str, path: Path, needed: int | None = None, hint: str = ""
) -> str:
    """One paragraph: what was written where, why it failed, the space involved, how to go on."""
    code = getattr(err, "errno", None)
    if code not in STORAGE_ERRNOS:
        code = next((c for c in STORAGE_ERRNOS if os.strerror(c) in str(err)), errno.EIO)
    reason = STORAGE_ERRNOS.get(code, str(err))
    target = getattr(err, "filename", None) or path
    parts = [f"Could not write {what} to '{target}': {reason}."]
    if code in (errno.ENOSPC, errno.EDQUOT):
        free = free_bytes(Path(path))
        needed_text = f"{human_bytes(needed)} needed, " if needed else ""
        parts.append(f"{needed_text}{human_bytes(free)} free there.")
        parts.append(hint or "Free space there (or choose another folder) and run it again.")
    elif code == errno.EROFS:
        parts.append(hint or "Choose a folder on a writable file system.")
    else:
        parts.append(hint or "Choose a folder you may write to, or fix its permissions.")
    return " ".join(parts)


@contextmanager
def storage_errors(
    what: str, path: Path, needed: int | None = None, hint: str = ""
) -> Iterator[None]:
    """Turn a storage ``OSError`` raised inside the block into a :class:`StorageError`.

    Args:
        what: what is being written, for the message ("checkpoint step-0000010").
        path: where (a file or folder).
        needed: bytes the write needs, when known.
        hint: how to go on, when the generic advice is not enough.
    """
    try:
        yield
    except StorageError:
        raise
    except Exception as err:
        if not is_storage_error(err):
            raise
        raise StorageError(storage_message(err, what, path, needed, hint)) from None


def check_free_space(path: Path, needed: int, what: str, hint: str = "") -> None:
    """Refuse a write of ``needed`` bytes below ``path`` that would not fit (with a margin).

    Raises:
        StorageError: naming the path, the bytes needed and free.
    """
    free = free_bytes(path)
    if needed * FREE_SPACE_MARGIN > free:
        raise StorageError(
            f"Not enough space to write {what} to '{path}': {human_bytes(needed)} needed, "
            f"{human_bytes(free)} free there. "
            + (hint or "Free space there (or choose another folder) and run it again.")
        )


def check_writable(folder: Path, what: str, hint: str = "") -> None:
    """Refuse a folder (or the nearest existing parent of a new one) that cannot take files.

    Creates and deletes one empty probe file; nothing else is touched.

    Raises:
        StorageError: read-only file system, or no permission.
    """
    base = existing_parent(folder)
    if not base.is_dir():
        return  # a file where a folder is expected: the caller's own check names that
    try:
        handle, probe = tempfile.mkstemp(prefix=".write-probe-", dir=base)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        if err.errno not in STORAGE_ERRNOS:
            raise
        # Without the probe's own name: the message names the folder the user gave.
        bare = OSError(err.errno, err.strerror)
        raise StorageError(storage_message(bare, what, Path(folder), hint=hint)) from None


def writable_cache(folder: Path, variable: str, what: str) -> Path:
    """``folder`` when a cache can be written there, else a private folder under the temporary
    directory (``$TMPDIR``), with a warning that names the variable that moves the cache.

    Why: a cache only saves time; a read-only ``HOME`` or a shared read-only cache must not stop a
    command, but the user should know the cache will not persist and how to fix that.

    Args:
        folder: the configured cache folder (created when missing and possible).
        variable: what sets it (``HF_DATASETS_CACHE``, ``QWEN_VL_CACHE``), for the messages.
        what: what the cache holds, for the messages.

    Returns:
        A folder that exists and takes files.

    Raises:
        StorageError: neither ``folder`` nor the fallback can be written; names ``variable``.
    """
    import logging

    folder = Path(folder)
    try:
        check_writable(folder, what)
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    except StorageError:
        pass
    except OSError as err:
        if not is_storage_error(err):
            raise
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    fallback = Path(tempfile.gettempdir()) / f"finetune-cache-{uid}" / folder.name
    try:
        with storage_errors(what, fallback):
            fallback.mkdir(parents=True, exist_ok=True)
            check_writable(fallback, what)
    except StorageError:
        raise StorageError(
            f"Cannot write {what}: '{folder}' is not writable (read-only or no permission) and "
            f"neither is the fallback '{fallback}'. Set {variable} to a writable folder and run "
            "it again."
        ) from None
    logging.getLogger(__name__).warning(
        "%s: '%s' is not writable (read-only or no permission); using '%s' for this run. Set %s "
        "to a writable folder to keep the cache between runs.",
        what,
        folder,
        fallback,
        variable,
    )
    return fallback


def tree_bytes(path: Path) -> int:
    """Bytes of the files below ``path`` (a file: its size; missing: 0)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(folder, name))
            except OSError:
                pass
    return total


if __name__ == "__main__":  # self-check: python -m core.run.storage
    with tempfile.TemporaryDirectory() as tmp:
        check_writable(Path(tmp) / "new" / "folder", "a run folder")
        check_free_space(Path(tmp), 1, "one byte")
        try:
            check_free_space(Path(tmp), 2**62, "a huge checkpoint")
        except StorageError as err:
            assert "huge checkpoint" in str(err) and "free there" in str(err), err
        else:
            raise AssertionError("4 EiB fitted")
        try:
            with storage_errors("a test file", Path(tmp) / "x"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(tmp) / "x"))
        except StorageError as err:
            print(err)
        assert is_storage_error(RuntimeError(f"[Errno 28] {os.strerror(errno.ENOSPC)}"))
        assert human_bytes(1536) == "1.5 KiB", human_bytes(1536)
    print("core.run.storage: ok")
