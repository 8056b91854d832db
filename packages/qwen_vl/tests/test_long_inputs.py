"""Long prompts: ``infer`` cuts a question to the input limit (the run's data.max_length, the
model's positions less --max-new-tokens, or --max-input-tokens), images kept whole, with one note
saying how many prompts were cut and by how much. (A 229k-token prompt used to run for minutes.)

A tiny random Qwen2.5-VL with the shipped processor is saved with save_pretrained; the language
model's forward is hooked to record the sequence lengths it is given."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from PIL import Image

from qwen_vl.cli import evaluate, infer

pytestmark = pytest.mark.faults  # the fault suite (issue 20): uv run pytest -m faults

LONG = " ".join(f"w{i % 50}" for i in range(120_000))  # ~240k tokens of question


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model (8,192 positions) and its processor, saved as a model folder."""
    from qwen_vl.config import ModelConfig
    from qwen_vl.model import build_model, load_processor

    processor = load_processor(ModelConfig())
    model = build_model(ModelConfig(), processor, gradient_checkpointing=False)
    folder = tmp_path_factory.mktemp("tiny-qwen")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture
def seen_lengths(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sequence lengths of every forward of the language model (prefill, then each new token)."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

    lengths: list[int] = []
    original = qwen.Qwen2_5_VLTextModel.forward

    def forward(self, input_ids=None, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        embeds = kwargs.get("inputs_embeds")
        lengths.append((input_ids if input_ids is not None else embeds).shape[1])
        return original(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(qwen.Qwen2_5_VLTextModel, "forward", forward)
    return lengths


@pytest.mark.trains
def test_infer_cuts_a_very_long_question_to_the_model_limit(model_dir, capsys, seen_lengths):
    start = time.monotonic()
    code = infer(
        ["--model", str(model_dir), "--prompt", LONG, "--max-new-tokens", "2", "--device", "cpu"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.err.count("Note: 1 of 1 prompts were longer than 8,190 tokens") == 1
    assert "(the model's limit)" in captured.err and "longest: " in captured.err
    assert max(seen_lengths) <= 8190
    assert time.monotonic() - start < 120


@pytest.mark.trains
def test_infer_data_cuts_questions_keeps_images_and_notes_once(
    model_dir, tmp_path, capsys, seen_lengths
):
    Image.new("RGB", (56, 56), "white").save(tmp_path / "a.png")
    rows = [
        {"id": "long", "prompt": LONG[:20_000], "images": ["a.png"]},
        {"id": "short", "prompt": "How many circles?", "images": ["a.png"]},
        {"id": "long2", "prompt": LONG[:5_000]},
    ]
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    code = infer(
        ["--model", str(model_dir), "--data", str(data), "--max-new-tokens", "1"]
        + ["--device", "cpu", "--max-input-tokens", "96"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.err.count("Note: ") == 1
    assert "2 of 3 prompts were longer than 96 tokens (--max-input-tokens)" in captured.err
    assert len(captured.out.strip().splitlines()) == 3
    assert max(seen_lengths) <= 96


@pytest.mark.trains
def test_images_that_leave_no_room_are_refused(model_dir, tmp_path, capsys):
    Image.new("RGB", (112, 112), "white").save(tmp_path / "a.png")
    code = infer(
        ["--model", str(model_dir), "--prompt", LONG[:2000], "--image", str(tmp_path / "a.png")]
        + ["--device", "cpu", "--max-input-tokens", "8"]
    )
    assert code == 2
    assert "without any of its text" in capsys.readouterr().err


@pytest.mark.trains
def test_evaluate_cuts_a_long_question_instead_of_refusing_the_record(
    model_dir, tmp_path, capsys, seen_lengths
):
    Image.new("RGB", (56, 56), "white").save(tmp_path / "a.png")
    rows = [
        {
            "id": "long",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": "a.png"},
                        {"type": "text", "text": LONG[:30_000]},
                    ],
                },
                {"role": "assistant", "content": "3"},
            ],
        },
        {
            "id": "short",
            "messages": [
                {"role": "user", "content": "How many circles?"},
                {"role": "assistant", "content": "2"},
            ],
        },
    ]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "answers.jsonl"
    code = evaluate(
        ["--model", str(model_dir), "--data", str(data), "--out", str(out)]
        + ["trainer.accelerator=cpu", "generation.max_new_tokens=1", "data.max_length=128"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.err.count("1 of 2 records were longer than 128 tokens (data.max_length)") == 1
    assert len(out.read_text().splitlines()) == 2
    assert max(seen_lengths) <= 128
