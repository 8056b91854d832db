"""The output guard every command that writes files goes through.

The promise to users: **a file this toolkit did not create is never overwritten or deleted**.
Before a command writes anything it checks each output:

- an output file that is one of the command's inputs (the same file, by resolved path) is refused:
  predictions onto the data file, answers onto the prompts file;
- an existing output file is refused unless ``--overwrite`` (it may be anyone's);
- an output folder must be new, empty, or a folder this same command wrote before (it carries a
  marker file naming the command), unless ``--overwrite``; a folder that holds any input is refused
  even then;
- a file where a folder is expected, or a folder where a file is expected, is named as such.

Every refusal is a :class:`core.errors.UserError` (exit code 2) raised before anything is
written. Files are written atomically (a temporary file renamed into place), so an interrupted
command leaves the old file or the new one, never half of one.

Self-check: ``python -m core.outputs``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from core.errors import UserError

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
        UserError: ``path`` is an input, a folder, an existing file (without ``--overwrite``), or
            lies below a file.
    """
    path = Path(path).expanduser()
    for source, source_key in inputs:
        if source is not None and _same(path, Path(source).expanduser()):
            raise UserError(
                f"{key} '{path}' is the input file of {source_key}: writing there would destroy "
                "it. Choose another output file."
            )
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
    return path


def guard_folder(
    path: Path,
    key: str,
    command: str,
    inputs: Sequence[tuple[Path, str]] = (),
    overwrite: bool = False,
) -> Path:
    """Check an output *folder* before anything is written.

    Args:
        path: the folder the command will create or write into.
        key: the option that named it.
        command: the command's name; a folder it wrote before (its marker names it) is accepted.
        inputs: ``(path, option)`` of every file or folder the command reads.
        overwrite: the user passed ``--overwrite`` (a non-empty folder of someone else's files).

    Returns:
        ``path``.

    Raises:
        UserError: ``path`` is a file, holds an input, or holds files of someone else.
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
    folder.mkdir(parents=True, exist_ok=True)
    write_text(
        folder / MARKER,
        json.dumps({"command": command, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n",
    )


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) atomically: a temporary file in the same folder, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    """Write rows as UTF-8 JSON lines atomically; returns the number of rows."""
    lines = [json.dumps(row, ensure_ascii=False) + "\n" for row in rows]
    write_text(path, "".join(lines))
    return len(lines)


if __name__ == "__main__":  # self-check: python -m core.outputs
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
        assert (
            data.read_text(encoding="utf-8") == "{}\n"
            and (user / "notes.txt").read_text(encoding="utf-8") == "mine"
        )
    print("core.outputs: ok")
