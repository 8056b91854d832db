"""Whole runs: make-data -> train -> evaluate -> infer on the tiny preset through the real commands
and loading code; bf16-true training that resumes bit-identically in bf16; bad input (exit 2, no run
folder); the shared console scripts; DDP on 2 CPU processes with mixed image / text-only batches;
FSDP on GPUs (skipped without them)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.testing.toy import child_env, final_weights, max_weight_diff, read_jsonl, train_losses

FAST = [
    "trainer.accelerator=cpu",
    "logger.progress_bar=false",
    "logger.plot=false",
    "trainer.batch_size=4",
    "trainer.eval_batch_size=8",
    "trainer.log_every_n_steps=1",
    "generation.max_new_tokens=3",
]


def run_folders(root: Path) -> list[Path]:
    """The run folders under ``root`` (none when it does not exist)."""
    return (
        [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if root.exists()
        else []
    )


def only_run(root: Path) -> Path:
    runs = run_folders(root)
    assert len(runs) == 1, runs
    return runs[0]


def env(**extra: str) -> dict[str, str]:
    """Subprocess environment: offline, one thread per process, no inherited task choice or
    SLURM."""
    return child_env(**extra)


@pytest.mark.trains
def test_make_data_train_evaluate_infer(tmp_path, monkeypatch, capsys):
    """The tiny preset end to end, as a user runs it: draw data, train (validation with generated
    counts), reload final/ with the plain Auto classes, evaluate it (same loss as the best
    validation), and answer one question with infer (same answer as evaluate generated)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from qwen_vl.cli import evaluate, infer, make_data, train

    monkeypatch.chdir(tmp_path)  # relative data paths start at the current folder
    assert (
        make_data(
            [
                "--out",
                "data/counting",
                "--n",
                "48",
                "--n-dev",
                "12",
                "--seed",
                "3",
                "--text-share",
                "0.25",
            ]
        )
        == 0
    )
    assert (
        train(
            [
                "-c",
                "tiny",
                "run.root=runs",
                "data.train_file=data/counting/train.jsonl",
                "data.val_file=data/counting/dev.jsonl",
                *FAST,
                "trainer.max_steps=24",
                "trainer.val_every_n_steps=12",
            ]
        )
        == 0
    )
    run = only_run(tmp_path / "runs")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 24
    manifest = json.loads((run / "manifest.json").read_text())
    assert (
        manifest["pixels"] == {"min": 3136, "max": 12544, "factor": 28}
        and manifest["image_fingerprints"]
    )
    losses = train_losses(run)
    assert losses[24] < losses[1] * 0.5, losses  # it learns (from ~6.5 to ~1.5)
    val = [r for r in read_jsonl(run / "metrics.jsonl") if "val/loss" in r]
    assert [r["step"] for r in val] == [12, 24] and all(r["val/count_samples"] == 12 for r in val)
    assert all(0 <= r["val/count_accuracy"] <= 1 for r in val)

    final = run / "final"
    model = AutoModelForImageTextToText.from_pretrained(final)
    processor = AutoProcessor.from_pretrained(final)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert (
        processor.image_processor.size.shortest_edge,
        processor.image_processor.size.longest_edge,
    ) == (3136, 12544)
    capsys.readouterr()

    assert (
        evaluate(
            [
                "--model",
                str(final),
                "--data",
                "data/counting/dev.jsonl",
                "--out",
                "pred.jsonl",
                "trainer.accelerator=cpu",
                "trainer.eval_batch_size=1",
                "generation.max_new_tokens=3",
            ]
        )
        == 0
    )
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["loss"] == pytest.approx(summary["best"]["value"], rel=1e-4)
    assert metrics["count_samples"] == 12
    predictions = {r["id"]: r for r in read_jsonl(tmp_path / "pred.jsonl")}
    assert len(predictions) == 12

    record = next(
        r
        for r in read_jsonl(tmp_path / "data/counting/dev.jsonl")
        if len(r["messages"]) == 2 and r["messages"][0]["content"][0]["type"] == "image"
    )
    image, question = (
        record["messages"][0]["content"][0]["image"],
        record["messages"][0]["content"][1]["text"],
    )
    assert (
        infer(
            [
                "--model",
                str(final),
                "--image",
                f"data/counting/{image}",
                "--prompt",
                question,
                "--max-new-tokens",
                "3",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == predictions[record["id"]]["prediction"]
    # The same question from a --data file (image path relative to the file): the same answer.
    questions = tmp_path / "data/counting/questions.jsonl"
    questions.write_text(
        json.dumps({"id": "q", "prompt": question, "images": [image]}) + "\n", encoding="utf-8"
    )
    args = [
        "--model",
        str(final),
        "--data",
        str(questions),
        "--out",
        "answers.jsonl",
        "--max-new-tokens",
        "3",
        "--device",
        "cpu",
    ]
    assert infer(args) == 0
    assert read_jsonl(tmp_path / "answers.jsonl") == [
        {"id": "q", "prompt": question, "answer": predictions[record["id"]]["prediction"]}
    ]
    # never over a file without --overwrite
    assert infer(args) == 2 and "already exists" in capsys.readouterr().err


@pytest.mark.trains
def test_bf16_true_training_stays_bf16_and_resumes_bit_identically(tmp_path, counting_data):
    """bf16-true throughout: the checkpoint and final/ hold bf16 tensors, the resumed run checks
    that every parameter is still bf16, and stopping at step 2 then resuming to step 4 gives the
    same weights and losses as running to step 4 at once. (AdamW here; Adafactor's float32
    statistics are covered by the test below.)"""
    from core.config.loader import load_config
    from core.engine.trainer import Trainer
    from qwen_vl.cli import PRESETS_DIR
    from qwen_vl.config import QwenVLConfig
    from qwen_vl.task import QwenVLTask

    def run(root: Path, *extra: str) -> Path:
        cfg = load_config(
            QwenVLConfig,
            "tiny",
            [
                *FAST,
                f"data.train_file={counting_data / 'train.jsonl'}",
                f"data.val_file={counting_data / 'dev.jsonl'}",
                "trainer.precision=bf16-true",
                "trainer.deterministic=true",
                "optim.warmup_ratio=0.0",
                "optim.name=adamw",
                "generation.in_validation=false",
                "checkpoint.load_best_at_end=false",
                "trainer.ckpt_every_n_steps=2",
                f"run.root={root}",
                *extra,
            ],
            PRESETS_DIR,
        )
        return Trainer(cfg, QwenVLTask(cfg), argv=["pytest"]).fit().run_dir

    straight = run(tmp_path / "a", "trainer.max_steps=4")
    first = run(tmp_path / "b", "trainer.max_steps=2")
    state = torch.load(
        first / "checkpoints" / "step-0000002" / "state", map_location="cpu", weights_only=False
    )
    assert {t.dtype for t in state["model"].values()} == {torch.bfloat16}
    resumed = run(tmp_path / "b", "trainer.max_steps=4", f"run.dir={first}")
    assert resumed == first
    assert {t.dtype for t in final_weights(resumed).values()} == {torch.bfloat16}
    assert '"dtype": "bfloat16"' in (resumed / "final" / "config.json").read_text()
    assert max_weight_diff(final_weights(straight), final_weights(resumed)) == 0.0
    a, b = train_losses(straight), train_losses(resumed)
    assert a == b and len(a) == 4


def test_adafactor_state_of_bf16_parameters_keeps_float32_across_a_checkpoint():
    """The users' recipe resumes exactly only if Adafactor's float32 statistics survive the round
    trip."""
    from core.config.schema import OptimConfig
    from core.nn.optim import build_optimizer

    def make() -> tuple[torch.nn.Parameter, torch.optim.Optimizer]:
        param = torch.nn.Parameter(torch.ones(4, 3, dtype=torch.bfloat16))
        return param, build_optimizer([{"params": [param]}], OptimConfig(name="adafactor", lr=1e-3))

    param, optimizer = make()
    param.grad = torch.full_like(param, 0.1)
    optimizer.step()
    saved = optimizer.state_dict()
    assert saved["state"][0]["exp_avg_sq_row"].dtype == torch.float32
    _, fresh = make()
    fresh.load_state_dict(saved)
    assert next(iter(fresh.state.values()))["exp_avg_sq_row"].dtype == torch.float32


def test_bad_data_exits_2_naming_the_record_and_leaves_no_run_folder(
    tmp_path, capsys, counting_data
):
    from qwen_vl.cli import train

    lines = (counting_data / "train.jsonl").read_text().splitlines()
    broken = json.loads(lines[0])
    broken["id"] = "broken-record"
    broken["messages"] = [m for m in broken["messages"] if m["role"] == "user"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([*lines[:3], json.dumps(broken)]) + "\n")
    (tmp_path / "images").symlink_to(counting_data / "images")
    code = train(
        [
            "-c",
            "tiny",
            f"run.root={tmp_path / 'runs'}",
            f"data.train_file={bad}",
            "data.val_file=null",
            *FAST,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "broken-record" in err and f"{bad}:4" in err and "no assistant turn" in err
    assert run_folders(tmp_path / "runs") == []
    assert (
        train(["-c", "tiny", f"run.root={tmp_path / 'runs'}", "data.train_file=null", *FAST]) == 2
    )
    assert (
        "data.train_file is not set" in capsys.readouterr().err
        and run_folders(tmp_path / "runs") == []
    )


@pytest.mark.slow
def test_shared_console_scripts_reach_this_package(tmp_path):
    """``qwen-vl-make-data`` is this package's script; ``train`` is core's shared one and must
    dispatch here (--task qwen_vl): bad data gives exit code 2 and one paragraph naming the
    record."""
    bindir = Path(sys.executable).parent
    out = subprocess.run(
        [str(bindir / "qwen-vl-make-data"), "--out", str(tmp_path / "d"), "--n", "4"]
        + ["--n-dev", "2"],
        capture_output=True,
        text=True,
        env=env(),
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    records = (tmp_path / "d" / "train.jsonl").read_text().splitlines()
    (tmp_path / "d" / "bad.jsonl").write_text(
        records[0] + "\n" + '{"id": "no-answer", "messages": [{"role": "user", "content": "hi"}]}\n'
    )
    out = subprocess.run(
        [
            str(bindir / "train"),
            "--task",
            "qwen_vl",
            "-c",
            "tiny",
            f"run.root={tmp_path / 'runs'}",
            f"data.train_file={tmp_path / 'd' / 'bad.jsonl'}",
            "data.val_file=null",
            "trainer.accelerator=cpu",
        ],
        capture_output=True,
        text=True,
        env=env(),
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "'no-answer'" in last and "bad.jsonl:2" in last
    assert run_folders(tmp_path / "runs") == []


def mixed_order_data(folder: Path, counting_data: Path) -> Path:
    """train.jsonl ordered text, image, image, text, ...: with 2 ranks, batch 1 and no shuffling
    (debug.overfit_batches) rank 0 gets a text-only batch while rank 1 gets an image, then the
    other way round."""
    rows = [json.loads(line) for line in (counting_data / "train.jsonl").read_text().splitlines()]
    text = [
        r
        for r in rows
        if not any(p["type"] == "image" for m in r["messages"] for p in m["content"])
    ]
    image = [r for r in rows if r not in text]
    ordered = [text[0], image[0], image[1], text[1], text[2], image[2], image[3], text[3]]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ordered))
    dev = (counting_data / "dev.jsonl").read_text().splitlines()[:5]  # odd: the sampler pads
    (folder / "dev.jsonl").write_text("\n".join(dev) + "\n")
    if not (folder / "images").exists():
        (folder / "images").symlink_to(counting_data / "images")
    return folder


@pytest.mark.slow
def test_ddp_two_cpu_processes_with_text_only_and_image_batches(tmp_path, counting_data):
    """DDP without the unused-parameter search (core's default) on 2 gloo processes: while one
    rank trains a text-only sample and the other an image, the vision tower (trainable here)
    must get gradients on both ranks, or DDP fails at the next step. Validation with generation
    is gathered from both ranks (5 dev records, padded to 6, de-duplicated to 5)."""
    data = mixed_order_data(tmp_path / "data", counting_data)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwen_vl.cli",
            "train",
            "-c",
            "tiny",
            f"run.root={tmp_path / 'runs'}",
            f"data.train_file={data / 'train.jsonl'}",
            f"data.val_file={data / 'dev.jsonl'}",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.strategy=ddp",
            "trainer.batch_size=1",
            "trainer.eval_batch_size=2",
            "debug.overfit_batches=4",
            "trainer.max_steps=4",
            "trainer.val_every_n_steps=2",
            "model.train_vision=true",
            "logger.progress_bar=false",
            "logger.plot=false",
            "generation.max_new_tokens=2",
        ],
        capture_output=True,
        text=True,
        env=env(),
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run = only_run(tmp_path / "runs")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 4
    sums = summary["rank_weight_sha256"]
    assert len(sums) == 2 and sums[0] == sums[1]
    val = [r for r in read_jsonl(run / "metrics.jsonl") if "val/loss" in r]
    assert [r["step"] for r in val] == [2, 4] and all(r["val/count_samples"] == 5 for r in val)


# -- FSDP2: the users' recipe -------------------------------------------------------------------


def recipe_command(
    root: Path, data: Path, devices: int, accelerator: str, *extra: str
) -> list[str]:
    """``train`` with the qwen2_5_vl_3b preset's trainer / optim / fsdp / checkpoint settings (FSDP2
    full shard per decoder layer and vision block, non-reentrant activation checkpointing,
    bf16-true, Adafactor with a constant LR after warmup, clipping, best by val/loss) on the tiny
    model: rank 0 gets a text-only sample while rank 1 gets an image (``mixed_order_data``)."""
    return [
        sys.executable,
        "-m",
        "qwen_vl.cli",
        "train",
        "-c",
        "qwen2_5_vl_3b",
        "model.name=tiny",
        f"run.root={root}",
        f"data.train_file={data / 'train.jsonl'}",
        f"data.val_file={data / 'dev.jsonl'}",
        "data.min_pixels=3136",
        "data.max_pixels=12544",
        "data.max_length=256",
        f"trainer.devices={devices}",
        f"trainer.accelerator={accelerator}",
        "trainer.batch_size=1",
        "trainer.eval_batch_size=2",
        "trainer.accumulate_grad_batches=2",
        "trainer.num_workers=0",
        "debug.overfit_batches=4",
        "trainer.max_steps=4",
        "trainer.max_epochs=null",
        "trainer.val_every_n_steps=2",
        "trainer.ckpt_every_n_steps=2",
        "trainer.log_every_n_steps=1",
        "trainer.deterministic=true",
        "checkpoint.keep_last=3",
        "optim.lr=3e-3",
        "model.lr_vision=3e-3",
        "model.lr_merger=3e-3",
        "model.lr_llm=3e-3",
        "logger.progress_bar=false",
        "logger.plot=false",
        "generation.max_new_tokens=2",
        *extra,
    ]


@pytest.mark.slow
def test_fsdp2_users_recipe_on_two_cpu_processes_with_mixed_batches_resumes_exactly(
    tmp_path, counting_data
):
    """The users' FSDP recipe on 2 gloo ranks, vision tower trained: no hang while one rank holds a
    text-only sample and the other an image (hard timeout), finite losses, per-part learning rates,
    sharded checkpoints with Adafactor's float32 statistics for the bf16 weights, a run resumed
    from step 2 ending bit-identical, and the best-by-val/loss final/ loading with the Auto
    class."""
    from transformers import AutoModelForImageTextToText

    data = mixed_order_data(tmp_path / "data", counting_data)
    out = subprocess.run(
        recipe_command(tmp_path / "full", data, 2, "cpu", "model.train_vision=true"),
        capture_output=True,
        text=True,
        env=env(),
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run = only_run(tmp_path / "full")
    summary = json.loads((run / "summary.json").read_text())
    manifest = json.loads((run / "manifest.json").read_text())
    assert (
        summary["status"] == "completed"
        and manifest["strategy"] == "FSDP2Strategy"
        and manifest["precision"] == "bf16-true"
    )
    losses = train_losses(run)
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values())
    lrs = [r for r in read_jsonl(run / "metrics.jsonl") if "lr/vision" in r]
    assert lrs and {"lr/vision", "lr/merger", "lr/llm"} <= set(lrs[0])
    val = [r for r in read_jsonl(run / "metrics.jsonl") if "val/loss" in r]
    assert [r["step"] for r in val] == [2, 4] and all(r["val/count_samples"] == 5 for r in val)

    import torch.distributed.checkpoint as dcp

    state = run / "checkpoints" / "step-0000002" / "state"
    stored = dcp.FileSystemReader(state).read_metadata().state_dict_metadata
    model_dtypes = {
        m.properties.dtype
        for k, m in stored.items()
        if k.startswith("model.") and hasattr(m, "properties")
    }
    optim_dtypes = {
        m.properties.dtype
        for k, m in stored.items()
        if k.startswith("optimizer.state.") and hasattr(m, "properties")
    }
    assert model_dtypes == {torch.bfloat16} and torch.float32 in optim_dtypes, (
        model_dtypes,
        optim_dtypes,
    )

    out = subprocess.run(
        recipe_command(
            tmp_path / "resumed",
            data,
            2,
            "cpu",
            "model.train_vision=true",
            f"trainer.resume={run / 'checkpoints' / 'step-0000002'}",
        ),
        capture_output=True,
        text=True,
        env=env(),
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = only_run(tmp_path / "resumed")
    assert max_weight_diff(final_weights(run), final_weights(resumed)) == 0.0
    assert train_losses(resumed) == {s: v for s, v in losses.items() if s > 2}

    best = summary["best"]
    assert best["metric"] == "val/loss" and best["value"] == min(r["val/loss"] for r in val)
    model = AutoModelForImageTextToText.from_pretrained(run / "final")
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert {t.dtype for t in final_weights(run).values()} == {torch.bfloat16}


gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="FSDP2 on CUDA needs a GPU; this machine has none"
)


@pytest.mark.gpu
@gpu
def test_fsdp2_recipe_on_gpus_trains_and_exports(tmp_path, counting_data):
    """The users' recipe on every visible GPU (up to 2), vision tower frozen and trained."""
    from transformers import AutoModelForImageTextToText

    data = mixed_order_data(tmp_path / "data", counting_data)
    devices = min(2, torch.cuda.device_count())
    for frozen in ("true", "false"):
        out = subprocess.run(
            recipe_command(
                tmp_path / frozen, data, devices, "cuda", f"model.train_vision={frozen}"
            ),
            capture_output=True,
            text=True,
            env=env(),
            timeout=600,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        run = only_run(tmp_path / frozen)
        assert json.loads((run / "manifest.json").read_text())["strategy"] == "FSDP2Strategy"
        assert {t.dtype for t in final_weights(run).values()} == {torch.bfloat16}
        assert (
            type(AutoModelForImageTextToText.from_pretrained(run / "final")).__name__
            == "Qwen2_5_VLForConditionalGeneration"
        )
