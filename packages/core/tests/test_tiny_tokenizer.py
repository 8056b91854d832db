"""The shared tiny-tokenizer builder: deterministic training, special-token ids, whole-kept
patterns, and the ``--check`` / ``--write`` command line that guards a shipped folder."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from core.task.tiny_tokenizer import (
    GPT2_PATTERN,
    RECORD,
    BpeRecipe,
    differing_files,
    main,
    save_fast,
    train_bpe,
    write_record,
)

TEXTS = ["#Person1#: Good morning, doctor.", "#Person2#: 안녕하세요, 어디가 아프세요?"] * 10
RECIPE = BpeRecipe(("<s>", "<pad>", "</s>"), 400, split=rf" ?#\w+#|{GPT2_PATTERN}")


def build(out_dir: Path, args: argparse.Namespace | None = None) -> Path:
    bpe = train_bpe(TEXTS, RECIPE)
    save_fast(bpe, out_dir, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    write_record(out_dir, bpe, RECIPE, [(Path(__file__), 1)], what="test")
    return out_dir


def test_training_is_deterministic_and_keeps_patterns_whole(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    one, two = build(tmp_path / "one"), build(tmp_path / "two")
    assert differing_files(one, two) == []
    tok = AutoTokenizer.from_pretrained(one)
    assert [tok.convert_tokens_to_ids(t) for t in ("<s>", "<pad>", "</s>")] == [0, 1, 2]
    ids = tok(TEXTS[1])["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[0] == "#Person2#" and tok.decode(ids) == TEXTS[1]
    assert (one / RECORD).is_file()


def test_differing_files_names_changed_and_one_sided_files(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        (folder / "same.json").write_text("1")
        (folder / RECORD).write_text(str(folder))  # a record is not compared
    (a / "changed.json").write_text("1")
    (b / "changed.json").write_text("2")
    (a / "only_a.json").write_text("1")
    assert differing_files(a, b) == ["changed.json", "only_a.json"]


def test_check_and_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shipped = build(tmp_path / "shipped")
    args = {"prog": "t", "description": "t", "shipped": shipped, "build": build}
    assert main(["--check"], **args) == 0
    (shipped / "tokenizer.json").write_text("{}")
    assert main(["--check"], **args) == 1
    assert "DIFFER" in capsys.readouterr().err
    assert main(["--write"], **args) == 0 and main(["--check"], **args) == 0
    tried = []
    assert main(["--out", str(tmp_path / "o")], **args, try_it=tried.append) == 0
    assert tried == [tmp_path / "o"] and (tmp_path / "o" / "tokenizer.json").is_file()
