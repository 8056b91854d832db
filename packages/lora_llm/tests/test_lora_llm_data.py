"""Records, templates, masking, EOS, truncation, bad records, packing and collation (no model)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from core.errors import UserError
from core.task.base import IGNORE_INDEX
from core.task.batching import PackedDataset, pack
from core.task.batching import collate_causal as collate
from core.task.records import split_holdout as split_records
from core.task.response_encoder import encode_records
from lora_llm.config import DataConfig
from lora_llm.data import (
    PROMPTS,
    Encoder,
    Record,
    SFTDataset,
    is_korean,
    parse_record,
    read_records,
)
from lora_llm.model import TINY_TOKENIZER


def write_jsonl(path: Path, rows: list) -> Path:
    """Write raw lines (dicts as JSON, strings as they are)."""
    path.write_text(
        "\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows)
        + "\n",
        encoding="utf-8",
    )
    return path


def pieces(tokenizer, *texts: str) -> list[int]:
    """Token ids of texts encoded one by one without special tokens, concatenated."""
    return [t for text in texts for t in tokenizer.encode(text, add_special_tokens=False)]


def test_alpaca_prompt_is_masked_and_eos_is_trained_token_by_token(tokenizer):
    record = Record(
        source="t", instruction="Add the numbers.", input="2 and 3", output="The sum is 5."
    )
    example = Encoder(tokenizer, "auto", 256).encode(record)
    prompt = PROMPTS["alpaca"]["input"].format(instruction="Add the numbers.", input="2 and 3")
    prompt_ids = [tokenizer.bos_token_id] + pieces(tokenizer, prompt)
    response_ids = pieces(tokenizer, "The sum is 5.") + [tokenizer.eos_token_id]
    assert example["input_ids"] == prompt_ids + response_ids
    assert example["labels"] == [IGNORE_INDEX] * len(prompt_ids) + response_ids
    assert example["prompt_tokens"] == len(prompt_ids) and example["response_tokens"] == len(
        response_ids
    )
    assert tokenizer.decode(response_ids) == "The sum is 5.</s>"
    # Without an input the shorter prompt is used.
    no_input = Encoder(tokenizer, "alpaca", 256).encode(
        Record(source="t", instruction="Say hi.", output="Hi!")
    )
    assert tokenizer.decode(no_input["input_ids"]).startswith(
        "<s>Below is an instruction that describes a task. Write"
    )
    assert "### Input:" not in tokenizer.decode(no_input["input_ids"])


def test_korean_records_get_the_korean_prompt(tokenizer):
    assert is_korean("대한민국의 수도는 어디인가요?") and not is_korean(
        "What is the capital of Korea?"
    )
    encoder = Encoder(tokenizer, "auto", 256)
    example = encoder.encode(Record(source="t", instruction="한국의 수도는?", output="서울입니다."))
    text = tokenizer.decode(example["input_ids"][: example["prompt_tokens"]])
    assert text == "<s>" + PROMPTS["alpaca_ko"]["no_input"].format(instruction="한국의 수도는?")
    assert (
        tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX]) == "서울입니다.</s>"
    )
    # data.template=alpaca forces the English prompt even for Korean text.
    forced = Encoder(tokenizer, "alpaca", 256).encode(
        Record(source="t", instruction="한국의 수도는?", output="서울")
    )
    assert "### Instruction:" in tokenizer.decode(forced["input_ids"])


def test_eos_is_trained_when_pad_equals_eos(tokenizer):
    pad_is_eos = type(tokenizer).from_pretrained(TINY_TOKENIZER)
    pad_is_eos.pad_token = pad_is_eos.eos_token
    eos = pad_is_eos.eos_token_id
    assert pad_is_eos.pad_token_id == eos
    encoder = Encoder(pad_is_eos, "alpaca", 256)
    short = encoder.encode(Record(source="a", instruction="Say yes.", output="Yes."))
    long = encoder.encode(
        Record(
            source="b",
            instruction="Say a longer sentence, please.",
            output="This is a longer sentence.",
        )
    )
    batch = collate(
        [SFTDataset([short, long])[0], SFTDataset([short, long])[1]], pad_is_eos.pad_token_id
    )
    n = len(short["input_ids"])
    assert batch["input_ids"].shape == (2, len(long["input_ids"]))
    # The short sample's own EOS: attended and trained ...
    assert (
        batch["input_ids"][0, n - 1] == eos
        and batch["attention_mask"][0, n - 1] == 1
        and batch["labels"][0, n - 1] == eos
    )
    # ... while the padding after it (the same token id) is neither.
    assert (batch["input_ids"][0, n:] == eos).all() and (batch["attention_mask"][0, n:] == 0).all()
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()
    # The loss counts both EOS tokens (shifted labels, as the trainer counts them).
    trained = batch["labels"][:, 1:]
    assert int((trained == eos).sum()) == 2


def test_chat_records_train_every_assistant_turn_and_nothing_else(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    encoder = Encoder(tokenizer, "auto", 256)
    example = encoder.encode(parse_record({"messages": messages}, "t"))
    assert encoder.chat_source == "builtin" and example["style"] == "chat"
    render = tokenizer.apply_chat_template
    p1 = render(messages[:2], tokenize=False, add_generation_prompt=True)
    f1 = render(messages[:3], tokenize=False)
    p2 = render(messages[:4], tokenize=False, add_generation_prompt=True)
    f2 = render(messages, tokenize=False)
    assert f2.startswith(p2) and p2.startswith(f1) and f1.startswith(p1)
    ids = pieces(tokenizer, p1, f1[len(p1) :], p2[len(f1) :], f2[len(p2) :])
    assert (
        example["input_ids"] == ids
    )  # the built-in template starts with BOS and ends turns with EOS
    trained = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "Hello!</s>Goodbye.</s>"
    assert trained.count(tokenizer.eos_token_id) == 2
    assert tokenizer.decode(example["input_ids"]).startswith(
        "<s>### System:\nBe brief.\n\n### User:\nHi there\n\n### Assistant:\nHello!</s>"
    )


def test_a_tokenizers_own_chat_template_is_used_and_eos_appended(tokenizer):
    chatml = type(tokenizer).from_pretrained(TINY_TOKENIZER)
    chatml.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% "
        "endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    encoder = Encoder(chatml, "auto", 256)
    example = encoder.encode(Record(source="t", instruction="Name a color.", output="Blue."))
    assert encoder.chat_source == "tokenizer" and example["style"] == "chat"
    prompt = "<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\n"
    assert chatml.decode(example["input_ids"][: example["prompt_tokens"]]) == prompt
    assert (
        chatml.decode([t for t in example["labels"] if t != IGNORE_INDEX])
        == "Blue.<|im_end|>\n</s>"
    )


def test_train_on_prompt_labels_every_token(tokenizer):
    example = Encoder(tokenizer, "alpaca", 256, train_on_prompt=True).encode(
        Record(source="t", instruction="Hi", output="Hello")
    )
    assert example["labels"] == example["input_ids"]


def test_long_responses_are_cut_counted_and_reported(tokenizer):
    encoder = Encoder(tokenizer, "alpaca", 64, min_response_tokens=8)
    record = Record(
        source="f.jsonl:3", instruction="Tell a story.", output="Once upon a time " * 30
    )
    full = Encoder(tokenizer, "alpaca", 4096).encode(record)
    examples, stats = encode_records(
        [record, Record(source="x", instruction="Hi", output="Hello")], encoder
    )
    cut = examples[0]
    assert len(cut["input_ids"]) == 64 and cut["input_ids"] == full["input_ids"][:64]
    assert cut["labels"][-1] != tokenizer.eos_token_id  # a cut response does not pretend to end
    assert (
        cut["response_tokens"] + cut["cut_tokens"] == full["response_tokens"]
        and cut["response_tokens"] >= 8
    )
    summary = stats.summary(64)
    assert (
        summary["truncated_samples"] == 1
        and summary["response_tokens_cut"] == cut["cut_tokens"] > 0
    )
    assert summary["samples"] == 2 and summary["lengths"]["total"]["max"] == 64
    assert "1 responses truncated" in stats.describe("train")


def test_a_prompt_longer_than_max_length_is_an_error_or_skipped_and_counted(tmp_path, tokenizer):
    data = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"instruction": "Say hi.", "output": "Hi"},
            {"instruction": "Summarize: " + "very long text " * 40, "output": "Short."},
        ],
    )
    records, _ = read_records(str(data), DataConfig())
    encoder = Encoder(tokenizer, "alpaca", 64)
    with pytest.raises(
        UserError, match=r"d\.jsonl:2: the prompt has \d+ tokens.*data\.long_prompts=skip"
    ):
        encode_records(records, encoder, "error")
    examples, stats = encode_records(records, encoder, "skip")
    assert (
        len(examples) == 1
        and stats.long_prompts_skipped == 1
        and stats.summary(64)["long_prompts_skipped"] == 1
    )


def test_bad_records_name_their_line_and_can_be_skipped(tmp_path):
    data = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"instruction": "Good", "output": "Fine"},
            '{"instruction": "broken", "output": ',
            {"instruction": "No output here"},
            {"instruction": "Empty", "input": "", "output": "   "},
            {"instruction": "Number", "output": 42},
            {"messages": [{"role": "user", "content": "Only a question"}]},
            {
                "messages": [
                    {"role": "robot", "content": "?"},
                    {"role": "assistant", "content": "!"},
                ]
            },
            ["not", "an", "object"],
        ],
    )
    with pytest.raises(
        UserError,
        match=r"bad\.jsonl:2:37: not valid JSON \(Expecting "
        r"value\).*data\.on_bad_record=skip",
    ):
        read_records(str(data), DataConfig())
    records, problems = read_records(str(data), DataConfig(on_bad_record="skip"))
    assert [r.instruction for r in records] == ["Good"]
    expected = [
        "2:37: not valid JSON",
        "3: the record has no 'output'",
        "4: 'output' is empty",
        "5: 'output' must be text",
        "6: the last message must be the assistant",
        "7: message 0 must be",
        "8: a record must be a JSON object",
    ]
    assert len(problems) == len(expected)
    for problem, start in zip(problems, expected):
        assert f"bad.jsonl:{start}" in problem, problem


def test_json_arrays_report_the_line_of_a_bad_record(tmp_path):
    good = tmp_path / "a.json"
    good.write_text(
        '[\n {"instruction": "A", "output": "a"},\n\n {"instruction": "B",\n  "output": ""}\n]\n',
        encoding="utf-8",
    )
    with pytest.raises(UserError, match=r"a\.json:4 \(record 1\): 'output' is empty"):
        read_records(str(good), DataConfig())
    broken = tmp_path / "b.json"
    broken.write_text(
        '[\n {"instruction": "A", "output": "a"}\n {"instruction": "B", "output": "b"}\n]',
        encoding="utf-8",
    )
    with pytest.raises(UserError, match=r"b\.json:3: expected ',' or ']' between records"):
        read_records(str(broken), DataConfig())
    # 3,000 records two lines apart (record k starts on line 1 + 2k), a bad one last: its line is
    # counted past all the others.
    many = tmp_path / "many.json"
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(2999)] + [
        {"instruction": "last", "output": " "}
    ]
    many.write_text(json.dumps(rows, indent=None).replace("}, {", "},\n\n {"), encoding="utf-8")
    with pytest.raises(UserError, match=r"many\.json:5999 \(record 2999\): 'output' is empty"):
        read_records(str(many), DataConfig())
    with pytest.raises(UserError, match="does not exist"):
        read_records(str(tmp_path / "missing.jsonl"), DataConfig())
    with pytest.raises(UserError, match="sample:en, sample:ko"):
        read_records("sample:fr", DataConfig())


def test_shipped_samples_and_a_saved_dataset_folder_read_cleanly(tmp_path):
    import datasets

    english, problems = read_records("sample:en", DataConfig())
    korean, _ = read_records("sample:ko", DataConfig())
    assert len(english) == 300 and len(korean) == 48 and not problems
    assert all(is_korean(r.instruction) for r in korean)
    folder = tmp_path / "ds"
    datasets.Dataset.from_list([{"instruction": "Q", "output": "A", "url": "x"}] * 3).save_to_disk(
        str(folder)
    )
    rows, _ = read_records(str(folder), DataConfig())
    assert len(rows) == 3 and rows[0].output == "A" and rows[0].source.endswith("row 0")


def test_an_unreachable_hub_dataset_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.time()
    with pytest.raises(UserError, match="Cannot load the dataset 'someone/no-such-dataset'"):
        read_records("someone/no-such-dataset", DataConfig())
    assert time.time() - start < 30


def test_pretokenized_records_round_trip(tokenizer):
    example = Encoder(tokenizer, "alpaca", 256).encode(
        Record(source="t", instruction="Hi", output="Hello")
    )
    record = parse_record(
        {"input_ids": example["input_ids"], "labels": example["labels"], "text": "ignored"},
        "p.jsonl:1",
    )
    again = Encoder(tokenizer, "alpaca", 256).encode(record)
    assert again["input_ids"] == example["input_ids"] and again["labels"] == example["labels"]
    assert again["prompt_tokens"] == example["prompt_tokens"]
    with pytest.raises(ValueError, match="nothing to train on"):
        parse_record({"input_ids": [1, 2], "labels": [IGNORE_INDEX, IGNORE_INDEX]}, "p.jsonl:2")


def test_pack_fills_rows_without_overflow_and_deterministically():
    lengths = [50, 10, 40, 30, 60, 20, 90, 5, 5, 100]
    rows = pack(lengths, 100)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 100 for row in rows)
    assert len(rows) == 5  # 410 tokens in 5 rows of 100: as few as possible here
    assert pack(lengths, 100) == rows


def test_packed_rows_restart_positions_and_mask_each_first_label(tokenizer):
    encoder = Encoder(tokenizer, "alpaca", 128)
    examples, _ = encode_records(
        [
            Record(source=str(i), instruction=f"Count to {i}.", output=" ".join(map(str, range(i))))
            for i in range(1, 7)
        ],
        encoder,
    )
    packed = PackedDataset(examples, 128)
    assert len(packed) < len(examples)
    assert sum(packed.lengths()) == sum(len(e["input_ids"]) for e in examples)
    for r in range(len(packed)):
        item = packed[r]
        offset = 0
        for j in packed.rows[r]:
            n = len(examples[j]["input_ids"])
            assert item["position_ids"][offset : offset + n] == list(range(n))
            assert item["input_ids"][offset : offset + n] == examples[j]["input_ids"]
            assert (
                item["labels"][offset] == IGNORE_INDEX
                and item["labels"][offset + 1 : offset + n] == examples[j]["labels"][1:]
            )
            offset += n
    batch = collate([packed[0], packed[len(packed) - 1]], tokenizer.pad_token_id)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "index", "position_ids"}
    n_last = len(packed[len(packed) - 1]["input_ids"])
    width = batch["input_ids"].shape[1]
    assert batch["position_ids"][1, n_last:].tolist() == list(
        range(width - n_last)
    )  # padding: a segment of its own
    assert int(batch["attention_mask"].sum()) == len(packed[0]["input_ids"]) + n_last


def test_validation_split_is_seeded():
    records = [Record(source=str(i), instruction=str(i), output="x") for i in range(40)]
    train_a, val_a = split_records(records, 0.1, seed=1)
    train_b, val_b = split_records(records, 0.1, seed=1)
    _, val_c = split_records(records, 0.1, seed=2)
    assert (
        [r.source for r in val_a] == [r.source for r in val_b]
        and len(val_a) == 4
        and len(train_a) == 36
    )
    assert [r.source for r in val_a] != [r.source for r in val_c]
    assert (
        len(split_records(records, 5, seed=1)[1]) == 5
        and split_records(records, 0, seed=1)[1] == []
    )
