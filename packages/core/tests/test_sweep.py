"""``sweep`` on the toy task: the grid, the checks that exit 2 before anything exists, dry runs,
a local sweep that is run again (nothing finished runs twice), and a sweep killed with SIGKILL
whose training run still checkpoints and resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from core.sweep import (
    DEFAULT_MAX_POINTS,
    grid,
    point_status,
    read_sweep,
    split_overrides,
    sweep_command,
)
from core.testing.toy import read_jsonl
from core.testing.toy import train as toy_train

REPO = Path(__file__).resolve().parents[3]
TRAIN_CMD = [sys.executable, "-m", "core.testing", "train"]
# The sweep command of the toy task as its own process (the CLI's exit codes, signals).
SWEEP_CLI = [
    sys.executable,
    "-c",
    "import sys; from core.sweep import sweep_command; from core.testing.toy import train; "
    "sys.exit(sweep_command(sys.argv[1:], task='toy', train=train, "
    "train_cmd=[sys.executable, '-m', 'core.testing', 'train']))",
]
FAST = [
    "trainer.accelerator=cpu",
    "trainer.max_steps=4",
    "trainer.val_every_n_steps=2",
    "logger.progress_bar=false",
    "logger.plot=false",
]


def sweep(tmp_path: Path | None, *args: str) -> int:
    """The toy task's sweep command in this process, its runs under ``tmp_path/runs`` (None:
    no ``run.root``, as for ``--resume DIR``)."""
    root = [f"run.root={tmp_path / 'runs'}"] if tmp_path else []
    return sweep_command([*root, *args], task="toy", train=toy_train, train_cmd=TRAIN_CMD)


def sweep_folders(tmp_path: Path) -> list[Path]:
    """The sweep folders under ``tmp_path/runs/sweeps`` (not the ``.claims`` of their numbers)."""
    return sorted(p for p in (tmp_path / "runs" / "sweeps").iterdir() if not p.name.startswith("."))


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CORE_TASK"))}
    return {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def test_axes_split_at_top_level_commas_and_make_a_cartesian_grid():
    fixed, axes = split_overrides(
        [
            "trainer.max_steps=10",
            "fsdp.auto_wrap=[a.B,c.D]",
            "optim.lr=1e-3,3e-4,1e-4",
            "fsdp.auto_wrap2=[q_proj,v_proj],[q_proj,k_proj,v_proj]",
            "run.root='a,b'",
        ]
    )
    assert fixed == ["trainer.max_steps=10", "fsdp.auto_wrap=[a.B,c.D]", "run.root='a,b'"]
    assert [(a.key, a.values) for a in axes] == [
        ("optim.lr", ("1e-3", "3e-4", "1e-4")),
        ("fsdp.auto_wrap2", ("[q_proj,v_proj]", "[q_proj,k_proj,v_proj]")),
    ]
    points = grid(axes)
    assert len(points) == 6 and [p.index for p in points] == list(range(6))
    assert points[1].overrides == ["optim.lr=1e-3", "fsdp.auto_wrap2=[q_proj,k_proj,v_proj]"]
    assert points[1].dir_name == "001_lr=1e-3_auto_wrap2=q_proj-k_proj-v_proj"
    assert len({p.dir_name for p in points}) == 6


@pytest.mark.parametrize(
    "args, expected",
    [
        (["optim.lrr=1e-3,1e-4"], "Unknown config key 'optim.lrr'. Did you mean 'optim.lr'?"),
        (["optim.lr=1e-3,fast"], "has a bad value 'fast'"),
        (["trainer.batch_size=4,many"], "Config key 'trainer.batch_size' got 'many'"),
        (["optim.lr=,"], "Sweep axis 'optim.lr=,' has no values"),
        (["optim.lr=1e-3,,1e-4"], "has an empty value (item 2 of 3)"),
        (["optim.lr=1e-3,1e-3"], "repeats the value '1e-3'"),
        (["optim.lr=[1e-3,1e-4"], "unbalanced brackets"),
        (["run.dir=a,b"], "the sweep sets run.dir itself"),
        (["optim.lr=1e-3,1e-4", "--seeds", "2", "trainer.seed=1,2"], "both set the seeds"),
        (["trainer.batch_size=4"], "Nothing to sweep"),
        (["optim.lr=1e-3,1e-4", "--max-parallel", "2"], "with --slurm (locally the points"),
        (["optim.lr=1e-3,1e-4", "optim.lr=1e-2,1e-1"], "is given twice"),
        (["optim.lrr=1e-3", "optim.lr=1,2"], "The sweep's base config"),
        (
            ["optim.lr=1,2,3,4,5,6", "trainer.seed=1,2,3,4,5,6"],
            "The grid has 36 points (6 optim.lr x 6 trainer.seed), more than the limit of "
            f"{DEFAULT_MAX_POINTS}; if you mean it, add --max-points 36",
        ),
        (
            ["optim.lr=1,2,3", "--seeds", "4", "--max-points", "10"],
            "The grid has 12 points (3 optim.lr x 4 trainer.seed), more than --max-points 10",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 40 else None,
)
def test_bad_input_exits_2_with_one_paragraph_before_anything_exists(
    tmp_path, capsys, args, expected
):
    assert sweep(tmp_path, *FAST, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err, err
    assert not (tmp_path / "runs").exists(), "bad input must leave nothing behind"


def test_max_points_admits_a_large_grid_and_dry_run_writes_nothing(tmp_path, capsys):
    args = ["optim.lr=1,2,3,4,5,6", "trainer.seed=1,2,3,4,5,6", "--max-points", "36", "--dry-run"]
    assert sweep(tmp_path, *FAST, *args) == 0
    out = capsys.readouterr().out
    assert "36 points of task toy" in out and out.count("core.testing train") == 36
    assert "run.dir=" in out and "logger.wandb_group=" in out
    assert not (tmp_path / "runs").exists()


def test_dry_run_slurm_prints_one_job_array_of_the_tasks_script(tmp_path, capsys):
    script = REPO / "packages" / "summarization" / "slurm" / "train.sbatch"
    code = sweep(
        tmp_path,
        *FAST,
        "optim.lr=1e-3,3e-4",
        "--seeds",
        "2",
        "--max-parallel",
        "3",
        "--sbatch-script",
        str(script),
        "--slurm",
        "--gres=gpu:2",
        "-p",
        "a100",
        "--dry-run",
    )
    out = capsys.readouterr().out
    assert code == 0, out
    line = next(x for x in out.splitlines() if " sbatch " in x)
    assert "--array=0-3%3" in line and "--output=logs/%x_%A_%a.out" in line
    assert line.index("--gres=gpu:2 -p a100") < line.index(str(script)), "user options first"
    assert line.endswith("trainer.val_every_n_steps=2 logger.progress_bar=false logger.plot=false")
    assert "SWEEP_ARGS_DIR=" in line
    assert "array task 3: optim.lr=3e-4 trainer.seed=43 logger.wandb_group=" in out
    assert not (tmp_path / "runs").exists()


def test_slurm_without_a_script_or_with_array_exits_2(tmp_path, capsys):
    assert sweep(tmp_path, *FAST, "optim.lr=1e-3,3e-4", "--slurm", "--array=0-9") == 2
    assert "sets sbatch's --array itself" in capsys.readouterr().err
    assert sweep(tmp_path, *FAST, "optim.lr=1e-3,3e-4", "--slurm", "-p", "a100") == 2
    assert "needs the task's sbatch script" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_local_sweep_runs_every_point_once_and_resume_checks_the_base_config(tmp_path, capsys):
    preset = tmp_path / "base.yaml"
    preset.write_text("trainer:\n  max_steps: 4\n  val_every_n_steps: 2\n")
    args = ["-c", str(preset), FAST[0], *FAST[3:], "optim.lr=1e-3,3e-4", "--name", "lr"]
    assert sweep(tmp_path, *args) == 0
    captured = capsys.readouterr()
    (folder,) = sweep_folders(tmp_path)
    assert folder.name.startswith("001_") and folder.name.endswith("_lr")
    saved = read_sweep(folder)
    assert [p.dir_name for p in saved.points] == ["000_lr=1e-3", "001_lr=3e-4"]
    assert saved.base_config["trainer"]["max_steps"] == 4
    for point in saved.points:
        run = folder / point.dir_name
        assert point_status(run) == "completed" and (run / "final").is_dir()
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["logger"]["wandb_group"] == folder.name  # W&B groups the points
        assert config["optim"]["lr"] == float(point.values["optim.lr"])
    assert "best val/loss" in captured.out and "000" in captured.out  # the ranked table
    stamps = {
        p.dir_name: (folder / p.dir_name / "summary.json").stat().st_mtime_ns for p in saved.points
    }

    # The same command again, and --resume DIR: nothing is run twice.
    assert sweep(tmp_path, *args) == 0
    assert sweep(None, "--resume", str(folder)) == 0
    err = capsys.readouterr().err
    assert err.count("completed, skipped") == 4 and "starting" not in err
    assert stamps == {
        p.dir_name: (folder / p.dir_name / "summary.json").stat().st_mtime_ns for p in saved.points
    }
    assert len(sweep_folders(tmp_path)) == 1

    # Another command is another sweep; a new folder would be made for it.
    assert sweep(tmp_path, *args[:-2], "--dry-run") == 0
    assert "/sweeps/002_" in capsys.readouterr().out
    # The same command after its preset changed: the folder is found and not mixed with it.
    preset.write_text("trainer:\n  max_steps: 5\n  val_every_n_steps: 2\n")
    for again in (args, ["--resume", str(folder)]):
        assert sweep(tmp_path if again is args else None, *again) == 2
        err = capsys.readouterr().err
        assert "made from a different base config" in err and "trainer.max_steps: 4 -> 5" in err
    assert sweep(None, "--resume", str(folder), "optim.lr=1e-3,1e-2") == 2
    assert "was made by a different command" in capsys.readouterr().err
    assert len(sweep_folders(tmp_path)) == 1


@pytest.mark.slow
def test_a_sigkilled_sweep_stops_its_run_with_a_checkpoint_and_the_rerun_resumes_it(tmp_path):
    root = tmp_path / "runs"
    args = [
        f"run.root={root}",
        "trainer.accelerator=cpu",
        "trainer.max_steps=24",
        "trainer.batch_size=4",
        "trainer.log_every_n_steps=1",
        "trainer.val_every_n_steps=8",
        "data.collate_delay=0.05",
        "logger.progress_bar=false",
        "logger.plot=false",
        "optim.lr=1e-3,3e-4",
    ]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(
        [*SWEEP_CLI, *args], stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=tmp_path
    )
    deadline = time.time() + 240
    second = None
    while time.time() < deadline:
        second = next(iter(root.glob("sweeps/*/001_*/metrics.jsonl")), None)
        if second is not None and '"step": 10,' in second.read_text():
            break
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.05)
    else:
        raise TimeoutError("the second point did not reach step 10")
    proc.send_signal(signal.SIGKILL)  # the sweep dies at once; its train process gets SIGTERM
    proc.wait()
    run = second.parent
    deadline = time.time() + 120
    while point_status(run) not in ("interrupted", "completed", "failed"):
        assert time.time() < deadline, f"the orphaned run did not stop: {point_status(run)}"
        time.sleep(0.2)
    assert point_status(run) == "interrupted", "the run must checkpoint when its sweep is killed"
    stopped_at = json.loads((run / "summary.json").read_text())["global_step"]
    assert 10 <= stopped_at < 24
    first = run.parent / "000_lr=1e-3"
    first_stamp = (first / "summary.json").stat().st_mtime_ns

    done = subprocess.run(
        [*SWEEP_CLI, *args], capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "point 1/2 000_lr=1e-3: completed, skipped" in done.stderr
    assert "point 2/2 001_lr=3e-4: resuming (interrupted)" in done.stderr
    assert (first / "summary.json").stat().st_mtime_ns == first_stamp
    assert point_status(run) == "completed"
    assert "Resumed from" in (run / "train.log").read_text()
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "train/loss" in r]
    assert steps == list(range(1, 25)), "the step counter continues from the checkpoint"
