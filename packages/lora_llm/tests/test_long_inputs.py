"""Long prompts: infer and evaluate cut them to the model's limit (or --max-input-tokens), keeping
the prompt's start and its template's end, with one note saying how many were cut and by how much;
training logs the samples cut to data.max_length per data set.

The base model's forward is hooked to record the sequence lengths it is given, so the tests check
what the model saw (a 50,000-word instruction used to be fed whole)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from core.config.loader import load_config
from core.engine.trainer import FitResult, Trainer
from lora_llm.cli import PRESETS, evaluate, infer
from lora_llm.config import LoraLLMConfig
from lora_llm.task import LoraLLMTask

pytestmark = pytest.mark.faults  # the fault suite (issue 20): uv run pytest -m faults

LONG = " ".join(f"w{i % 50}" for i in range(50_000))  # a 50,000-word instruction


def fit(root: Path, *overrides: str) -> FitResult:
    """Train the tiny preset with ``overrides`` into ``root``, in this process, on the CPU."""
    quiet = ["logger.progress_bar=false", "logger.plot=false", "trainer.accelerator=cpu"]
    cfg = load_config(LoraLLMConfig, "tiny", [f"run.root={root}", *quiet, *overrides], PRESETS)
    return Trainer(cfg, LoraLLMTask(cfg), argv=["pytest", *overrides]).fit()


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory: pytest.TempPathFactory) -> FitResult:
    """One optimizer step of the tiny preset (16-bit base, AdamW): an adapter folder to load."""
    return fit(
        tmp_path_factory.mktemp("long"),
        "trainer.max_steps=1",
        "trainer.max_epochs=null",
        "data.max_samples=24",
        "quant.bits=null",
        "optim.name=adamw",
        "trainer.batch_size=4",
        "trainer.accumulate_grad_batches=1",
    )


@pytest.fixture
def seen_lengths(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sequence lengths of every forward of a Llama model (prefill and each generated token)."""
    from transformers import LlamaModel

    lengths: list[int] = []
    original = LlamaModel.forward

    def forward(self, input_ids=None, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        ids = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        lengths.append(ids.shape[1])
        return original(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(LlamaModel, "forward", forward)
    return lengths


@pytest.mark.trains
def test_infer_cuts_a_50000_word_prompt_with_one_note(adapter_run, capsys, seen_lengths):
    final = adapter_run.run_dir / "final"
    args = ["--adapter", str(final), "--greedy", "--max-new-tokens", "3", "--quant", "none"]
    code = infer([*args, "--prompt", LONG])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.err.count("1 of 1 prompts were longer than") == 1, captured.err
    # the tiny Llama has 1,024 positions (its tokenizer's model_max_length too), 3 kept free
    assert "longer than 1,021 tokens (the model's limit)" in captured.err
    assert max(seen_lengths) <= 1021

    seen_lengths.clear()
    code = infer([*args, "--prompt", LONG, "--max-input-tokens", "100"])
    captured = capsys.readouterr()
    assert code == 0 and "longer than 100 tokens (--max-input-tokens)" in captured.err
    assert max(seen_lengths) == 100


@pytest.mark.trains
def test_infer_data_notes_once_and_keeps_short_prompts_whole(
    adapter_run, tmp_path, capsys, seen_lengths
):
    data = tmp_path / "prompts.jsonl"
    rows = [{"instruction": LONG}, {"instruction": "Name a fruit."}, {"instruction": LONG[:9000]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    final = adapter_run.run_dir / "final"
    code = infer(
        ["--adapter", str(final), "--data", str(data), "--greedy", "--max-new-tokens", "2"]
        + ["--quant", "none", "--batch-size", "1", "--max-input-tokens", "64"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.err.count("Note: ") == 1
    assert "2 of 3 prompts were longer than 64 tokens" in captured.err
    assert len(captured.out.strip().splitlines()) == 3
    assert sorted(seen_lengths)[-1] == 64 and min(seen_lengths) >= 1


@pytest.mark.trains
def test_max_input_tokens_above_the_model_is_refused(adapter_run, capsys):
    final = adapter_run.run_dir / "final"
    code = infer(
        ["--adapter", str(final), "--prompt", "Hi", "--quant", "none", "--max-input-tokens", "9999"]
    )
    assert code == 2
    assert "--max-input-tokens 9999 is more than this model takes" in capsys.readouterr().err


@pytest.mark.trains
def test_evaluate_cuts_long_prompts_instead_of_dropping_them(
    adapter_run, tmp_path, capsys, seen_lengths
):
    data = tmp_path / "eval.jsonl"
    rows = [
        {"instruction": LONG, "output": "A fruit."},
        {"instruction": "Name a fruit.", "output": "An apple."},
        {"instruction": "Say it.", "output": LONG[:3000]},  # a long answer, a short prompt
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "answers.jsonl"
    code = evaluate(
        ["--model", str(adapter_run.run_dir / "final"), "--data", str(data), "--out", str(out)]
        + ["--max-new-tokens", "2", "--quant", "none", "trainer.accelerator=cpu"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    # data.max_length 256 less data.min_response_tokens 8
    assert captured.err.count("1 of 3 prompts were longer than 248 tokens") == 1, captured.err
    assert len(out.read_text().splitlines()) == 3  # the long one is scored, not left out
    assert max(seen_lengths) <= 256


@pytest.mark.trains
def test_training_logs_truncated_samples_per_data_set(tmp_path, caplog):
    data = tmp_path / "train.jsonl"
    rows = [{"instruction": "Say it.", "output": LONG[:3000]}] * 3 + [
        {"instruction": "Name a fruit.", "output": "An apple."}
    ] * 9
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="lora_llm.task"):
        result = fit(
            tmp_path / "runs",
            f"data.train_files=[{data}]",
            f"data.val_files=[{data}]",
            "trainer.max_steps=1",
            "trainer.max_epochs=null",
            "quant.bits=null",
            "optim.name=adamw",
            "trainer.batch_size=4",
            "trainer.accumulate_grad_batches=1",
            "trainer.val_every_n_steps=null",
        )
    assert result.status == "completed"
    assert "3 of 12 train samples were longer than 256 tokens (data.max_length)" in caplog.text
    assert "3 of 12 val samples were longer than 256 tokens" in caplog.text


def test_a_cut_prompt_keeps_its_start_and_the_template_end(tokenizer):
    from lora_llm.data import Encoder, Record

    encoder = Encoder(tokenizer, "auto", 256, chat_source="builtin")
    encoder.prompt_limit = 64
    ids = encoder.prompt_ids(Record(source="t", instruction=LONG))
    text = tokenizer.decode(ids)
    assert len(ids) == 64
    assert text.startswith("<s>Below is an instruction") and text.endswith("### Response:\n")
