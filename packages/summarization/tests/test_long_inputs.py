"""Long dialogues: evaluate and predict cut them to the model's limit (or --max-input-tokens)
with one note saying how many were cut and by how much; training logs the cut ones per data set.

A tiny random BART is saved with save_pretrained; the model's encoder is hooked to record the
length it is given, so the tests check what the model saw, not only the message."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from transformers import BartForConditionalGeneration

from summarization.cli import evaluate, predict
from summarization.config import ModelConfig, ScratchConfig
from summarization.model import build_model, load_model_config, load_tokenizer

pytestmark = pytest.mark.faults  # the fault suite (issue 20): uv run pytest -m faults

LONG = "#Person1#: " + " ".join(f"word{i % 97}" for i in range(20_000))  # ~40k tokens


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BART (128 positions) with the shipped tokenizer, saved as a model folder."""
    cfg = ModelConfig(
        init="scratch",
        scratch=ScratchConfig(
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            attention_heads=2,
            ffn_dim=64,
            max_position_embeddings=128,
        ),
    )
    tokenizer = load_tokenizer(cfg)
    model = build_model(cfg, load_model_config(cfg, tokenizer))
    folder = tmp_path_factory.mktemp("tiny-bart")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def seen_lengths(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Source lengths every encoder call of any BART receives (recorded by a forward hook)."""
    lengths: list[int] = []
    original = BartForConditionalGeneration.get_encoder

    def get_encoder(self):  # noqa: ANN001, ANN202 - wraps transformers' method
        encoder = original(self)
        if not getattr(encoder, "_length_hook", False):
            encoder.register_forward_pre_hook(
                lambda _m, args, kwargs: lengths.append(
                    (
                        kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]
                    ).shape[-1]
                ),
                with_kwargs=True,
            )
            encoder._length_hook = True
        return encoder

    monkeypatch.setattr(BartForConditionalGeneration, "get_encoder", get_encoder)
    return lengths


def data_file(tmp_path: Path, rows: int = 4, long_rows: int = 1) -> Path:
    """A JSONL file of ``rows`` dialogues with references, the first ``long_rows`` very long."""
    path = tmp_path / "dialogues.jsonl"
    with path.open("w", encoding="utf-8") as out:
        for i in range(rows):
            dialogue = LONG if i < long_rows else "#Person1#: Hi.\n#Person2#: Hello there."
            out.write(
                json.dumps({"fname": f"d{i}", "dialogue": dialogue, "summary": "They greet."})
                + "\n"
            )
    return path


@pytest.mark.trains
def test_predict_cuts_long_dialogues_with_one_note(model_dir, tmp_path, capsys, seen_lengths):
    data = data_file(tmp_path)
    code = predict(["--model", str(model_dir), "--data", str(data), "generation.max_new_tokens=2"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.count("1 of 4 dialogues were longer than") == 1, err
    assert "longest: " in err
    # the preset's data.max_source_length (512) is more than the model's 128 positions
    assert max(seen_lengths) <= 128

    capsys.readouterr()
    seen_lengths.clear()
    code = predict(
        [
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--max-input-tokens",
            "16",
            "generation.max_new_tokens=2",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0 and "1 of 4 dialogues were longer than 16 tokens (--max-input-tokens)" in err
    assert max(seen_lengths) <= 16


def test_max_input_tokens_above_the_model_is_refused(model_dir, tmp_path, capsys):
    code = predict(["--model", str(model_dir), "--prompt", LONG, "--max-input-tokens", "5000"])
    assert code == 2
    assert "--max-input-tokens 5000 is more than this model takes (128" in capsys.readouterr().err


@pytest.mark.trains
def test_evaluate_cuts_long_dialogues_with_one_note(
    model_dir, tmp_path, capsys, seen_lengths, cache_dir
):
    code = evaluate(
        [
            "--model",
            str(model_dir),
            "--data",
            str(data_file(tmp_path, rows=3, long_rows=2)),
            "--out",
            str(tmp_path / "out.jsonl"),
            "generation.max_new_tokens=2",
            "trainer.accelerator=cpu",
            f"data.cache_dir={cache_dir}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.count("2 of 3 dialogues were longer than 128 tokens") == 1, err
    assert seen_lengths and max(seen_lengths) <= 128


@pytest.mark.trains
def test_training_logs_truncated_samples_per_data_set(train_cli, tmp_path, caplog):
    train = data_file(tmp_path, rows=6, long_rows=2)
    with caplog.at_level(logging.INFO):
        code, err, _ = train_cli(
            "-c",
            "tiny",
            f"data.train_file={train}",
            f"data.val_file={train}",
            f"data.test_file={train}",
            "trainer.max_steps=1",
            "trainer.batch_size=2",
            "data.max_source_length=64",
        )
    text = caplog.text + err
    assert code == 0, text
    assert "2 of 6 training dialogues were longer than 64 tokens (data.max_source_length)" in text
    assert "2 of 6 validation dialogues were longer than 64 tokens" in text
