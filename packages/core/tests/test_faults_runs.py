"""Faults of run identity, the run lock and the run records (issue 20, items 1 and 7).

- A second ``train`` in the same SLURM job incarnation gets a new folder; a requeue (higher
  ``SLURM_RESTART_COUNT``) continues the run of the same command line.
- A live ``run.lock`` refuses a second writer (exit 2, the owner named, the folder untouched); a
  dead owner's lock is taken over with a warning; ``runs list`` shows a SIGKILLed run as
  ``stopped (no live process)``.
- A torn last line of ``metrics.jsonl`` is dropped with a warning (compare, resume); a corrupt
  ``summary.json`` is listed as ``corrupt`` with its path; ``runs compare`` refuses runs of two
  tasks or metrics and a ``--png`` that is not a PNG; ``runs list`` fits the terminal.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from core.config.loader import load_config
from core.engine.trainer import FitResult, Trainer
from core.report import main as runs_main
from core.run.folder import LOCK_NAME, STALE_SECONDS, owner_dead, read_lock
from core.testing.toy import ToyConfig, ToyTask, child_env
from core.testing.toy import train as toy_train

pytestmark = pytest.mark.faults  # the fault suite (issue 20): uv run pytest -m faults

SHORT = ("trainer.max_steps=4", "trainer.val_every_n_steps=2", "logger.plot=false")
BASE = ("logger.progress_bar=false", "trainer.accelerator=cpu")


class OtherToyTask(ToyTask):
    """The toy task under another name: a second task whose runs share the runs root."""

    name = "toy2"


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests set the SLURM variables they need; none leak in from a CI job."""
    for key in list(os.environ):
        if key.startswith("SLURM_"):
            monkeypatch.delenv(key)


@pytest.fixture
def train_toy(tmp_path: Path) -> Callable[..., FitResult]:
    """``train_toy(*overrides, task=ToyTask)``: a toy training in this process under
    ``tmp_path/runs``; the overrides are its command line."""

    def run(*overrides: str, task: type[ToyTask] = ToyTask) -> FitResult:
        args = [f"run.root={tmp_path / 'runs'}", *BASE, *overrides]
        cfg = load_config(ToyConfig, overrides=args)
        return Trainer(cfg, task(cfg), argv=["toy-train", *overrides]).fit()

    return run


def runs(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """``runs ARGS`` in this process: ``(exit code, stdout, stderr)`` of that command only."""
    capsys.readouterr()
    code = runs_main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``folder``: size, modification time and SHA-256."""
    return {
        str(p.relative_to(folder)): (
            p.stat().st_size,
            p.stat().st_mtime_ns,
            hashlib.sha256(p.read_bytes()).hexdigest(),
        )
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------------------------------
# Run identity under SLURM
# ------------------------------------------------------------------------------------------


@pytest.mark.trains
def test_second_train_in_one_slurm_job_gets_a_new_folder_and_a_requeue_continues_its_own(
    train_toy, monkeypatch
):
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    seed1 = train_toy(*SHORT, "trainer.seed=1").run_dir
    final1 = snapshot(seed1 / "final")
    seed2 = train_toy(*SHORT, "trainer.seed=2").run_dir
    again1 = train_toy(*SHORT, "trainer.seed=1").run_dir  # the same command, a second time
    assert len({seed1, seed2, again1}) == 3, "each train of one job incarnation is a new run"
    assert "seed: 1" in (seed1 / "config.yaml").read_text()
    assert snapshot(seed1 / "final") == final1, "the first run's model was not replaced"

    # SLURM requeued the job: the script trains seed 2, then seed 1 twice, then seed 1 again.
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert train_toy(*SHORT, "trainer.seed=2").run_dir == seed2, "matched by command line"
    assert train_toy(*SHORT, "trainer.seed=1").run_dir == seed1
    assert train_toy(*SHORT, "trainer.seed=1").run_dir == again1, "then the next of that command"
    fourth = train_toy(*SHORT, "trainer.seed=1").run_dir
    assert fourth not in (seed1, seed2, again1)
    for run in (seed1, seed2, again1, fourth):
        assert json.loads((run / "summary.json").read_text())["status"] == "completed"
        assert not (run / LOCK_NAME).exists(), "the lock goes when fit ends"


# ------------------------------------------------------------------------------------------
# The run lock
# ------------------------------------------------------------------------------------------

HOLDER = (
    "import sys, time; from pathlib import Path; from core.run.folder import RunLock; "
    "RunLock.acquire(Path(sys.argv[1])); print('locked', flush=True); time.sleep(300)"
)


@pytest.mark.trains
def test_a_live_lock_refuses_a_second_writer_and_a_dead_owners_lock_is_taken_over(
    train_toy, tmp_path, capsys, caplog
):
    run = train_toy(*SHORT).run_dir
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True, env=child_env()
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(run)
        again = [f"run.root={tmp_path / 'runs'}", *BASE, *SHORT, f"run.dir={run}"]
        code = toy_train(again)
        err = capsys.readouterr().err
        (error,) = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2, err
        assert f"pid {holder.pid} on host {os.uname().nodename} since " in error
        assert "being trained by another process" in error and str(run) in error
        assert snapshot(run) == before, "nothing written into the locked folder"

        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        assert read_lock(run)["pid"] == holder.pid  # a dead owner's lock stays behind
        caplog.clear()
        assert toy_train([*again, "trainer.max_steps=6"]) == 0, capsys.readouterr().err
        assert any(
            "Taking over the lock" in r.message and "its process is gone" in r.message
            for r in caplog.records
        ), [r.message for r in caplog.records]
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["global_step"] == 6
        assert not (run / LOCK_NAME).exists()
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_owners_on_other_hosts_are_dead_after_a_stale_heartbeat_or_a_requeue_of_their_job():
    now = time.time()
    other = {"pid": 1, "host": "another-node", "since": now - 7200, "job": "9_3", "restart": 0}
    assert owner_dead({**other, "heartbeat": now - 30}, env={}, now=now) is None
    stale = owner_dead({**other, "heartbeat": now - STALE_SECONDS - 60}, env={}, now=now)
    assert stale is not None and "heartbeat" in stale
    fresh = {**other, "heartbeat": now - 30}
    same_job = {"SLURM_ARRAY_JOB_ID": "9", "SLURM_ARRAY_TASK_ID": "3"}
    assert owner_dead(fresh, env=same_job, now=now) is None, "the same incarnation: alive"
    requeued = {**same_job, "SLURM_RESTART_COUNT": "1"}
    assert owner_dead(fresh, env=requeued, now=now) == "SLURM requeued its job"


@pytest.mark.slow
def test_a_sigkilled_run_is_listed_as_stopped_and_continued_after_taking_over_its_lock(
    tmp_path, capsys, caplog
):
    root = tmp_path / "runs"
    args = [
        f"run.root={root}",
        *BASE,
        "trainer.max_steps=12",
        "trainer.log_every_n_steps=1",
        "trainer.ckpt_every_n_steps=2",
        "logger.plot=false",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "core.testing", "train", *args, "data.collate_delay=0.2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=child_env(),
    )
    try:
        deadline = time.time() + 120
        while not list(root.glob("*/checkpoints/step-0000002/meta.json")):
            assert proc.poll() is None and time.time() < deadline, "the run ended too early"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    (run,) = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert json.loads((run / "summary.json").read_text())["status"] == "running"
    code, out, _ = runs(capsys, "list", str(root))
    assert code == 0 and out.splitlines()[2].split()[2:6] == ["stopped", "(no", "live", "process)"]
    # where it got to: the last step it logged (its summary still says step 0)
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(logged) >= 2 and out.splitlines()[2].split()[6] == f"{max(logged)}/?"

    caplog.clear()
    assert toy_train([*args, f"run.dir={run}"]) == 0, capsys.readouterr().err
    assert any("Taking over the lock" in r.message for r in caplog.records)
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    code, out, _ = runs(capsys, "list", str(root))
    assert out.splitlines()[2].split()[2:4] == ["completed", "12/12"]


# ------------------------------------------------------------------------------------------
# Run records
# ------------------------------------------------------------------------------------------


@pytest.mark.trains
def test_a_torn_last_metrics_line_is_dropped_with_a_warning_in_compare_and_resume(
    train_toy, tmp_path, capsys, caplog
):
    a = train_toy(*SHORT, "optim.lr=1e-3").run_dir
    b = train_toy(*SHORT, "optim.lr=3e-4").run_dir
    metrics = a / "metrics.jsonl"
    with open(metrics, "a", encoding="utf-8") as handle:
        handle.write('{"step": 5, "train/lo')  # a run killed in the middle of a write
    caplog.clear()
    code, out, err = runs(capsys, "compare", str(a), str(b), "--png", str(tmp_path / "c.png"))
    assert code == 0, err
    assert (tmp_path / "c.png").is_file()
    assert any(str(metrics) in r.message and "torn last line" in r.message for r in caplog.records)

    caplog.clear()
    resumed = train_toy("trainer.max_steps=6", "trainer.val_every_n_steps=2", f"run.dir={a}")
    assert resumed.status == "completed" and resumed.step == 6
    assert any(str(metrics) in r.message and "torn" in r.message for r in caplog.records)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]  # all whole
    assert max(r["step"] for r in records) == 6 and '"train/lo\n' not in metrics.read_text()

    # Damage before the last line is no crash artefact: reported by path and line, exit 1.
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text(lines[0] + "{not json\n" + "".join(lines[1:]))
    code, _, err = runs(capsys, "compare", str(a), str(b), "--png", str(tmp_path / "c.png"))
    assert code == 1 and f"The metrics file {metrics} is corrupt at line 2" in err


@pytest.mark.trains
def test_a_corrupt_summary_is_listed_as_corrupt_with_its_path(train_toy, tmp_path, capsys):
    a = train_toy(*SHORT).run_dir
    summary = a / "summary.json"
    summary.write_text(summary.read_text()[:40])
    code, out, _ = runs(capsys, "list", str(tmp_path / "runs"))
    assert code == 0
    assert out.splitlines()[2].split()[2] == "corrupt"
    assert f"corrupt: {summary} is corrupt" in out


@pytest.mark.trains
def test_compare_refuses_two_tasks_or_two_metrics_and_a_png_name_that_is_not_png(
    train_toy, tmp_path, capsys
):
    toy = train_toy(*SHORT).run_dir
    other = train_toy(*SHORT, task=OtherToyTask).run_dir
    accuracy = train_toy(*SHORT, "checkpoint.monitor=val/accuracy", "checkpoint.mode=max").run_dir
    code, _, err = runs(capsys, "compare", str(toy), str(other), "--no-png")
    assert code == 2 and err.count("\n") == 1
    assert "2 different tasks (toy: 001; toy2: 002)" in err and "--mixed" in err
    code, out, _ = runs(capsys, "compare", str(toy), str(other), "--no-png", "--mixed")
    assert code == 0 and len(out.splitlines()) == 4
    code, _, err = runs(capsys, "compare", str(toy), str(accuracy), "--no-png")
    assert code == 2 and "2 different monitored metrics (val/loss: 001; val/accuracy: 003)" in err

    plot = tmp_path / "plot.txt"
    code, out, err = runs(capsys, "compare", str(toy), str(other), "--mixed", "--png", str(plot))
    assert code == 2 and "must end in .png" in err and err.count("\n") == 1
    assert not plot.exists() and not list(tmp_path.glob("plot*"))


@pytest.mark.trains
def test_list_of_two_tasks_with_long_differing_keys_fits_100_columns_and_wide_shows_all(
    train_toy, tmp_path, capsys, monkeypatch
):
    long = "a-project-name-that-is-much-longer-than-any-terminal-column-" * 2
    for task in (ToyTask, OtherToyTask):
        for i in range(2):
            train_toy(
                *SHORT,
                f"logger.wandb_project={long}{i}",
                f"logger.wandb_group=group-{i}-{long}",
                f"optim.lr={i + 1}e-3",
                f"optim.weight_decay=0.0{i}",
                f"trainer.seed={i}",
                task=task,
            )
    monkeypatch.setenv("COLUMNS", "100")
    code, out, _ = runs(capsys, "list", str(tmp_path / "runs"))
    assert code == 0
    lines = out.splitlines()
    assert max(map(len, lines)) <= 100, "\n".join(lines)
    assert lines[0] == "task toy:" and "task toy2:" in lines
    assert sum(line.startswith("#") for line in lines) == 2, "one table per task"
    assert "--wide" in out and "…" in out

    code, out, _ = runs(capsys, "list", str(tmp_path / "runs"), "--wide")
    assert code == 0 and max(map(len, out.splitlines())) > 100
    assert f"{long}1" in out and "…" not in out


def test_a_sweep_point_whose_process_is_gone_is_stopped_not_running(tmp_path):
    """A sweep's own view of its points agrees with ``runs list``: ``running`` only while the
    run's lock has a live owner."""
    from core.report import STOPPED
    from core.run.folder import RunLock
    from core.sweep import point_status

    point = tmp_path / "001_20261204_120000_p"
    point.mkdir()
    (point / "summary.json").write_text(json.dumps({"status": "running"}))
    assert point_status(point) == STOPPED  # no lock: nobody trains it
    lock = RunLock.acquire(point)
    try:
        assert point_status(point) == "running"
    finally:
        lock.release()
    assert point_status(point) == STOPPED
