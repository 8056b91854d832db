"""``sweep`` and ``runs`` as users drive them, through the workspace's shared commands on the
summarization task's ``tiny`` preset:

1. bad input exits with code 2 and one paragraph before anything is made;
2. ``--slurm --dry-run`` finds the task's own ``train.sbatch``, and ``launch.sh`` gives each array
   task its point's arguments;
3. a local 2x2 sweep that is stopped in the middle of its third point and run again: points 1-2
   are not run again, point 3 continues from its checkpoint, point 4 runs, and ``runs compare``
   ranks the four runs as their ``summary.json`` files say.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCRIPT = REPO / "packages" / "summarization" / "slurm" / "train.sbatch"
# Few steps, few samples, short generations: the four points take about a minute in all.
TINY = [
    "-c",
    "tiny",
    "trainer.max_steps=30",
    "trainer.batch_size=2",
    "trainer.log_every_n_steps=1",
    "trainer.val_every_n_steps=10",
    "data.max_train_samples=32",
    "data.max_val_samples=4",
    "generation.max_new_tokens=4",
    "checkpoint.monitor=val/loss",
    "checkpoint.mode=min",
    "logger.progress_bar=false",
    "logger.plot=false",
]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CORE_TASK"))}
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra})
    return env


def sweep(cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``sweep --task summarization ARGS`` in ``cwd``."""
    return subprocess.run(
        [str(BIN / "sweep"), "--task", "summarization", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["optim.lrr=1e-3,3e-4"],
            "Sweep axis 'optim.lrr=1e-3,3e-4' names an unknown config key: Unknown config key "
            "'optim.lrr'. Did you mean 'optim.lr'?",
        ),
        (["generation.num_beams=1,two"], "has a bad value 'two'"),
        (["model.scratch.d_model=64,"], "has an empty value (item 2 of 2)"),
        (["optim.lr=1,2,3,4,5,6", "optim.weight_decay=0,1,2,3,4,5"], "add --max-points 36"),
    ],
    ids=["unknown-key", "wrong-type", "empty-value", "too-large"],
)
def test_bad_sweeps_exit_2_before_anything_is_made(tmp_path, args, expected):
    done = sweep(tmp_path, *TINY, *args, "--slurm", "-p", "debug")
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert expected in done.stderr, done.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "logs").exists()


def test_slurm_dry_run_uses_the_tasks_sbatch_and_launch_gives_each_task_its_point(tmp_path):
    done = sweep(tmp_path, *TINY, "optim.lr=1e-3,3e-4", "--slurm", "-p", "debug", "--dry-run")
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stdout.splitlines() if " sbatch " in x)
    assert f"--array=0-1%2 --output=logs/%x_%A_%a.out -p debug {SCRIPT} -c tiny" in line
    assert not (tmp_path / "runs").exists()

    # launch.sh: array task 1 appends the lines of <SWEEP_ARGS_DIR>/1.args to the train command.
    (tmp_path / "1.args").write_text("optim.lr=3e-4\nrun.dir=/runs/sweeps/001_x/001_lr=3e-4\n")
    base = {k: v for k, v in _env().items() if k != "UV"}
    env = {**base, "REPO_DIR": str(REPO), "DRY_RUN": "1", "HOME": str(tmp_path)}
    env.update({"SWEEP_ARGS_DIR": str(tmp_path), "SLURM_ARRAY_TASK_ID": "1"})
    done = subprocess.run(
        ["bash", str(SCRIPT), "-c", "tiny"], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    srun = done.stdout.splitlines()[-1]
    assert srun.endswith("-c tiny optim.lr=3e-4 run.dir=/runs/sweeps/001_x/001_lr=3e-4 ")
    env.pop("SLURM_ARRAY_TASK_ID")
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "not an array job" in done.stderr


def _wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, timeout: float) -> None:
    """Wait until ``metrics`` (a run's metrics.jsonl) has logged ``step``."""
    deadline = time.time() + timeout
    while not (metrics.is_file() and f'"step": {step},' in metrics.read_text()):
        assert proc.poll() is None, "the sweep ended before its third point reached the step"
        assert time.time() < deadline, f"no step {step} in {metrics} within {timeout} s"
        time.sleep(0.02)


@pytest.mark.slow
def test_local_2x2_sweep_stopped_in_point_3_continues_and_compares(tmp_path):
    args = [*TINY, "optim.lr=1e-3,3e-3", "optim.weight_decay=0.0,0.1", "--name", "lr-wd"]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "sweep"), "--task", "summarization", *args],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=_env(),
    )
    try:
        # Point 3 appears once points 1 and 2 are done; stop the sweep (like `kill`) mid-point.
        deadline = time.time() + 400
        while not list((tmp_path / "runs" / "sweeps").glob("*/002_*")):
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "the sweep did not reach its third point"
            time.sleep(0.1)
        third = next((tmp_path / "runs" / "sweeps").glob("*/002_*"))
        _wait_for_step(third / "metrics.jsonl", 12, proc, timeout=200)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    first_log = (tmp_path / "first.log").read_text()
    assert "stopped by SIGTERM during point 3/4" in first_log
    folder = third.parent
    points = sorted(p for p in folder.iterdir() if p.is_dir() and p.name[:3].isdigit())
    assert [p.name for p in points] == [
        "000_lr=1e-3_weight_decay=0.0",
        "001_lr=1e-3_weight_decay=0.1",
        "002_lr=3e-3_weight_decay=0.0",
    ]
    summary = json.loads((third / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 12 <= summary["global_step"] < 30
    stopped_at = summary["global_step"]
    before = {p.name: (p / "summary.json").stat().st_mtime_ns for p in points[:2]}

    done = sweep(tmp_path, *args, timeout=400)  # the same command again
    assert done.returncode == 0, done.stderr[-3000:]
    assert "point 1/4 000_lr=1e-3_weight_decay=0.0: completed, skipped" in done.stderr
    assert "point 2/4 001_lr=1e-3_weight_decay=0.1: completed, skipped" in done.stderr
    assert "point 3/4 002_lr=3e-3_weight_decay=0.0: resuming (interrupted)" in done.stderr
    assert "point 4/4 003_lr=3e-3_weight_decay=0.1: starting" in done.stderr
    assert before == {p.name: (p / "summary.json").stat().st_mtime_ns for p in points[:2]}
    assert f"Resumed from {third / 'checkpoints'}" in (third / "train.log").read_text()
    assert f"step-{stopped_at:07d}" in (third / "train.log").read_text()
    records = [json.loads(x) for x in (third / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, 31))

    runs = sorted(p for p in folder.iterdir() if p.is_dir() and p.name[:3].isdigit())
    assert len(runs) == 4
    summaries = {p.name: json.loads((p / "summary.json").read_text()) for p in runs}
    assert all(s["status"] == "completed" and s["global_step"] == 30 for s in summaries.values())
    assert all((p / "final" / "model.safetensors").is_file() for p in runs)
    table = subprocess.run(
        [str(BIN / "runs"), "compare", str(folder), "--format", "json"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert table.returncode == 0, table.stderr
    report = json.loads(table.stdout)
    best = min(summaries, key=lambda name: summaries[name]["best"]["value"])
    assert Path(report["runs"][0]["path"]).name == best, "the table's best point"
    for row in report["runs"]:
        assert row["best"] == summaries[Path(row["path"]).name]["best"]["value"]
    assert report["differing_keys"] == ["optim.lr", "optim.weight_decay"]
    assert Path(report["png"]) == folder / "compare.png" and (folder / "compare.png").is_file()
