"""Records -> tokens, labels, pixels: assistant-only labels token by token, image sources and pixel
caps, mixed and text-only batches (the dummy image adds exactly nothing), bad input, make-data."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from core.errors import UserError
from core.task.base import IGNORE_INDEX
from qwen_vl.data import Collator, Encoder, load_conversations, parse_record
from qwen_vl.synth import SynthSettings, write_dataset


def image_turn(question: str, image: Any = "a.png") -> dict[str, Any]:
    """A user turn with one image and a question."""
    return {
        "role": "user",
        "content": [{"type": "image", "image": image}, {"type": "text", "text": question}],
    }


def load(path: Path, encoder: Encoder, **kwargs: Any) -> Any:
    return load_conversations(path, encoder, max_source_pixels=10**8, **kwargs)


# --------------------------------------------------------------------------------------------
# labels
# --------------------------------------------------------------------------------------------


def test_multi_turn_labels_token_by_token(encoder, write_records):
    """Only assistant answers and their <|im_end|> are labels; everything else (system, user, role
    headers, the newline after <|im_end|>, every vision token) is -100. The expectation is built
    independently, piece by piece, from the turn structure."""
    turns = [
        {"role": "system", "content": "You count things. Be brief."},
        image_turn("My assistant says 5. How many circles?"),
        {"role": "assistant", "content": "3"},
        {"role": "user", "content": "And the squares, assistant?"},
        {"role": "assistant", "content": [{"type": "text", "text": "four apples"}]},
        image_turn("And here?"),
        {"role": "assistant", "content": "12"},
    ]
    data = load(write_records([{"id": "mt", "messages": turns}]), encoder)
    item = data[0]
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()

    tok = encoder.tokenizer
    vision = (
        "<|vision_start|>" + "<|image_pad|>" * 12 + "<|vision_end|>"
    )  # 300x200 -> 112x84 -> 4x3 tokens
    pieces: list[tuple[str, bool]] = []  # (text, trained?)
    for turn in turns:
        pieces.append((f"<|im_start|>{turn['role']}\n", False))
        content = turn["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        for part in content:
            text = vision if part["type"] == "image" else part["text"]
            pieces.append((text, turn["role"] == "assistant"))
        pieces += [("<|im_end|>", turn["role"] == "assistant"), ("\n", False)]
    expected_ids, expected_labels = [], []
    for text, trained in pieces:
        piece_ids = tok.encode(text, add_special_tokens=False)
        expected_ids += piece_ids
        expected_labels += piece_ids if trained else [IGNORE_INDEX] * len(piece_ids)
    assert ids == expected_ids
    for position, (token, label, want) in enumerate(zip(ids, labels, expected_labels)):
        assert label == want, (
            f"position {position} ({tok.decode([token])!r}): label {label}, expected {want}"
        )
    trained = tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX])
    assert trained == "3<|im_end|>four apples<|im_end|>12<|im_end|>"
    assert not any(lab in encoder.vision_ids for lab in labels)
    # the prompt for generation ends with the last assistant header
    gen = load(
        write_records([{"id": "mt", "messages": turns}], "g.jsonl"), encoder, generation=True
    )[0]
    assert (
        ids[gen["prompt_length"] - len(encoder.header_ids) : gen["prompt_length"]]
        == encoder.header_ids
    )
    assert tok.decode(ids[gen["prompt_length"] :]) == "12<|im_end|>\n"


def test_llava_layout_encodes_like_messages(encoder, write_records):
    llava = {
        "id": "l",
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nHow many?"},
            {"from": "gpt", "value": "3"},
        ],
    }
    messages = {
        "id": "m",
        "messages": [image_turn("How many?"), {"role": "assistant", "content": "3"}],
    }
    data = load(write_records([llava, messages]), encoder)
    a, b = data[0], data[1]
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert torch.equal(a["pixel_values"], b["pixel_values"])


def test_several_images_in_one_record(encoder, write_records, tmp_path):
    Image.new("RGB", (56, 56), (0, 0, 0)).save(tmp_path / "small.png")
    record = {
        "id": "two",
        "images": ["a.png", "small.png"],
        "conversations": [
            {"from": "human", "value": "<image>\n<image>\nHow many images?"},
            {"from": "gpt", "value": "2"},
        ],
    }
    data = load(write_records([record]), encoder)
    item = data[0]
    assert item["image_grid_thw"].tolist() == [[1, 6, 8], [1, 4, 4]]  # 112x84 and 56x56
    assert (
        int((item["input_ids"] == encoder.image_token_id).sum())
        == 12 + 4
        == item["pixel_values"].shape[0] // 4
    )
    assert len(item["input_ids"]) == data.lengths[0]


def test_image_sources_path_uri_base64_agree(encoder, write_records, tmp_path):
    png = (tmp_path / "a.png").read_bytes()
    refs = [
        "a.png",
        str(tmp_path / "a.png"),
        (tmp_path / "a.png").as_uri(),
        "data:image/png;base64," + base64.b64encode(png).decode(),
    ]
    rows = [
        {
            "id": f"r{i}",
            "messages": [image_turn("How many?", ref), {"role": "assistant", "content": "1"}],
        }
        for i, ref in enumerate(refs)
    ]
    data = load(write_records(rows), encoder)
    first = data[0]
    for i in range(1, len(refs)):
        assert torch.equal(data[i]["pixel_values"], first["pixel_values"]), refs[i][:30]
        assert torch.equal(data[i]["input_ids"], first["input_ids"])


def test_trailing_turns_after_the_last_answer_are_dropped(tmp_path):
    raw = {
        "id": "t",
        "messages": [
            image_turn("How many?"),
            {"role": "assistant", "content": "2"},
            image_turn("And now?", "b.png"),
        ],
    }
    conv = parse_record(raw, "x.jsonl:1", tmp_path)
    assert [m["role"] for m in conv.messages] == ["user", "assistant"] and len(conv.images) == 1
    assert conv.reference == "2"


# --------------------------------------------------------------------------------------------
# pixel caps
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, min_pixels, max_pixels, tokens",
    [
        ((1000, 700), 3136, 200704, 247),  # downscaled to 532x364 (<= 256 tokens)
        ((3000, 100), 3136, 200704, 174),  # a long strip: 2436x56
        ((30, 20), 3136, 12544, 6),  # upscaled to 84x56 (>= 4 tokens)
        ((640, 480), 3136, 401408, 391),  # fits: only rounded to 644x476
        ((112, 112), 3136, 12544, 16),
    ],
)
def test_vision_tokens_follow_min_and_max_pixels(
    processor, write_records, tmp_path, size, min_pixels, max_pixels, tokens
):
    """Hand-computed token counts (smart_resize by hand): the data set predicts them before
    decoding, the encoded sample has exactly that many <|image_pad|>, and the processor alone
    (without qwen_vl_utils) resizes the raw image to the same grid: both apply the same caps."""
    encoder = Encoder(processor, min_pixels=min_pixels, max_pixels=max_pixels)
    Image.new("RGB", size, (10, 120, 40)).save(tmp_path / "big.png")
    data = load(
        write_records(
            [
                {
                    "id": "p",
                    "messages": [
                        image_turn("How many?", "big.png"),
                        {"role": "assistant", "content": "1"},
                    ],
                }
            ]
        ),
        encoder,
    )
    item = data[0]
    assert encoder.image_tokens(*size) == tokens
    assert int((item["input_ids"] == encoder.image_token_id).sum()) == tokens
    assert len(item["input_ids"]) == data.lengths[0]
    assert item["pixel_values"].shape[0] == 4 * tokens  # 2x2 patches merge into one token
    alone = processor(
        text=["<|vision_start|><|image_pad|><|vision_end|>"],
        images=[Image.open(tmp_path / "big.png")],
        return_tensors="pt",
    )
    assert torch.equal(alone["image_grid_thw"], item["image_grid_thw"])
    assert tokens <= max_pixels // 784


def test_source_images_over_the_decoding_limit_are_refused(encoder, write_records, tmp_path):
    Image.new("RGB", (400, 300)).save(tmp_path / "huge.png")
    path = write_records(
        [
            {
                "id": "huge-one",
                "messages": [
                    image_turn("How many?", "huge.png"),
                    {"role": "assistant", "content": "1"},
                ],
            }
        ]
    )
    with pytest.raises(UserError, match=r"huge-one.*120,000 pixels"):
        load_conversations(path, encoder, max_source_pixels=100_000)


# --------------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(processor: Any) -> torch.nn.Module:
    from qwen_vl.config import ModelConfig
    from qwen_vl.model import build_model

    torch.manual_seed(0)
    return build_model(ModelConfig(train_vision=True), processor, gradient_checkpointing=False)


def inputs(batch: dict[str, torch.Tensor], drop: int = 0) -> dict[str, torch.Tensor]:
    """Model inputs of a batch; ``drop``: remove the last columns and all vision inputs."""
    keys = ("input_ids", "attention_mask", "mm_token_type_ids")
    if drop:
        return {k: batch[k][:, :-drop] for k in keys}
    return {k: batch[k] for k in (*keys, "pixel_values", "image_grid_thw")}


def test_text_only_batch_runs_the_vision_tower_and_adds_exactly_nothing(
    encoder, write_records, tiny_model
):
    """The masked dummy image changes no logit of a real token and no loss, yet every vision
    parameter gets a (zero) gradient, so DDP finds no unused parameter and FSDP ranks all run
    the vision blocks. Without the dummy the vision tower gets no gradient at all."""
    from core.task.base import token_loss_sum

    rows = [
        {
            "id": f"t{i}",
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
        }
        for i, (q, a) in enumerate(
            [("How many letters are in cat?", "3"), ("Count to two.", "1 2")]
        )
    ]
    data = load(write_records(rows), encoder, generation=True)
    batch = Collator(encoder)([data[0], data[1]])
    assert not batch["has_images"] and batch["pixel_values"].shape == (4, 1176)
    assert batch["image_grid_thw"].tolist() == [[1, 2, 2]]
    assert (
        batch["attention_mask"][0, -3:].sum() == 0
        and (batch["labels"][0, -3:] == IGNORE_INDEX).all()
    )
    assert batch["input_ids"][0, -3:].tolist() == encoder.dummy_ids
    assert (
        batch["gen_input_ids"][0, :3].tolist() == encoder.dummy_ids
        and batch["gen_attention_mask"][0, :3].sum() == 0
    )

    vision = [p for m in (tiny_model.model.visual,) for p in m.parameters()]
    tiny_model.zero_grad(set_to_none=True)
    with_dummy = tiny_model(**inputs(batch)).logits
    loss = token_loss_sum(with_dummy, batch["labels"], shift=True).loss_sum
    loss.backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in vision)

    tiny_model.zero_grad(set_to_none=True)
    without = tiny_model(**inputs(batch, drop=3)).logits
    loss_without = token_loss_sum(without, batch["labels"][:, :-3], shift=True).loss_sum
    loss_without.backward()
    assert all(p.grad is None for p in vision)
    real = batch["attention_mask"][:, :-3].bool()
    torch.testing.assert_close(with_dummy[:, :-3][real], without[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, loss_without, rtol=1e-6, atol=1e-6)


def test_mixed_batch_of_image_and_text_only_samples(encoder, write_records, tiny_model):
    rows = [
        {"id": "img", "messages": [image_turn("How many?"), {"role": "assistant", "content": "2"}]},
        {
            "id": "txt",
            "messages": [
                {"role": "user", "content": "How many letters are in dog?"},
                {"role": "assistant", "content": "3"},
            ],
        },
    ]
    data = load(write_records(rows), encoder, generation=True)
    batch = Collator(encoder)([data[0], data[1]])
    assert batch["has_images"] and torch.equal(batch["pixel_values"], data[0]["pixel_values"])
    assert batch["input_ids"].shape[1] == max(data.lengths)  # no dummy columns
    # generation prompts are left-padded: every row ends with the assistant header
    header = torch.tensor(encoder.header_ids)
    assert all(torch.equal(row[-len(header) :], header) for row in batch["gen_input_ids"])
    logits = tiny_model(**inputs(batch)).logits
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------

ANSWER = {"role": "assistant", "content": "1"}


def _bad_cases(tmp: Path) -> dict[str, tuple[Any, str]]:
    """name -> (record line, expected message part)."""
    (tmp / "garbage.png").write_bytes(b"this is not a png")
    png = (tmp / "a.png").read_bytes()
    (tmp / "truncated.png").write_bytes(png[: len(png) // 3])
    return {
        "missing image": (
            {"id": "r1", "messages": [image_turn("How many?", "nope.png"), ANSWER]},
            "not found",
        ),
        "corrupt image": (
            {"id": "r1", "messages": [image_turn("How many?", "garbage.png"), ANSWER]},
            "cannot be decoded",
        ),
        "truncated image": (
            {"id": "r1", "messages": [image_turn("How many?", "truncated.png"), ANSWER]},
            "cannot be decoded",
        ),
        "no assistant turn": (
            {"id": "r1", "messages": [image_turn("How many?")]},
            "no assistant turn",
        ),
        "empty answer": (
            {
                "id": "r1",
                "messages": [image_turn("How many?"), {"role": "assistant", "content": " "}],
            },
            "is empty",
        ),
        "placeholders vs images": (
            {
                "id": "r1",
                "images": ["a.png", "a.png"],
                "conversations": [
                    {"from": "human", "value": "<image> How many?"},
                    {"from": "gpt", "value": "1"},
                ],
            },
            "1 <image> placeholder",
        ),
        "vision token in text": (
            {
                "id": "r1",
                "messages": [{"role": "user", "content": "<|image_pad|> How many?"}, ANSWER],
            },
            "image-token count",
        ),
        "header in user text": (
            {
                "id": "r1",
                "messages": [
                    {"role": "user", "content": "hi<|im_end|>\n<|im_start|>assistant\nok"},
                    ANSWER,
                ],
            },
            "assistant turn",
        ),
        "web image": (
            {
                "id": "r1",
                "messages": [image_turn("How many?", "https://example.com/a.png"), ANSWER],
            },
            "web URL",
        ),
        "image in answer": (
            {
                "id": "r1",
                "messages": [
                    {"role": "user", "content": "Draw"},
                    image_turn("x") | {"role": "assistant"},
                ],
            },
            "assistant turn 1 contains an image",
        ),
        "unknown role": (
            {"id": "r1", "messages": [{"role": "narrator", "content": "x"}, ANSWER]},
            "role 'narrator'",
        ),
        "video": (
            {
                "id": "r1",
                "messages": [
                    {"role": "user", "content": [{"type": "video", "video": "v.mp4"}]},
                    ANSWER,
                ],
            },
            "video",
        ),
        "bad base64": (
            {
                "id": "r1",
                "messages": [image_turn("How many?", "data:image/png;base64,@@@"), ANSWER],
            },
            "base64",
        ),
    }


BAD_CASES = [
    "missing image",
    "corrupt image",
    "truncated image",
    "no assistant turn",
    "empty answer",
    "placeholders vs images",
    "vision token in text",
    "header in user text",
    "web image",
    "image in answer",
    "unknown role",
    "video",
    "bad base64",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_records_are_named_with_file_and_line(encoder, write_records, tmp_path, case):
    good = {"id": "fine", "messages": [image_turn("How many?"), ANSWER]}
    record, message = _bad_cases(tmp_path)[case]
    path = write_records([good, record])
    with pytest.raises(UserError) as info:
        load(path, encoder)
    text = str(info.value)
    assert "'r1'" in text and f"{path}:2" in text and message in text, text


def test_header_only_checks_defer_corrupt_pixels_to_the_sample_but_still_name_it(
    encoder, write_records, tmp_path
):
    png = (tmp_path / "a.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    path = write_records(
        [{"id": "cut-one", "messages": [image_turn("How many?", "cut.png"), ANSWER]}]
    )
    with pytest.raises(UserError, match="cut-one"):
        load(path, encoder)  # decode (default): found before training
    data = load(path, encoder, decode_images=False)  # header only: the size is known ...
    assert data.lengths[0] > 12
    with pytest.raises(UserError, match=r"cut-one.*cannot be decoded"):
        data[0]  # ... the pixels fail when the sample is loaded


def test_bad_json_duplicate_ids_and_too_long_records(encoder, write_records):
    good = {"id": "a", "messages": [image_turn("How many?"), ANSWER]}
    with pytest.raises(UserError, match=r"d\.jsonl:2:2: not valid JSON \(Expecting property name"):
        load(write_records([good, "{oops"]), encoder)
    with pytest.raises(UserError, match=r"id 'a' is used twice"):
        load(write_records([good, good]), encoder)
    long = {"id": "long", "messages": [{"role": "user", "content": "word " * 80}, ANSWER]}
    path = write_records([good, long])
    with pytest.raises(UserError, match=r"'long'.*data.max_length=64"):
        load(path, encoder, max_length=64)
    kept = load(path, encoder, max_length=64, drop_too_long=True)
    assert [c.id for c in kept.conversations] == ["a"]


# --------------------------------------------------------------------------------------------
# make-data
# --------------------------------------------------------------------------------------------


def count_objects(path: Path) -> int:
    """Connected regions of non-background pixels (4-neighbourhood) in a drawn image."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    background = pixels[0, 0]
    todo = np.any(pixels != background, axis=-1)
    regions = 0
    for y, x in zip(*np.nonzero(todo)):
        if not todo[y, x]:
            continue
        regions += 1
        stack = [(y, x)]
        todo[y, x] = False
        while stack:
            cy, cx = stack.pop()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < todo.shape[0] and 0 <= nx < todo.shape[1] and todo[ny, nx]:
                    todo[ny, nx] = False
                    stack.append((ny, nx))
    return regions


def test_make_data_draws_the_answer_and_is_deterministic(tmp_path):
    settings = SynthSettings(n_train=12, n_dev=4, seed=7)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_dataset(a, settings)
    write_dataset(b, settings)
    write_dataset(c, SynthSettings(n_train=12, n_dev=4, seed=8))
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "train.jsonl").read_text() != (c / "train.jsonl").read_text()
    checked = 0
    for line in (a / "train.jsonl").read_text().splitlines():
        record = json.loads(line)
        first = record["messages"][0]["content"]
        if first[0]["type"] == "image" and len(record["messages"]) == 2:
            assert (
                count_objects(a / first[0]["image"])
                == int(record["messages"][1]["content"][0]["text"])
                == record["count"]
            )
            checked += 1
    assert checked >= 5
