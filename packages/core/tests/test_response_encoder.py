"""Prompt + response encoding (core.task.response_encoder) and its report (core.task.encode_report):
labels on the response only, BOS the tokenizer's way, EOS trained, prompts cut or refused, the
counts of what was skipped and cut."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest

from core.errors import UserError
from core.task.base import IGNORE_INDEX
from core.task.encode_report import EncodeStats
from core.task.response_encoder import PROMPT_TAIL, PromptTooLong, ResponseEncoder, encode_records
from core.task.wordlevel import word_tokenizer

ROLES = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
WORDS = ["question answer " + " ".join(f"w{i}" for i in range(80))]


class Pairs(ResponseEncoder):
    """``question <q> answer`` (untrained) then ``<a>`` (trained)."""

    def segments(self, record: Any) -> list[tuple[str, bool]]:
        return [(f"question {record.q} answer", False), (record.a, True)]


def pair(source: str, q: int, a: int) -> SimpleNamespace:
    """A record of ``q`` prompt words and ``a`` answer words."""
    words = [f"w{i}" for i in range(80)]
    return SimpleNamespace(source=source, q=" ".join(words[:q]), a=" ".join(words[q : q + a]))


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """A word-level tokenizer that adds BOS by itself, as Llama's does."""
    return word_tokenizer(WORDS, ROLES, "<s> $A")


def test_labels_cover_the_response_and_eos_and_bos_comes_as_the_tokenizer_adds_it(tokenizer):
    encoder = Pairs(tokenizer, max_length=64)
    assert encoder.add_bos
    sample = encoder.encode(pair("f:1", 3, 2))
    ids, labels = sample["input_ids"], sample["labels"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert sample["prompt_tokens"] == 1 + 5 and sample["response_tokens"] == 3
    assert labels == [IGNORE_INDEX] * 6 + ids[6:]
    assert tokenizer.decode(ids[6:-1]) == "w3 w4"
    everything = Pairs(tokenizer, max_length=64, train_on_prompt=True).encode(pair("f:1", 3, 2))
    assert everything["labels"] == everything["input_ids"]
    tokenized = SimpleNamespace(source="f:2", input_ids=[5, 6, 7], labels=[IGNORE_INDEX, 6, 7])
    assert encoder.encode(tokenized)["style"] == "tokenized"


def test_long_responses_lose_their_end_and_long_prompts_are_refused_or_cut(tokenizer):
    encoder = Pairs(tokenizer, max_length=12, min_response_tokens=4)
    long = encoder.encode(pair("f:1", 2, 20))
    assert len(long["input_ids"]) == 12 and long["full_tokens"] == 1 + 4 + 20 + 1
    assert long["cut_tokens"] == long["full_tokens"] - 12 and long["response_tokens"] == 7
    with pytest.raises(PromptTooLong, match="f:2: the prompt has 13 tokens"):
        encoder.encode(pair("f:2", 10, 2))
    encoder.prompt_limit = 6
    cut = encoder.encode(pair("f:2", 10, 2))
    assert cut["prompt_tokens"] == 6 and cut["labels"][6:] == cut["input_ids"][6:]
    # the start and the end of the prompt are kept (the tail is at most half the room)
    assert cut["input_ids"][:3] == encoder.tokens(pair("f:2", 10, 2))[0][:3]
    assert tokenizer.decode(cut["input_ids"][3:6]) == "w8 w9 answer" and PROMPT_TAIL >= 3


def test_encode_records_skips_or_refuses_long_prompts_and_reports_the_counts(tokenizer, caplog):
    encoder = Pairs(tokenizer, max_length=12, min_response_tokens=4)
    records = [pair("f:1", 2, 2), pair("f:2", 10, 2), pair("f:3", 2, 20)]
    with pytest.raises(UserError, match="Prompt too long: f:2: .* data.long_prompts=skip"):
        encode_records(records, encoder, "error")
    examples, stats = encode_records(records, encoder, "skip", problems=["f:4: bad"])
    assert [e["source"] for e in examples] == ["f:1", "f:3"]
    report = stats.summary(12)
    assert (report["records_read"], report["samples"]) == (4, 2)
    assert (report["bad_records_skipped"], report["long_prompts_skipped"]) == (1, 1)
    assert report["truncated_samples"] == 1 and report["templates"] == {"text": 2}
    assert report["problems"][0] == "f:4: bad" and "f:2" in report["problems"][1]
    assert report["lengths"]["total"]["max"] == 12
    assert "skipped 1 bad, 1 with too-long prompts; 1 responses truncated" in stats.describe("x")
    assert stats.truncation(12, "samples").note().startswith("1 of 2 samples were longer")
    with caplog.at_level(logging.INFO):
        stats.log("train", 12, logging.getLogger("test"))
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == stats.describe("train") and len(lines) == 4
    assert lines[1].startswith("train: 1 of 2 responses were cut at data.max_length=12")
    assert lines[2:] == ["train: skipped: f:4: bad", f"train: skipped: {report['problems'][1]}"]


def test_an_empty_report_is_plain_data():
    report = EncodeStats().summary(8)
    assert report["samples"] == 0 and report["truncated_share"] == 0.0
    assert report["lengths"] == {"prompt": {}, "response": {}, "total": {}}
