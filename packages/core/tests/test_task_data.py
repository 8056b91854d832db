"""What task packages share for their data, tested once here: conversation turns in both layouts
and assistant-only labels (``core.task.chat``), images named by records (``core.task.images``),
token data sets, packing and collators (``core.task.batching``, ``core.nn.padding``), the cached
tokenisation (``core.task.token_cache``), object records, the hold-out split and length
percentiles."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import torch

from core.errors import UserError
from core.nn.padding import pad_fields
from core.task.base import IGNORE_INDEX
from core.task.batching import (
    PackedDataset,
    Seq2SeqCollator,
    TokenDataset,
    collate_causal,
    flatten_batch,
    pack,
)
from core.task.chat import (
    ChatReader,
    assistant_spans,
    build_labels,
    map_images,
    template_pieces,
    up_to_last_answer,
)
from core.task.images import image_sizes, load_image, resolve_image
from core.task.records import read_objects, split_holdout
from core.task.token_cache import cached_map, content_fingerprint
from core.task.truncation import length_stats


def reader(forbidden: tuple[str, ...] = ()) -> tuple[ChatReader, list[Any]]:
    """A reader that collects image references in the returned list."""
    images: list[Any] = []

    def add(ref: Any) -> dict[str, Any]:
        images.append(ref)
        return {"type": "image", "image": len(images) - 1}

    return ChatReader("record 'r' (d.jsonl:4)", add, forbidden), images


# --------------------------------------------------------------------------------------------
# chat
# --------------------------------------------------------------------------------------------


def test_messages_and_llava_layouts_read_to_the_same_messages():
    messages_reader, messages_images = reader()
    messages = messages_reader.read(
        {
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": "a.png"}, "How many?"]},
                {"role": "gpt", "content": "3"},
            ]
        }
    )
    llava_reader, llava_images = reader()
    llava = llava_reader.read(
        {
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nHow many?"},
                {"from": "assistant", "value": "3"},
            ],
        }
    )
    assert messages == llava and messages_images == llava_images == ["a.png"]
    assert messages[1] == {"role": "assistant", "content": [{"type": "text", "text": "3"}]}
    decoded = map_images(
        messages, lambda part: {"type": "image", "image": f"pixels {part['image']}"}
    )
    assert (
        decoded[0]["content"][0]["image"] == "pixels 0" and messages[0]["content"][0]["image"] == 0
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"text": "hi"}, "needs 'messages' (role/content turns) or 'conversations'"),
        ({"messages": []}, "'messages' must be a non-empty list of turns"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "turn 0 has role 'bot'"),
        ({"messages": [{"role": "user", "content": 3}]}, "turn 0 needs 'content' as a string"),
        ({"messages": [{"role": "user", "content": [{"video": "v.mp4"}]}]}, "has a video"),
        ({"messages": [{"role": "user", "content": "<|x|>"}]}, "contains the vision token <|x|>"),
        ({"messages": [{"role": "user", "content": "q"}], "image": "a.png"}, "has both"),
        ({"conversations": [{"from": "human", "value": "<image> q"}]}, "1 <image> placeholder"),
        ({"conversations": [{"from": "human", "value": 5}]}, "must have a string 'value'"),
    ],
)
def test_bad_turns_are_refused_with_the_record_name(raw, message):
    with pytest.raises(UserError, match="record 'r' \\(d.jsonl:4\\)") as err:
        reader(forbidden=("<|x|>",))[0].read(raw)
    assert message in str(err.value)


def test_up_to_last_answer_drops_trailing_turns_and_their_images():
    read, images = reader()
    messages = read.read(
        {
            "messages": [
                {"role": "system", "content": "Count."},
                {"role": "user", "content": [{"image": "a.png"}, "How many?"]},
                {"role": "assistant", "content": "3"},
                {"role": "user", "content": [{"image": "b.png"}, "And here?"]},
            ]
        }
    )
    kept, kept_images = up_to_last_answer(messages, images, read.name)
    assert [m["role"] for m in kept] == ["system", "user", "assistant"] and kept_images == ["a.png"]
    for turns, problem in (
        (messages[1:2], "has no assistant turn"),
        ([messages[1], messages[0], messages[2]], "turn 1 is a system turn"),
        ([messages[1], {"role": "assistant", "content": [{"type": "text", "text": " "}]}], "empty"),
    ):
        with pytest.raises(UserError, match=problem):
            up_to_last_answer(turns, images, read.name)


def test_assistant_spans_match_the_header_sequence_and_mask_untrained_ids():
    header, end = [1, 7], 2
    # user turn opening with 1 (the turn start alone) and holding 7 (the word "assistant")
    ids = [1, 8, 7, 2, 1, 7, 5, 9, 2, 1, 7, 6]
    spans = assistant_spans(ids, header, end)
    assert spans == [(6, 9), (11, 12)]  # the last answer is unterminated
    labels = build_labels(ids, spans, untrained={9})
    assert labels == [IGNORE_INDEX] * 6 + [5, IGNORE_INDEX, 2] + [IGNORE_INDEX] * 2 + [6]


def test_template_pieces_train_each_answer_and_refuse_a_non_incremental_template():
    def render(turns: list[dict[str, Any]], generation_prompt: bool) -> str:
        text = "".join(f"[{m['role']}]{m['content']}." for m in turns)
        return text + ("[assistant]" if generation_prompt else "")

    chat = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    pieces = template_pieces(render, chat)
    assert [text for text, trained in pieces if trained] == ["b.", "d."]
    assert "".join(text for text, _ in pieces) == render(chat, False)
    assert template_pieces(render, chat[:3])[-1] == ("[user]c.[assistant]", False)
    assert template_pieces(lambda turns, gen: str(len(turns)) + ("g" if gen else ""), chat) is None


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------


def test_image_references_resolve_open_and_are_refused_by_name(tmp_path):
    from PIL import Image

    Image.new("RGBA", (30, 20), (0, 0, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    data = base64.b64encode((tmp_path / "a.png").read_bytes()).decode()
    refs = ["a.png", f"file://{tmp_path}/a.png", {"url": f"data:image/png;base64,{data}"}]
    sources = [resolve_image(ref, tmp_path, "rec") for ref in refs]
    assert sources[0].path == sources[1].path == tmp_path / "a.png" and sources[2].data
    decoded = image_sizes(sources, "rec", 600, decode=True)
    assert decoded == image_sizes(sources, "rec", 600, decode=False)
    assert decoded[0] == (30, 20, (tmp_path / "a.png").stat().st_size)
    assert load_image(sources[2], "rec", 600).getpixel((0, 0)) == (255, 255, 255)  # on white
    for ref, problem in (
        ("https://host/a.png", "is a web URL"),
        ("data:image/png;base64,@@", "not valid base64"),
        ("data:text/plain,x", "must look like data:image/png;base64"),
        (3, "must be a non-empty string"),
    ):
        with pytest.raises(UserError, match=problem):
            resolve_image(ref, tmp_path, "rec")
    for ref, decode, problem in (
        ("missing.png", True, "not found"),
        ("broken.png", True, "cannot be decoded"),
        ("broken.png", False, "cannot be read"),
        ("a.png", True, "600 pixels, more than data.max_source_pixels=599"),
        ("a.png", False, "600 pixels, more than data.max_source_pixels=599"),
    ):
        with pytest.raises(UserError, match=f"rec: image '{ref}'.*{problem}"):
            image_sizes([resolve_image(ref, tmp_path, "rec")], "rec", 599, decode)


# --------------------------------------------------------------------------------------------
# data sets and batches
# --------------------------------------------------------------------------------------------


def test_causal_batches_mask_by_length_so_an_eos_equal_to_pad_is_trained():
    eos = pad = 0
    data = TokenDataset([[5, 6, eos], [7, eos]], [[IGNORE_INDEX, 6, eos], [7, eos]])
    assert data.lengths() == [3, 2] and data[1] == {
        "index": 1,
        "input_ids": [7, 0],
        "labels": [7, 0],
    }
    batch = collate_causal([data[0], data[1]], pad)
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 0], [7, 0, IGNORE_INDEX]]
    flat = flatten_batch(batch)
    assert flat["input_ids"].tolist() == [[5, 6, 0, 7, 0]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert flat["labels"].tolist() == [[IGNORE_INDEX, 6, 0, IGNORE_INDEX, 0]]


def test_packing_fills_rows_and_restarts_positions():
    lengths = [50, 10, 40, 30, 60, 20, 90, 5, 5, 100]
    rows = pack(lengths, 100)
    assert sorted(i for row in rows for i in row) == list(range(10)) and len(rows) == 5
    with pytest.raises(ValueError, match="more than the row capacity"):
        pack([101], 100)
    examples = [{"input_ids": [i] * n, "labels": [i] * n} for i, n in enumerate([3, 1, 2])]
    packed = PackedDataset(examples, 4)
    batch = collate_causal([packed[0], packed[1]], pad_id=9)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 0, 1]]
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, 0, 0, IGNORE_INDEX],
        [IGNORE_INDEX, 2] + [IGNORE_INDEX] * 2,
    ]


def test_seq2seq_decoder_inputs_are_the_labels_shifted_right():
    data = TokenDataset([[4, 5, 6], [7]], [[8, 9], [10, 11, 12]])
    batch = Seq2SeqCollator(pad_token_id=1, decoder_start_token_id=2)([data[0], data[1]])
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[8, 9, IGNORE_INDEX], [10, 11, 12]]
    assert batch["decoder_input_ids"].tolist() == [[2, 8, 9], [2, 10, 11]]


def test_pad_fields_pads_every_field_with_its_value_and_masks_by_length():
    items = [{"ids": [5, 6], "labels": [1, 2]}, {"ids": [8], "labels": [3]}]
    right = pad_fields(items, {"ids": 0, "labels": IGNORE_INDEX}, extra=1)
    assert list(right) == ["ids", "attention_mask", "labels"]
    assert right["labels"].tolist() == [[1, 2, IGNORE_INDEX], [3] + [IGNORE_INDEX] * 2]
    left = pad_fields(items, {"ids": 0}, left=True, prefix="gen_")
    assert left["gen_ids"].tolist() == [[5, 6], [0, 8]]
    assert left["gen_attention_mask"].dtype == torch.long
    assert left["gen_attention_mask"].tolist() == [[1, 1], [0, 1]]


def test_token_cache_is_reused_and_keyed_by_settings_and_texts(tmp_path: Path):
    calls = []

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        calls.append(len(batch["text"]))
        return {"n": [len(t) for t in batch["text"]]}

    key = content_fingerprint(["v1"], [["ab", "c"]])
    assert key == content_fingerprint(["v1"], [["ab", "c"]])
    assert (
        len(
            {
                key,
                content_fingerprint(["v2"], [["ab", "c"]]),
                content_fingerprint(["v1"], [["a", "bc"]]),
            }
        )
        == 3
    )
    first = cached_map({"text": ["ab", "c"]}, encode, key, tmp_path, "data.cache_dir", ["text"])
    again = cached_map({"text": ["ab", "c"]}, encode, key, tmp_path, "data.cache_dir", ["text"])
    assert first["n"] == again["n"] == [2, 1] and calls == [2]
    assert [p.name for p in tmp_path.glob("tokens-*.arrow")] == [f"tokens-{key}.arrow"]


# --------------------------------------------------------------------------------------------
# records and statistics
# --------------------------------------------------------------------------------------------


def test_read_objects_names_a_record_that_is_not_an_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(
        UserError, match=r"d\.jsonl:3: a record must be a JSON object with 'a', got list"
    ):
        read_objects(path, "--data", "rows", "'a'")


def test_split_holdout_is_seeded_and_keeps_a_training_record():
    items = list(range(40))
    train, val = split_holdout(items, 0.1, seed=1)
    assert (train, val) == split_holdout(items, 0.1, seed=1) and len(val) == 4
    assert val != split_holdout(items, 0.1, seed=2)[1] and train == sorted(train)
    assert len(split_holdout(items, 5, seed=1)[1]) == 5 and split_holdout(items, 0, seed=1)[1] == []
    assert split_holdout([1, 2], 0.9, seed=1)[0] and split_holdout([1], 0.5, seed=1) == ([1], [])


def test_length_stats():
    assert length_stats([]) == {}
    stats = length_stats([1, 2, 3, 10])
    assert stats == pytest.approx({"mean": 4.0, "p50": 2.5, "p90": 7.9, "p99": 9.79, "max": 10})
    assert isinstance(stats["max"], int)
