"""The output guard every command that writes files goes through.

The promise to users: **a file this toolkit did not create is never overwritten or deleted**.
Before a command writes anything it checks each output:

- an output file that is one of the command's inputs (the same file, by resolved path) is refused:
  predictions onto the data file, answers onto the prompts file;
- an existing output file is refused unless ``--overwrite`` (it may be anyone's);
- an output folder must be new, empty, or a folder this same command wrote before (it carries a
  marker file naming the command), unless ``--overwrite``; a folder that holds any input is refused
  even then;
- a file where a folder is expected, or a folder where a file is expected, is named as such;
- nothing is written inside a model folder (``config.json`` of a model, ``adapter_config.json``,
  weights), a run folder or a checkpoint folder, even with ``--overwrite``: a stray or replaced
  file there breaks the model or the run's records (the one exception is a command's own place
  in a run, e.g. ``evaluate``'s ``<run>/eval/``);
- a folder that is an input (a dataset folder) takes no output file below it.

A write that meets a full or read-only disk raises :class:`core.run.storage.StorageError` (exit code
1, naming the path) and leaves no partial file behind.

Every refusal is a :class:`core.errors.UserError` (exit code 2) raised before anything is
written. Files are written atomically (a temporary file renamed into place), so an interrupted
command leaves the old file or the new one, never half of one.

Self-check: ``python -m core.run.outputs``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from core.errors import UserError
from core.run.storage import storage_errors

MARKER = ".written-by.json"
"""File inside an output folder that names the command that made it (re-runs may write there
again)."""


def _same(a: Path, b: Path) -> bool:
    """Whether two paths name the same file or folder (symlinks and ``..`` resolved)."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _inside(child: Path, folder: Path) -> bool:
    """Whether ``child`` is ``folder`` or lies below it."""
    child, folder = child.resolve(), folder.resolve()
    return child == folder or folder in child.parents


WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.gguf", "model.safetensors.index.json")
"""Files that make a folder a model folder on their own."""


def _json_keys(path: Path) -> set[str]:
    """Top-level keys of a JSON object file (empty when unreadable or not an object)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    return set(data) if isinstance(data, dict) else set()


def protected_kind(folder: Path) -> str | None:
    """What kind of folder ``folder`` is when nothing may be written into it, else None.

    Why these signs: a ``config.json`` alone may be anyone's settings file, so a model folder is
    recognised by a ``config.json`` that describes a model (``model_type`` / ``architectures``),
    an ``adapter_config.json`` (PEFT), or weight files; a run folder by its ``manifest.json``
    and ``config.yaml`` (:func:`core.run.folder.is_run_folder`); a checkpoint by ``step-*`` with
    ``meta.json``.

    Returns:
        ``"model folder"``, ``"run folder"``, ``"checkpoint folder"`` or None.
    """
    from core.run.folder import is_run_folder

    folder = Path(folder)
    try:
        if not folder.is_dir():
            return None
        if is_run_folder(folder):
            return "run folder"
        if folder.name.startswith("step-") and (folder / "meta.json").is_file():
            return "checkpoint folder"
        if (folder / "adapter_config.json").is_file() or _json_keys(folder / "config.json") & {
            "model_type",
            "architectures",
        }:
            return "model folder"
        if any(next(folder.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
            return "model folder"
    except OSError:  # an unreadable folder: not ours to judge
        return None
    return None


def protected_folders(path: Path) -> list[tuple[Path, str]]:
    """Every model, run or checkpoint folder that holds ``path`` (or is it), nearest first, with
    its kind (see :func:`protected_kind`); empty when ``path`` lies in none."""
    path = Path(path).expanduser().absolute()
    return [
        (folder, kind)
        for folder in [path, *path.parents]
        if (kind := protected_kind(folder)) is not None
    ]


def check_not_protected(path: Path, key: str, own: Path | None = None) -> None:
    """Refuse an output inside a model, run or checkpoint folder (see :func:`protected_kind`).

    Args:
        path: the output file or folder.
        key: the option that named it.
        own: a folder the command may write into although it lies in a run (its own place).

    Raises:
        UserError: naming the folder and a path outside it.
    """
    if own is not None and _inside(Path(path).expanduser(), Path(own)):
        return
    hits = protected_folders(path)
    if not hits:
        return
    folder, kind = hits[0]
    suggestion = hits[-1][0].parent / Path(path).name  # outside the outermost one
    raise UserError(
        f"{key} '{path}' lies inside the {kind} '{folder}'; writing there could break it "
        "(even with --overwrite, nothing is written into a model, run or checkpoint folder). "
        f"Choose a path outside it, e.g. {suggestion}."
    )


def guard_file(
    path: Path, key: str, inputs: Sequence[tuple[Path, str]] = (), overwrite: bool = False
) -> Path:
    """Check an output *file* before anything is written.

    Args:
        path: where the command will write.
        key: the option that named it (``--out``).
        inputs: ``(path, option)`` of every file the command reads.
        overwrite: the user passed ``--overwrite``.

    Returns:
        ``path``.

    Raises:
        UserError: ``path`` is an input or lies in an input folder, lies in a model, run or
            checkpoint folder, is a folder, an existing file (without ``--overwrite``), or lies
            below a file.
        StorageError: the folder it would go to is read-only or not writable (exit code 1).
    """
    path = Path(path).expanduser()
    for source, source_key in inputs:
        if source is None:
            continue
        source = Path(source).expanduser()
        if _same(path, source):
            raise UserError(
                f"{key} '{path}' is the input file of {source_key}: writing there would destroy "
                "it. Choose another output file."
            )
        if source.is_dir() and _inside(path, source):
            raise UserError(
                f"{key} '{path}' lies inside the input folder of {source_key} ('{source}'): a "
                "new file there would change the input. Choose a path outside it."
            )
    check_not_protected(path, key)
    if path.is_dir():
        raise UserError(
            f"{key} '{path}' is a folder; give a file path, e.g. {path / 'predictions.jsonl'}."
        )
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UserError(f"{key} '{path}' cannot be created: '{blocking}' is a file, not a folder.")
    if path.exists() and not overwrite:
        raise UserError(
            f"{key} '{path}' already exists, and this command does not overwrite files it did not "
            "create. "
            "Choose a new file name, or pass --overwrite to replace it."
        )
    from core.run.storage import check_writable

    # Before the command's work, not after it: a read-only target is known now.
    check_writable(path.parent, f"{key} '{path}'")
    return path


def guard_folder(
    path: Path,
    key: str,
    command: str,
    inputs: Sequence[tuple[Path, str]] = (),
    overwrite: bool = False,
    own: Path | None = None,
) -> Path:
    """Check an output *folder* before anything is written.

    Args:
        path: the folder the command will create or write into.
        key: the option that named it.
        command: the command's name; a folder it wrote before (its marker names it) is accepted.
        inputs: ``(path, option)`` of every file or folder the command reads.
        overwrite: the user passed ``--overwrite`` (a non-empty folder of someone else's files).
        own: a folder inside a run the command may write to (``evaluate``'s ``<run>/eval``);
            any other folder inside a model, run or checkpoint folder is refused.

    Returns:
        ``path``.

    Raises:
        UserError: ``path`` is a file, holds an input, lies in (or is) a model, run or
            checkpoint folder, or holds files of someone else.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(
            f"{key} '{path}' is a file; a folder is expected (it will be created if missing)."
        )
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UserError(f"{key} '{path}' cannot be created: '{blocking}' is a file, not a folder.")
    for source, source_key in inputs:
        if source is not None and _inside(Path(source).expanduser(), path):
            raise UserError(
                f"{key} '{path}' holds the input of {source_key} ('{source}'); choose another "
                "output folder."
            )
    # A folder this same command made before (its marker) is its own, even as a model folder.
    check_not_protected(path, key, own or (path if writer_of(path) == command else None))
    if not path.is_dir():
        return path
    entries = sorted(p.name for p in path.iterdir())
    if not entries or writer_of(path) == command or overwrite:
        return path
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    raise UserError(
        f"{key} '{path}' already holds files this command did not write ({shown}). Choose a new "
        "or empty folder, "
        "or pass --overwrite to write into it anyway (files of the same names are replaced)."
    )


def writer_of(folder: Path) -> str | None:
    """The command named in ``folder``'s marker, or None."""
    try:
        return json.loads((Path(folder) / MARKER).read_text(encoding="utf-8")).get("command")
    except (OSError, ValueError, AttributeError):
        return None


def mark_folder(folder: Path, command: str) -> None:
    """Create ``folder`` (if needed) and record that ``command`` wrote it."""
    folder = Path(folder)
    with storage_errors(f"the output folder of {command}", folder):
        folder.mkdir(parents=True, exist_ok=True)
    write_text(
        folder / MARKER,
        json.dumps({"command": command, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n",
        f"the marker of {command}",
    )


def write_text(path: Path, text: str, what: str = "the output file") -> None:
    """Write ``text`` (UTF-8) atomically: a temporary file in the same folder, then a rename.

    Raises:
        StorageError: a full or read-only disk, no rights (exit code 1, naming ``path`` and the
            bytes needed); the temporary file is removed, an earlier ``path`` stays as it was.
    """
    path = Path(path)
    data = text.encode("utf-8")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with storage_errors(what, path, needed=len(data)):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())  # a full disk shows here, not after the rename
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def write_jsonl(path: Path, rows: Iterable[dict], what: str = "the output file") -> int:
    """Write rows as UTF-8 JSON lines atomically; returns the number of rows (see
    :func:`write_text` for faults)."""
    lines = [json.dumps(row, ensure_ascii=False) + "\n" for row in rows]
    write_text(path, "".join(lines), what)
    return len(lines)


if __name__ == "__main__":  # self-check: python -m core.run.outputs
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "data.jsonl"
        data.write_text("{}\n", encoding="utf-8")
        user = root / "user"
        user.mkdir()
        (user / "notes.txt").write_text("mine", encoding="utf-8")
        for check in (
            lambda: guard_file(data, "--out", [(data, "--data")]),
            lambda: guard_file(data, "--out"),
            lambda: guard_folder(user, "--out", "make-data"),
            lambda: guard_folder(data, "--out", "make-data"),
        ):
            try:
                check()
            except UserError as err:
                print("refused:", str(err).replace(tmp, "<tmp>"))
            else:
                raise AssertionError("must be refused")
        mine = root / "made"
        guard_folder(mine, "--out", "make-data")
        mark_folder(mine, "make-data")
        (mine / "train.jsonl").write_text("{}\n", encoding="utf-8")
        assert guard_folder(mine, "--out", "make-data") == mine  # its own folder again: fine
        model = root / "model"
        model.mkdir()
        (model / "config.json").write_text('{"model_type": "bart"}', encoding="utf-8")
        for check in (
            lambda: guard_file(model / "x.jsonl", "--out", overwrite=True),
            lambda: guard_folder(model / "merged", "--out", "merge"),
            lambda: guard_file(user / "x.jsonl", "--out", [(user, "--data")]),
        ):
            try:
                check()
            except UserError as err:
                print("refused:", str(err).replace(tmp, "<tmp>"))
            else:
                raise AssertionError("must be refused")
        assert (
            data.read_text(encoding="utf-8") == "{}\n"
            and (user / "notes.txt").read_text(encoding="utf-8") == "mine"
        )
    print("core.run.outputs: ok")
