"""Reading data records, one policy for every task: JSON lines, JSON arrays and ``datasets``
sources.

- Text is UTF-8, with or without a byte-order mark. Anything else stops with the file, line,
  column and the offending byte, and how to convert the file.
- Every record carries where it came from (``file:line``, or ``source[split] row i``), so a
  task's check of a record names the exact place.
- Malformed JSON names file, line and column and the parser's complaint, in one sentence.
- A folder where a file is expected is called a folder; a path that does not exist is called
  missing. Neither message proposes writing anything.

Tasks keep their own *record* checks (which fields, which types); this module only turns a
source into ``(where, value)`` pairs (and holds out a seeded validation share:
:func:`split_holdout`).

Self-check: ``python -m core.task.records``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from core.errors import UserError

BOM = "\ufeff"
DATA_SUFFIXES = (".jsonl", ".json", ".ndjson", ".csv", ".parquet", ".arrow")
"""Files that make a folder a ``datasets`` source (one file per split)."""
T = TypeVar("T")


@dataclass(frozen=True)
class RawRecord:
    """One record as read, before a task checks it.

    Attributes:
        where: ``file:line`` (1-based), or ``source[split] row i`` for ``datasets`` sources.
        value: the parsed JSON value (a dict for well-formed records), or a :class:`BadJSON`.
        line: the line the record starts on (files), or its row number (datasets).
    """

    where: str
    value: Any
    line: int = 0


@dataclass(frozen=True)
class BadJSON:
    """A line that is not valid JSON, kept when the caller skips bad records instead of stopping.

    Attributes:
        message: what is wrong, with file, line and column.
    """

    message: str


def check_file(path: Path, key: str, what: str = "Data file") -> Path:
    """``path`` as an existing regular file.

    Args:
        path: the file.
        key: the config key or option that named it.
        what: how messages call it.

    Raises:
        UserError: the path is missing or is a folder.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(
            f"{what} '{path}' ({key}) is a folder, not a file. Give the path of a .jsonl or .json "
            "file inside it."
        )
    if not path.exists():
        raise UserError(
            f"{what} '{path}' ({key}) does not exist. Check the path (relative paths start at "
            f"{Path.cwd()})."
        )
    return path


def read_text(path: Path, key: str, what: str = "Data file") -> str:
    """The UTF-8 text of a file (a leading byte-order mark removed).

    Raises:
        UserError: missing file, a folder, or bytes that are not UTF-8 (file:line:column and the
        byte).
    """
    path = check_file(path, key, what)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise UserError(
            f"{path}:{line}:{column}: not UTF-8 text (byte 0x{data[err.start]:02x}) in {key}. "
            "Save the file as UTF-8 "
            "(for example: iconv -f cp949 -t utf-8 in.jsonl > out.jsonl for a Korean Windows file)."
        ) from None
    return text.removeprefix(BOM)


def _json_error(path: Path, line: int, err: json.JSONDecodeError, column: int | None = None) -> str:
    """One sentence for a JSON parse error: place first, then the parser's complaint."""
    return (
        f"{path}:{line}:{column if column is not None else err.colno}: not valid JSON ({err.msg})."
    )


def iter_json_lines(
    path: Path, text: str, on_bad: Literal["raise", "keep"] = "raise"
) -> Iterator[RawRecord]:
    """Records of JSON-lines text, one per non-blank line.

    Args:
        path: the file (for messages).
        text: its decoded content.
        on_bad: ``raise`` a :class:`UserError` on a malformed line, or ``keep`` it as a
            :class:`BadJSON` value (for callers that skip bad records and count them).
    """
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            message = (
                _json_error(path, number, err) + " Each line must be one complete JSON object."
            )
            if on_bad == "raise":
                raise UserError(message) from None
            value = BadJSON(message)
        yield RawRecord(f"{path}:{number}", value, number)


def iter_json_array(path: Path, text: str) -> Iterator[RawRecord]:
    """Records of a JSON array, element by element, each with the line it starts on and its
    position in the array (``file:line (record i)``).

    Line numbers are counted incrementally from the previous element: counting from the start of
    the file for every element made reading quadratic (173 s for a 21 MB, 50k-record file).

    Raises:
        UserError: the text is not a well-formed JSON array (with line and column).
    """
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if not text[pos:].startswith("["):
        raise UserError(
            f"{path}: a .json data file must hold a JSON array of records (starting with '['); "
            "use .jsonl for one record per line."
        )
    line, counted = 1, 0  # ``line`` is the line number of offset ``counted``

    def line_at(offset: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, offset)
        counted = offset
        return line

    pos += 1
    expect_item = True
    index = 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos >= len(text):
            raise UserError(
                f"{path}:{line_at(pos)}: the JSON array is not closed (missing ']' at the end of "
                "the file)."
            )
        char = text[pos]
        if char == "]":
            return
        if char == ",":
            if expect_item:
                raise UserError(
                    f"{path}:{line_at(pos)}: unexpected ',' in the JSON array (an empty element)."
                )
            expect_item = True
            pos += 1
            continue
        if not expect_item:
            raise UserError(f"{path}:{line_at(pos)}: expected ',' or ']' between records.")
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise UserError(_json_error(path, err.lineno, err)) from None
        start = line_at(pos)
        yield RawRecord(f"{path}:{start} (record {index})", value, start)
        index += 1
        pos = end
        expect_item = False


def iter_file(
    path: Path, key: str, on_bad: Literal["raise", "keep"] = "raise"
) -> Iterator[RawRecord]:
    """Records of a ``.jsonl`` file (one per line) or a ``.json`` file (an array).

    Args:
        path: the data file.
        key: the config key or option that named it.
        on_bad: see :func:`iter_json_lines` (arrays always raise: their structure is broken).

    Raises:
        UserError: missing file, a folder, not UTF-8, malformed JSON, an unsupported extension.
    """
    path = Path(path).expanduser()
    text = read_text(path, key)
    if path.suffix.lower() == ".json" or (
        path.suffix.lower() != ".jsonl" and text.lstrip().startswith("[")
    ):
        yield from iter_json_array(path, text)
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        yield from iter_json_lines(path, text, on_bad)
    else:
        raise UserError(
            f"Data file '{path}' ({key}) has the extension '{path.suffix}'; use JSON lines "
            "(.jsonl) or a JSON array (.json)."
        )


def is_dataset_folder(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk`` /
    ``DatasetDict.save_to_disk``."""
    return path.is_dir() and (
        (path / "dataset_info.json").is_file()
        or (path / "dataset_dict.json").is_file()
        or (path / "state.json").is_file()
    )


def dataset_cached(name: str) -> bool:
    """Whether a Hub dataset has a copy in the local ``datasets`` or Hub cache."""
    from datasets import config as ds_config
    from huggingface_hub import constants

    return (Path(ds_config.HF_DATASETS_CACHE) / name.replace("/", "___")).is_dir() or (
        Path(constants.HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}"
    ).is_dir()


def iter_dataset(
    source: Path | str, key: str, split: str = "train", subset: str | None = None, hint: str = ""
) -> Iterator[RawRecord]:
    """Rows of a ``datasets`` source: a ``save_to_disk`` folder, a folder of data files (one per
    split), or a Hub dataset id (from the local cache when the Hub cannot be reached).

    Args:
        source: the folder or Hub id.
        key: the config key that named it.
        split, subset: what to load.
        hint: the task's own way forward, added to every error (e.g. which keys take files).

    Raises:
        UserError: the dataset cannot be loaded here (offline and not cached, unknown split, ...).
    """
    import datasets

    from core.task.hub import hub_reachable

    hint = f" {hint}" if hint else ""
    where = f"'{source}' ({key}, split '{split}'{f', subset {subset}' if subset else ''})"
    if not isinstance(source, Path) and not hub_reachable() and not dataset_cached(source):
        raise UserError(
            f"Cannot load the dataset {where}: the Hugging Face Hub is not reachable from this "
            "machine and the dataset "
            "is not in the local cache. Run once where there is network and copy the cache here "
            "(then set "
            f"HF_HUB_OFFLINE=1), or download the data as .jsonl files and give their paths.{hint}"
        )
    try:
        if isinstance(source, Path) and is_dataset_folder(source):
            loaded = datasets.load_from_disk(str(source))
            rows = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        else:
            if not hub_reachable():
                # Without network the Hub client retries for minutes; use the local cache only.
                datasets.config.HF_HUB_OFFLINE = True
            rows = datasets.load_dataset(str(source), subset, split=split)
    except (
        Exception
    ) as err:  # datasets raises many types (ConnectionError, FileNotFoundError, KeyError, ...)
        text = " ".join(str(err).split())
        text = text if len(text) <= 400 else text[:400].rsplit(" ", 1)[0] + " ..."
        raise UserError(
            f"Cannot load the dataset {where}: {type(err).__name__}: {text.rstrip('.')}. Without "
            "network use local .jsonl / .json "
            f"files or a folder written by Dataset.save_to_disk.{hint}"
        ) from None
    for i, row in enumerate(rows):
        yield RawRecord(f"{source}[{split}] row {i}", row, i)


def iter_source(
    source: Path | str,
    key: str,
    *,
    split: str = "train",
    subset: str | None = None,
    on_bad: Literal["raise", "keep"] = "raise",
    allow_folders: bool = True,
    hint: str = "",
) -> Iterator[RawRecord]:
    """Records of any data source a task accepts.

    Args:
        source: a ``.jsonl`` / ``.json`` file, a dataset folder (``save_to_disk``, or data files
            per split), or (a string that is not an existing path) a Hub dataset id.
        key: the config key or option that named it.
        split, subset: for ``datasets`` sources.
        on_bad: for JSON-lines files, see :func:`iter_json_lines`.
        allow_folders: False where only a file makes sense (a folder is then called a folder).
        hint: added to errors of ``datasets`` sources (see :func:`iter_dataset`).

    Raises:
        UserError: see :func:`iter_file` and :func:`iter_dataset`; a folder that is not a dataset.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if not allow_folders:
            raise UserError(
                f"Data file '{path}' ({key}) is a folder, not a file. Give the path of a .jsonl "
                "or .json file inside it."
            )
        if not is_dataset_folder(path) and not any(
            p.suffix.lower() in DATA_SUFFIXES for p in path.iterdir()
        ):
            raise UserError(
                f"Data source '{path}' ({key}) is a folder with neither a dataset written by "
                "Dataset.save_to_disk nor "
                "data files in it. Give the path of a .jsonl or .json file."
            )
        yield from iter_dataset(path, key, split, subset, hint)
        return
    looks_like_file = (
        isinstance(source, Path)
        or path.suffix.lower() in (".json", ".jsonl")
        or str(source).startswith((".", "/", "~"))
        or "\\" in str(source)
    )
    if path.exists() or looks_like_file:
        yield from iter_file(path, key, on_bad)
        return
    yield from iter_dataset(str(source), key, split, subset, hint)


def read_all(source: Path | str, key: str, what: str = "records", **kwargs: Any) -> list[RawRecord]:
    """Every record of ``source``; at least one.

    Raises:
        UserError: as :func:`iter_source`, or an empty source (named with its key).
    """
    records = list(iter_source(source, key, **kwargs))
    if not records:
        raise UserError(
            f"Data source '{source}' ({key}) holds no {what}: it is empty or has only blank lines."
        )
    return records


def read_objects(
    source: Path | str, key: str, what: str, fields: str, **kwargs: Any
) -> list[RawRecord]:
    """Every record of ``source`` (see :func:`read_all`), each a JSON object.

    Args:
        source, key, what, kwargs: as for :func:`read_all`.
        fields: what an object holds, for the message (``'messages' or 'conversations'``).

    Raises:
        UserError: as :func:`read_all`, or a record that is not an object (file and line).
    """
    records = read_all(source, key, what, **kwargs)
    for record in records:
        if not isinstance(record.value, dict):
            raise UserError(
                f"{record.where}: a record must be a JSON object with {fields}, got "
                f"{type(record.value).__name__}."
            )
    return records


def split_holdout(items: list[T], val_size: float, seed: int) -> tuple[list[T], list[T]]:
    """Hold out a seeded random share of the records for validation.

    Args:
        items: all training records.
        val_size: fraction (< 1) or count (>= 1); 0: no validation.
        seed: split seed.

    Returns:
        ``(train, val)``, each in the original order; at least one record stays for training.
    """
    import numpy as np

    n = len(items)
    count = int(round(n * val_size)) if val_size < 1 else int(val_size)
    if val_size > 0 and n > 1:
        count = max(1, count)
    count = min(count, n - 1) if n > 1 else 0
    if count <= 0:
        return list(items), []
    held = set(np.random.default_rng(seed).permutation(n)[:count].tolist())
    return [r for i, r in enumerate(items) if i not in held], [
        r for i, r in enumerate(items) if i in held
    ]


if __name__ == "__main__":  # self-check: python -m core.task.records
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "a.jsonl").write_bytes(BOM.encode() + b'{"x": 1}\n\n{"x": "\xed\x95\x9c"}\n')
        print(
            [(r.where.rsplit("/", 1)[-1], r.value) for r in read_all(folder / "a.jsonl", "--data")]
        )
        (folder / "b.json").write_text('[\n {"x": 1},\n {"x": 2}\n]\n', encoding="utf-8")
        assert [r.where.rsplit(":", 1)[-1] for r in read_all(folder / "b.json", "--data")] == [
            "2 (record 0)",
            "3 (record 1)",
        ]
        (folder / "c.jsonl").write_bytes(b'{"x": 1}\n{"x": "caf\xe9"}\n')
        (folder / "d.jsonl").write_text('{"x": 1}\n[1]\n', encoding="utf-8")
        for bad in (folder / "c.jsonl", folder, folder / "missing.jsonl", folder / "d.jsonl"):
            try:
                read_objects(bad, "--data", "rows", "'x'", allow_folders=False)
            except UserError as err:
                print("refused:", str(err).replace(str(folder), "<tmp>"))
            else:
                raise AssertionError(f"{bad} must be refused")
    train, val = split_holdout(list(range(40)), 0.1, seed=1)
    assert len(val) == 4 and sorted(train + val) == list(range(40))
    assert split_holdout([1], 0.5, seed=1) == ([1], [])
    print("core.task.records: ok")
