"""Evaluation and training on 2 CPU processes (DDP, and FSDP2 sharded per layer, over gloo) equal
one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.testing.toy import child_env

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "summarization.cli"]


def env() -> dict[str, str]:
    """Offline, one thread per process, no SLURM or task variables from the outside."""
    return child_env()


def rows_of(path: Path) -> list[dict]:
    """Rows of a JSON-lines file."""
    return [
        json.loads(line)
        for line in Path(path).read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]


def evaluate_cli(
    model: Path, out: Path, cache_dir: Path, *overrides: str
) -> tuple[dict, list[dict]]:
    """Run ``evaluate`` on 13 dev rows in a subprocess; returns ``(printed scores, --out rows)``."""
    done = subprocess.run(
        [
            *CLI,
            "evaluate",
            "--model",
            str(model),
            "--split",
            "dev",
            "--limit",
            "13",
            "--out",
            str(out),
            "trainer.accelerator=cpu",
            "trainer.eval_batch_size=1",
            f"data.cache_dir={cache_dir}",
            *overrides,
        ],
        capture_output=True,
        text=True,
        env=env(),
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    printed = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1, "only rank 0 prints the scores"
    return json.loads(printed[0]), rows_of(out)


@pytest.fixture(scope="module")
def one_process_scores(
    tiny_run: Path, tmp_path_factory: pytest.TempPathFactory, cache_dir: Path
) -> tuple[dict, list[dict]]:
    """``evaluate`` of the session's tiny run on one process."""
    return evaluate_cli(
        tiny_run / "final",
        tmp_path_factory.mktemp("eval1") / "dev.jsonl",
        cache_dir,
        "trainer.devices=1",
    )


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_evaluation_on_two_processes_equals_one_process(
    tiny_run, one_process_scores, tmp_path, cache_dir, strategy
):
    """13 dev rows: with 2 ranks the sampler pads one repeat, which the gather drops again. Under
    FSDP2 every rank gathers each layer for every forward and generation step, in lockstep."""
    one, preds_one = one_process_scores
    two, preds_two = evaluate_cli(
        tiny_run / "final",
        tmp_path / "eval2",
        cache_dir,
        "trainer.devices=2",
        f"trainer.strategy={strategy}",
    )
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["samples"] == two["samples"] == 13.0
    assert preds_one == preds_two, (
        "same summaries, same order, no duplicate from the padded sampler"
    )
    assert [p["fname"] for p in preds_two] == [f"dev_{i}" for i in range(13)]
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum", "gen_words"):
        assert one[key] == two[key]
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-6)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_training_on_two_processes_completes_and_validates_like_one_process(
    tmp_path, cache_dir, strategy
):
    done = subprocess.run(
        [
            *CLI,
            "train",
            "-c",
            "tiny",
            f"run.root={tmp_path}",
            "trainer.devices=2",
            f"trainer.strategy={strategy}",
            "trainer.accelerator=cpu",
            "trainer.max_steps=4",
            "trainer.val_every_n_steps=2",
            "trainer.batch_size=4",
            "data.max_train_samples=32",
            "data.max_val_samples=5",
            "generation.max_new_tokens=8",
            "logger.progress_bar=false",
            "logger.plot=false",
            f"data.cache_dir={cache_dir}",
        ],
        capture_output=True,
        text=True,
        env=env(),
        timeout=400,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    run = next(p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith("."))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    validations = [r for r in rows_of(run / "metrics.jsonl") if "val/samples" in r]
    assert [r["val/samples"] for r in validations] == [5.0, 5.0]
    assert len(rows_of(run / "val_predictions.jsonl")) == 5
    if strategy == "ddp":
        assert (
            len(set(summary["rank_weight_sha256"])) == 1 and len(summary["rank_weight_sha256"]) == 2
        )
        return
    # FSDP2: sharded checkpoints; final/ is the best checkpoint's gathered model, and one process
    # scores it exactly as the 2-rank validation did.
    best = summary["best"]
    assert sorted(p.name for p in (Path(best["path"]) / "state").glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    from summarization.cli import evaluate

    code = evaluate(
        [
            "--model",
            str(run / "final"),
            "--split",
            "dev",
            "--limit",
            "5",
            "trainer.accelerator=cpu",
            "trainer.devices=1",
            f"data.cache_dir={cache_dir}",
        ]
    )
    assert code == 0
    scores = json.loads((run / "eval" / "dev.scores.json").read_text())
    at_best = next(r for r in validations if r["step"] == best["step"])
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert scores[key] == at_best[f"val/{key}"], key
