"""The output guard in this process, in milliseconds: what ``guard_file`` and ``guard_folder``
refuse before a command writes, with the message the user reads, and that nothing is touched.

The commands' own refusals (through every task's real ``--out``) are in the slow
``tests/test_bad_input.py`` and ``tests/test_faults_outputs.py``; this file keeps the guard in
the quick tier.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.errors import UserError
from core.run.outputs import guard_file, guard_folder, mark_folder, protected_kind


@pytest.fixture
def world(tmp_path: Path) -> Path:
    """``data.jsonl`` (an input), ``user/notes.txt`` (someone's folder), ``model/`` (a model
    folder: its ``config.json`` names a model type)."""
    (tmp_path / "data.jsonl").write_text("{}\n", encoding="utf-8")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine", encoding="utf-8")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "bart"}))
    return tmp_path


def files(root: Path) -> dict[str, bytes]:
    """``{relative path: content}`` of every file below ``root``."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("check", "message"),
    [
        (
            lambda w: guard_file(w / "data.jsonl", "--out", [(w / "data.jsonl", "--data")]),
            "is the input file of --data",
        ),
        (
            lambda w: guard_file(w / "user" / "x.jsonl", "--out", [(w / "user", "--data")]),
            "lies inside the input folder of --data",
        ),
        (lambda w: guard_file(w / "data.jsonl", "--out"), "already exists"),
        (lambda w: guard_file(w / "user", "--out"), "is a folder; give a file path"),
        (lambda w: guard_file(w / "data.jsonl" / "x", "--out"), "is a file, not a folder"),
        (
            lambda w: guard_file(w / "model" / "x.jsonl", "--out", overwrite=True),
            "lies inside the model folder",
        ),
        (lambda w: guard_folder(w / "data.jsonl", "--out", "make-data"), "a folder is expected"),
        (lambda w: guard_folder(w / "user", "--out", "make-data"), "already holds files"),
        (lambda w: guard_folder(w / "model" / "merged", "--out", "merge"), "lies inside the model"),
        (
            lambda w: guard_folder(w, "--out", "make-data", [(w / "data.jsonl", "--data")]),
            "holds the input of --data",
        ),
    ],
    ids=[
        "file-is-input",
        "file-in-input-folder",
        "file-exists",
        "file-is-folder",
        "file-below-file",
        "file-in-model",
        "folder-is-file",
        "folder-of-others",
        "folder-in-model",
        "folder-holds-input",
    ],
)
def test_outputs_that_would_harm_are_refused_before_anything_is_written(world, check, message):
    before = files(world)
    with pytest.raises(UserError, match=message):
        check(world)
    assert files(world) == before


def test_what_the_guard_lets_through(world):
    assert guard_file(world / "new.jsonl", "--out") == world / "new.jsonl"
    assert guard_file(world / "data.jsonl", "--out", overwrite=True) == world / "data.jsonl"
    assert guard_folder(world / "user", "--out", "make-data", overwrite=True) == world / "user"
    made = world / "made"
    guard_folder(made, "--out", "make-data")
    mark_folder(made, "make-data")
    (made / "train.jsonl").write_text("{}\n", encoding="utf-8")
    assert guard_folder(made, "--out", "make-data") == made  # its own folder again
    with pytest.raises(UserError, match="already holds files this command did not write"):
        guard_folder(made, "--out", "merge")
    assert protected_kind(world / "model") == "model folder" and protected_kind(made) is None
