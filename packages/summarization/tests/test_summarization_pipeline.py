"""The whole path on the tiny preset: train -> final/ (plain Auto classes) -> evaluate -> predict ->
score,
Korean end to end, and the console scripts' exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from summarization.cli import evaluate, predict, score
from summarization.config import SAMPLES

EN, KO = SAMPLES["en"], SAMPLES["ko"]
BIN = Path(sys.executable).parent


def run_dir(root: Path) -> Path:
    """The single run folder under ``root`` (``.claims`` is the run-number bookkeeping)."""
    runs = [p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(runs) == 1, runs
    return runs[0]


def rows_of(path: Path) -> list[dict]:
    """Rows of a JSON-lines file."""
    return [
        json.loads(line)
        for line in Path(path).read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]


@pytest.mark.trains
def test_training_writes_a_complete_run_with_the_best_model_by_rouge_l(tiny_run):
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 30
    assert summary["best"]["metric"] == "val/rougeL"
    validations = [r for r in rows_of(tiny_run / "metrics.jsonl") if "val/rougeL" in r]
    assert [r["step"] for r in validations] == [15, 30]
    assert summary["best"]["value"] == max(r["val/rougeL"] for r in validations)
    assert all(
        0.0 <= r[k] <= 1.0
        for r in validations
        for k in ("val/rouge1", "val/rouge2", "val/rougeL", "val/rougeLsum")
    )
    assert validations[-1]["val/loss"] < validations[0]["val/loss"] < 9.0, (
        "the validation loss falls"
    )
    train = [r["train/loss"] for r in rows_of(tiny_run / "metrics.jsonl") if "train/loss" in r]
    assert train[-1] < train[0] - 1.0
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    rouge = manifest["metrics"]["rouge"]
    assert (
        rouge["package"] == "rouge-score"
        and rouge["version"]
        and rouge["tokenizer"].startswith("rouge_score-default")
    )
    assert rouge["multi_reference"].startswith("mean")
    assert any(
        f.endswith("dialogsum_sample/train.jsonl")
        for f in json.dumps(manifest["data_files"]).split('"')
    )
    predictions = rows_of(tiny_run / "val_predictions.jsonl")
    assert len(predictions) == 12 and {"fname", "summary", "references"} <= set(predictions[0])


@pytest.mark.trains
def test_final_folder_loads_with_plain_auto_classes_and_generates(tiny_run):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    final = tiny_run / "final"
    model = AutoModelForSeq2SeqLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert (
        type(model).__name__ == "BartForConditionalGeneration"
        and len(tokenizer) == model.config.vocab_size
    )
    assert model.generation_config.num_beams == 1 and model.generation_config.max_new_tokens == 24
    batch = tokenizer(
        ["#Person1#: Can I help you?\n#Person2#: I want a ticket to Boston."], return_tensors="pt"
    )
    out = model.generate(**batch)
    assert out.shape[0] == 1 and out.shape[1] <= 24 + 1
    info = json.loads((final / "summarization.json").read_text())
    assert info["source_prefix"] == "" and info["metric"]["resolved_tokenizer"] == "default"


@pytest.mark.trains
def test_evaluate_predict_and_score_agree(tiny_run, tmp_path, capsys, cache_dir):
    final = tiny_run / "final"
    assert evaluate(["--model", str(final), "--split", "test", f"data.cache_dir={cache_dir}"]) == 0
    printed = json.loads(capsys.readouterr().out)
    out = tiny_run / "eval"
    scores = json.loads((out / "test.scores.json").read_text())
    assert scores["samples"] == 50 and scores["split"] == "test" and scores["world_size"] == 1
    assert scores["multi_reference"].startswith("mean") and scores["tokenizer"].startswith(
        "rouge_score-default"
    )
    assert printed["rougeL"] == scores["rougeL"] and printed["data"][0]["file"].endswith(
        "test.jsonl"
    )
    predictions = rows_of(out / "test.jsonl")
    assert [p["fname"] for p in predictions] == [f"test_{i}" for i in range(50)] and len(
        predictions[0]["references"]
    ) == 3

    # score recomputes exactly the same ROUGE from the written predictions and the original file
    assert (
        score(
            [
                "--predictions",
                str(out / "test.jsonl"),
                "--references",
                str(EN / "test.jsonl"),
            ]
        )
        == 0
    )
    rescored = json.loads(capsys.readouterr().out)
    assert all(rescored[k] == scores[k] for k in ("rouge1", "rouge2", "rougeL", "rougeLsum"))

    # predict gives the same summaries as evaluate for the same rows
    assert (
        predict(
            [
                "--model",
                str(final),
                "--data",
                str(EN / "test.jsonl"),
                "--out",
                str(tmp_path / "pred.jsonl"),
            ]
        )
        == 0
    )
    predicted = rows_of(tmp_path / "pred.jsonl")
    assert [p["fname"] for p in predicted] == [p["fname"] for p in predictions]
    same = sum(a["summary"] == b["summary"] for a, b in zip(predicted, predictions))
    assert same >= 48, (
        f"only {same}/50 predictions agree between predict (padded batches) and evaluate"
    )
    capsys.readouterr()
    assert (
        predict(
            [
                "--model",
                str(final),
                "--prompt",
                "#Person1#: Where is the bank?\n#Person2#: Next to the school.",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() != ""


@pytest.mark.trains
def test_evaluate_rejects_what_it_cannot_use(tiny_run, tmp_path, capsys):
    assert evaluate(["--model", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    no_refs = tmp_path / "dialogues.jsonl"
    no_refs.write_text('{"fname": "x", "dialogue": "#Person1#: hi"}\n', encoding="utf-8")
    assert evaluate(["--model", str(tiny_run / "final"), "--data", str(no_refs)]) == 2
    assert f"{no_refs}:1: missing field 'summary'" in capsys.readouterr().err
    missing = tmp_path / "missing.jsonl"
    assert evaluate(["--model", str(tiny_run / "final"), "--data", str(missing)]) == 2
    assert f"'{missing}' (--data) does not exist" in capsys.readouterr().err
    assert (
        predict(["--model", str(tiny_run / "final"), "--data", str(no_refs)]) == 0
    )  # predict needs no references


@pytest.mark.trains
def test_korean_end_to_end_learns_and_scores_with_a_tokenizer_that_keeps_hangul(train_cli, capsys):
    # Overfit the 16 Korean dialogues (validation = training rows): ROUGE must be clearly above 0.
    code, err, root = train_cli(
        "-c",
        "tiny",
        "data.sample=ko",
        f"data.val_file={KO / 'train.jsonl'}",
        "trainer.max_steps=40",
        "trainer.val_every_n_steps=20",
        "trainer.batch_size=8",
        "model.scratch.dropout=0.0",
        "optim.lr=3e-3",
        "optim.warmup_steps=5",
        "data.max_val_samples=16",
        "generation.max_new_tokens=40",
    )
    assert code == 0, err
    run = run_dir(root)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["metrics"]["rouge"]["tokenizer"].startswith("unicode-words")
    last = [r for r in rows_of(run / "metrics.jsonl") if "val/rouge1" in r][-1]
    assert last["val/rouge1"] > 0.1 and last["val/loss"] < 3.0
    predictions = rows_of(run / "val_predictions.jsonl")
    assert any("\uac00" <= ch <= "\ud7a3" for ch in predictions[0]["summary"]), (
        "the model writes Hangul"
    )
    assert evaluate(["--model", str(run / "final"), "--split", "test"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert (
        scores["tokenizer"].startswith("unicode-words")
        and scores["references_per_sample"] == 2
        and scores["rouge1"] > 0
    )


@pytest.mark.slow
def test_console_scripts_exit_2_with_one_paragraph(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"fname": "a", "dialogue": "x", "summary": "y"}\n{"fname": "b", "dialogue": "x", '
        '"summary": }\n',
        encoding="utf-8",
    )
    env = {"HF_HUB_OFFLINE": "1", "PATH": str(BIN), "HOME": str(tmp_path)}
    done = subprocess.run(
        [
            str(BIN / "summarization-train"),
            "-c",
            "tiny",
            f"data.train_file={bad}",
            f"run.root={tmp_path / 'runs'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    last = done.stderr.strip().splitlines()[-1]
    assert (
        done.returncode == 2
        and last.startswith("error: ")
        and f"{bad}:2:44: not valid JSON (Expecting value)" in last
        and "Traceback" not in done.stderr
    )
    assert not (tmp_path / "runs").exists()
    done = subprocess.run(
        [
            str(BIN / "summarization-score"),
            "--predictions",
            str(bad),
            "--references",
            str(EN / "test.jsonl"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert (
        done.returncode == 2
        and "missing field 'summary'" not in done.stderr
        and f"{bad}:2:44: not valid JSON" in done.stderr
    )
    done = subprocess.run(
        [str(BIN / "summarization-train"), "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert (
        done.returncode == 0
        and "presets: bart_base, bart_large_cnn, small, t5_small, tiny (default: bart_large_cnn)"
        in done.stdout
    )


@pytest.mark.trains
def test_train_run_dir_latest_continues_that_run_with_its_own_config(train_cli, monkeypatch):
    """`train run.dir=latest` continues the newest run with *its* config.yaml: the default preset
    (bart_large_cnn, a Hub model) is never loaded, so it works offline. A -c that contradicts the
    run's config is named key by key instead of silently training something else."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    small = (
        "model.scratch.d_model=32",
        "model.scratch.ffn_dim=64",
        "trainer.val_every_n_steps=null",
    )
    code, err, root = train_cli("-c", "tiny", "trainer.max_steps=3", *small)
    assert code == 0, err
    run = run_dir(root)
    code, err, _ = train_cli("run.dir=latest", "trainer.max_steps=5")
    assert code == 0, err
    assert run_dir(root) == run, "no new run folder"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 5
    assert "Resumed from" in (run / "train.log").read_text()
    # tiny's own d_model: 128
    code, err, _ = train_cli("-c", "tiny", "run.dir=latest", "trainer.max_steps=5")
    assert code == 2 and "model.scratch.d_model: 128 (-c) vs 32 (run)" in err
