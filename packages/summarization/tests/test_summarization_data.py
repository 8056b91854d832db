"""Reading and checking DialogSum rows, tokenising through datasets (cached), batching."""

from __future__ import annotations

import json
import time

import pytest
import torch

from core.errors import UserError
from core.task.base import IGNORE_INDEX
from summarization.config import SAMPLES, SHIPPED_TOKENIZER
from summarization.data import (
    Seq2SeqCollator,
    SummarizationDataset,
    lead_n,
    read_jsonl,
    read_scoring_file,
    tokenize_rows,
)

EN, KO = SAMPLES["en"], SAMPLES["ko"]


@pytest.fixture(scope="module")
def tokenizer():
    """The shipped byte-level BPE tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)


def test_shipped_samples_read_with_their_references():
    train, dev, test = (read_jsonl(EN / f) for f in ("train.jsonl", "dev.jsonl", "test.jsonl"))
    assert (len(train), len(dev), len(test)) == (500, 100, 50)
    assert all(len(r["references"]) == 1 for r in train + dev)
    assert all(len(r["references"]) == 3 for r in test)
    assert test[0]["fname"] == "test_0" and test[0]["references"][1].startswith(
        "In order to prevent"
    )
    korean = read_jsonl(KO / "train.jsonl")
    assert (
        len(korean) == 16 and "병원" in korean[0]["topic"] and "감기" in korean[0]["references"][0]
    )
    assert len(read_jsonl(KO / "test.jsonl")[0]["references"]) == 2


BAD_FILES = {
    "malformed JSON": (
        b'{"fname": "a", "dialogue": "x", "summary": "y"}\n{"fname": "b", "dialogue": "x" '
        b'"summary": "y"}\n',
        ":2:32: not valid JSON (Expecting ',' delimiter)",
    ),
    "missing field": (
        b'{"fname": "a", "dialogue": "x", "summary": "y"}\n\n{"fname": "b", "dialogue": "x"}\n',
        ":3: missing field 'summary'",
    ),
    "empty dialogue": (
        b'{"fname": "a", "dialogue": "  ", "summary": "y"}\n',
        ":1: field 'dialogue' is empty",
    ),
    "not UTF-8": (
        '{"fname": "a", "dialogue": "x", "summary": "y"}\n{"fname": "b", "dialogue": "안녕", '
        '"summary": "y"}\n'.encode("cp949"),
        ":2:29: not UTF-8 text (byte 0xbe)",
    ),
    "duplicate fname": (
        b'{"fname": "a", "dialogue": "x", "summary": "y"}\n{"fname": "a", "dialogue": "z", '
        b'"summary": "w"}\n',
        ":2: duplicate fname 'a'",
    ),
    "not an object": (b'["a", "b"]\n', ":1: expected a JSON object"),
    "empty reference": (
        b'{"fname": "a", "dialogue": "x", "summary1": "y", "summary2": ""}\n',
        ":1: field 'summary2' is empty",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_each_bad_line_names_file_and_line(tmp_path, case):
    content, expected = BAD_FILES[case]
    path = tmp_path / "rows.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        read_jsonl(path, "data.train_file")
    assert f"{path}{expected}" in str(err.value)


def test_missing_file_and_empty_file_name_the_key(tmp_path):
    with pytest.raises(UserError, match=r"'.*nope.jsonl' \(data.val_file\) does not exist"):
        read_jsonl(tmp_path / "nope.jsonl", "data.val_file")
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"'.*empty.jsonl' \(data.train_file\) holds no rows"):
        read_jsonl(tmp_path / "empty.jsonl", "data.train_file")
    with pytest.raises(UserError, match=r"'.*' \(data.train_file\) is a folder, not a file"):
        read_jsonl(tmp_path, "data.train_file")


def test_bom_and_blank_lines_are_accepted_and_fname_defaults_to_the_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(
        '\ufeff{"dialogue": "#Person1#: hi", "summary": "greeting"}\n\n{"fname": 7, "dialogue": '
        '"b", "summary": "c"}\n',
        encoding="utf-8",
    )
    rows = read_jsonl(path)
    assert [r["fname"] for r in rows] == ["x_1", "7"]


def test_scoring_files_accept_summary_or_numbered_references(tmp_path):
    path = tmp_path / "refs.jsonl"
    path.write_text(
        '{"fname": "a", "summary": "one"}\n{"fname": "b", "summary1": "two", "summary2": '
        '"three"}\n',
        encoding="utf-8",
    )
    assert read_scoring_file(path, "--references", references=True) == {
        "a": ["one"],
        "b": ["two", "three"],
    }
    path.write_text('{"summary": "one"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r":1: missing field 'fname'"):
        read_scoring_file(path, "--predictions", references=False)


def test_tokenisation_is_cached_truncated_and_ends_with_eos(tmp_path, tokenizer):
    rows = read_jsonl(EN / "dev.jsonl")[:40] + read_jsonl(KO / "dev.jsonl")
    start = time.perf_counter()
    first = tokenize_rows(
        rows, tokenizer, max_source_length=64, max_target_length=16, cache_dir=tmp_path
    )
    second = tokenize_rows(
        rows, tokenizer, max_source_length=64, max_target_length=16, cache_dir=tmp_path
    )
    assert first.cache_files[0]["filename"] == second.cache_files[0]["filename"]
    assert len(list(tmp_path.glob("tokens-*.arrow"))) == 1, (
        "the second call must reuse the cache file"
    )
    other = tokenize_rows(
        rows, tokenizer, max_source_length=32, max_target_length=16, cache_dir=tmp_path
    )
    assert (
        len(list(tmp_path.glob("tokens-*.arrow"))) == 2
        and other.cache_files[0]["filename"] != first.cache_files[0]["filename"]
    )
    data = SummarizationDataset(rows, second)
    assert time.perf_counter() - start < 30
    assert max(data.lengths()) == 64 and all(len(ids) <= 16 for ids in data.labels)
    assert all(ids[-1] == tokenizer.eos_token_id for ids in data.input_ids)
    item = data[40]
    assert item["index"] == 40 and "비" in tokenizer.decode(
        item["input_ids"], skip_special_tokens=True
    )


def test_shipped_tokenizer_keeps_speaker_tags_whole_and_round_trips(tokenizer):
    text = "#Person1#: Where's #Person3#?\n#Person2#: 그는 병원에 갔어요. #PersonN# said 42."
    ids = tokenizer(text)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert pieces[:3] == ["<s>", "#Person1#", ":"] and pieces[-1] == "</s>"
    assert "Ġ#Person3#" in pieces and "#Person2#" in pieces, pieces
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert (
        tokenizer.bos_token_id,
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
        tokenizer.mask_token_id,
    ) == (0, 1, 2, 4)


def test_prefix_changes_the_tokens(tmp_path, tokenizer):
    rows = read_jsonl(EN / "dev.jsonl")[:2]
    plain = SummarizationDataset(rows, tokenize_rows(rows, tokenizer, cache_dir=tmp_path))
    prefixed = SummarizationDataset(
        rows, tokenize_rows(rows, tokenizer, prefix="summarize: ", cache_dir=tmp_path)
    )
    assert tokenizer.decode(prefixed.input_ids[0], skip_special_tokens=True).startswith(
        "summarize: #Person1#"
    )
    assert len(prefixed.input_ids[0]) > len(plain.input_ids[0])


def test_collator_pads_dynamically_masks_labels_and_shifts_decoder_inputs():
    collate = Seq2SeqCollator(pad_token_id=1, decoder_start_token_id=2)
    batch = collate(
        [
            {"index": 5, "input_ids": [0, 11, 12, 2], "labels": [0, 21, 2]},
            {"index": 9, "input_ids": [0, 13, 2], "labels": [0, 22, 23, 24, 2]},
        ]
    )
    assert batch["input_ids"].tolist() == [[0, 11, 12, 2], [0, 13, 2, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[0, 21, 2, IGNORE_INDEX, IGNORE_INDEX], [0, 22, 23, 24, 2]]
    assert batch["decoder_input_ids"].tolist() == [[2, 0, 21, 2, 1], [2, 0, 22, 23, 24]]
    assert batch["index"].tolist() == [5, 9] and all(t.dtype == torch.long for t in batch.values())


def test_decoder_inputs_match_what_bart_builds_from_labels():
    from transformers.models.bart.modeling_bart import shift_tokens_right

    labels = torch.tensor([[0, 21, 2, IGNORE_INDEX], [0, 22, 23, 2]])
    batch = Seq2SeqCollator(1, 2)(
        [
            {"index": 0, "input_ids": [0, 2], "labels": [0, 21, 2]},
            {"index": 1, "input_ids": [0, 2], "labels": [0, 22, 23, 2]},
        ]
    )
    assert torch.equal(
        batch["decoder_input_ids"],
        shift_tokens_right(labels, pad_token_id=1, decoder_start_token_id=2),
    )


def test_lead_n_keeps_the_first_utterances():
    dialogue = "#Person1#: a\n#Person2#: b\n\n#Person1#: c\n#Person2#: d"
    assert lead_n(dialogue) == "#Person1#: a\n#Person2#: b\n#Person1#: c"
    assert lead_n(dialogue, 1) == "#Person1#: a"
    assert json.loads(json.dumps(lead_n("only one turn"))) == "only one turn"


def test_a_dataset_folder_loads_through_datasets_with_the_same_checks(tmp_path):
    from summarization.data import read_hub_split

    folder = tmp_path / "my_dialogsum"
    folder.mkdir()
    (folder / "train.jsonl").write_bytes((EN / "dev.jsonl").read_bytes())
    (folder / "validation.jsonl").write_text(
        '{"fname": "v0", "dialogue": "#Person1#: hi", "summary": "a greeting"}\n', encoding="utf-8"
    )
    rows = read_hub_split(str(folder), "train")
    assert (
        len(rows) == 100
        and rows[0]["fname"] == "dev_0"
        and rows[0]["references"] == read_jsonl(EN / "dev.jsonl")[0]["references"]
    )
    assert read_hub_split(str(folder), "validation")[0]["references"] == ["a greeting"]
    with pytest.raises(
        UserError,
        match=r"split 'test'\): ValueError: Unknown split \"test\"\. "
        r"Should be one of \['train', 'validation'\]",
    ):
        read_hub_split(str(folder), "test")
    (folder / "validation.jsonl").write_text(
        '{"fname": "v0", "dialogue": "", "summary": "a greeting"}\n', encoding="utf-8"
    )
    with pytest.raises(
        UserError, match=r".*my_dialogsum\[validation\] row 0: field 'dialogue' is empty"
    ):
        read_hub_split(str(folder), "validation")
