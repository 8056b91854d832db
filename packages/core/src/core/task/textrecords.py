"""Records of text fields from a JSONL file (or any source :func:`core.task.records.read_all`
reads), each field a non-empty string: the input of most small text tasks (text and label,
source and target, prompt and response).

A record that is not an object or lacks a field stops with its file and line (a ``UserError``,
exit 2); nothing is dropped silently.

Self-check: ``python -m core.task.textrecords``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError
from core.task.records import read_all


@dataclass(frozen=True)
class TextRecord:
    """One record's text fields.

    Attributes:
        fields: field name -> its text (only the fields asked for).
        where: ``file:line`` of the record, for messages.
    """

    fields: dict[str, str]
    where: str

    def __getitem__(self, name: str) -> str:
        return self.fields[name]


def read_text_records(path: Path | str, key: str, names: Sequence[str]) -> list[TextRecord]:
    """The records of ``path`` with the text fields ``names``.

    Args:
        path: a JSONL file (or a JSON array file).
        key: the config key or option naming ``path``, for messages.
        names: the fields every record needs, each a non-empty string.

    Raises:
        UserError: a missing or malformed file, a record that is not an object, or one without a
            non-empty string in one of ``names``.
    """
    records = []
    for record in read_all(path, key, "records", allow_folders=False):
        row = record.value
        if not isinstance(row, dict) or not all(
            isinstance(row.get(n), str) and row[n].strip() for n in names
        ):
            raise UserError(
                f"{record.where}: each record needs a non-empty string "
                f"{' and '.join(repr(n) for n in names)} ({key}); got {str(row)[:80]}. Fix the "
                "record or remove it."
            )
        records.append(TextRecord({n: row[n] for n in names}, record.where))
    return records


if __name__ == "__main__":  # self-check: python -m core.task.textrecords
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        good = Path(tmp) / "good.jsonl"
        good.write_text('{"source": "wake me up at 6", "target": "alarm 6", "extra": 1}\n')
        (record,) = read_text_records(good, "data.train_file", ["source", "target"])
        assert record["target"] == "alarm 6" and record.where.endswith("good.jsonl:1"), record
        bad = Path(tmp) / "bad.jsonl"
        bad.write_text('{"source": "a", "target": "b"}\n{"source": "no target"}\n')
        try:
            read_text_records(bad, "data.train_file", ["source", "target"])
            raise AssertionError("a record without a target was accepted")
        except UserError as err:
            assert "bad.jsonl:2" in str(err) and "'target'" in str(err), err
    print("core.task.textrecords: ok")
