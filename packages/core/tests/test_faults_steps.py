"""Faults at a training step: a non-finite loss or gradient norm (``trainer.on_nonfinite``), a
stop signal delivered several times at once (process group + ``uv run``'s forwarding), and a peer
rank that dies (``trainer.dist_timeout``)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core.config.loader import load_config
from core.engine.trainer import MAX_SKIPS_IN_A_ROW, Trainer
from core.errors import FaultError
from core.task.base import StepOutput
from core.testing.toy import ToyConfig, ToyTask, child_env, read_jsonl, script_result, wait_for_step

pytestmark = pytest.mark.faults  # the fault suite (issue 20): uv run pytest -m faults

REPO = Path(__file__).resolve().parents[3]
TOY = [sys.executable, "-m", "core.testing"]


def _run_dir(root: Path) -> Path:
    runs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(runs) == 1, runs
    return runs[0]


def _summary(root: Path) -> dict:
    return json.loads((_run_dir(root) / "summary.json").read_text())


class NaNAtSteps(ToyTask):
    """The toy task whose loss is NaN at the chosen optimizer steps (1-based; accumulation 1)."""

    nan_steps: set[int] = set()

    def training_step(self, model, batch) -> StepOutput:
        self.calls = getattr(self, "calls", 0) + 1
        out = super().training_step(model, batch)
        if self.calls in self.nan_steps:  # NaN that reaches the gradients, as a real one does
            return StepOutput(out.loss_sum * math.nan, out.num_tokens)
        return out


def _fit(tmp_path: Path, task_cls: type[ToyTask], *overrides: str):
    cfg = load_config(
        ToyConfig,
        overrides=[
            f"run.root={tmp_path / 'runs'}",
            "logger.progress_bar=false",
            "trainer.accelerator=cpu",
            "trainer.log_every_n_steps=1",
            *overrides,
        ],
    )
    return Trainer(cfg, task_cls(cfg), argv=["pytest", *overrides]).fit()


def _finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t.float()).all()) for t in state.values())


@pytest.mark.trains
def test_a_diverging_run_stops_at_the_first_nonfinite_step_naming_it_and_exports_nothing(
    tmp_path,
):
    """optim.lr=1e6 used to train on NaN, end `completed` and export a NaN final/."""
    with pytest.raises(FaultError) as caught:
        _fit(
            tmp_path,
            ToyTask,
            "optim.lr=1e6",
            "trainer.max_steps=12",
            "trainer.ckpt_every_n_steps=1",
        )
    run = _run_dir(tmp_path / "runs")
    message = str(caught.value)
    summary = _summary(tmp_path / "runs")
    step = summary["global_step"] + 1  # the step that went wrong was not counted as done
    assert f"Training stopped at step {step}:" in message and "nan" in message.lower()
    newest = run / "checkpoints" / f"step-{step - 1:07d}"
    assert f"last good checkpoint is {newest}" in message
    assert f"train run.dir={run} optim.lr=100000" in message
    assert "\n" not in message
    assert summary["status"] == "failed" and "Training stopped at step" in summary["error"]
    assert not (run / "final").exists()
    # No logged step at or after the bad one.
    assert all(r["step"] < step for r in read_jsonl(run / "metrics.jsonl") if "train/loss" in r)


@pytest.mark.trains
def test_skip_drops_the_nonfinite_step_counts_it_and_trains_on_to_finite_weights(tmp_path):
    class Task(NaNAtSteps):
        nan_steps = {3}

    result = _fit(tmp_path, Task, "trainer.on_nonfinite=skip", "trainer.max_steps=6")
    assert result.status == "completed"
    run = _run_dir(tmp_path / "runs")
    summary = _summary(tmp_path / "runs")
    assert summary["status"] == "completed" and summary["skipped_steps"] == 1
    records = {r["step"]: r for r in read_jsonl(run / "metrics.jsonl") if "train/loss" in r}
    assert sorted(records) == [1, 2, 3, 4, 5, 6]
    assert "train/skipped_steps" not in records[2] and records[3]["train/skipped_steps"] == 1
    # Only the skipped step in that interval: no loss to average (written as the string "nan").
    assert math.isnan(float(records[3]["train/loss"]))
    assert all(math.isfinite(records[s]["train/loss"]) for s in (1, 2, 4, 5, 6))
    from core.testing.toy import final_weights

    assert _finite(final_weights(run))


@pytest.mark.trains
def test_skip_still_stops_after_too_many_skipped_steps_in_a_row(tmp_path):
    class Task(NaNAtSteps):
        nan_steps = {2, 4, 5, 6, 7, 8, 9, 10}  # 2 alone is skipped; 4..8 is one row too many

    with pytest.raises(FaultError) as caught:
        _fit(tmp_path, Task, "trainer.on_nonfinite=skip", "trainer.max_steps=12")
    stop = 3 + MAX_SKIPS_IN_A_ROW
    assert f"Training stopped at step {stop}:" in str(caught.value)
    assert f"the {MAX_SKIPS_IN_A_ROW}th step in a row skipped" in str(caught.value)
    assert "No checkpoint was written before it" in str(caught.value)
    summary = _summary(tmp_path / "runs")
    assert summary["status"] == "failed" and summary["skipped_steps"] == MAX_SKIPS_IN_A_ROW
    assert not (_run_dir(tmp_path / "runs") / "final").exists()


@pytest.mark.slow
def test_a_diverging_run_exits_1_with_one_paragraph_through_the_command_line(tmp_path):
    done = subprocess.run(
        [
            *TOY,
            "train",
            "optim.lr=1e6",
            "trainer.max_steps=8",
            "logger.progress_bar=false",
            "trainer.accelerator=cpu",
            f"run.root={tmp_path}",
        ],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=300,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Training stopped at step" in done.stderr and "Traceback" not in done.stderr
    assert _summary(tmp_path)["status"] == "failed"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("uv") is None, reason="needs uv on PATH")
def test_sigint_to_the_process_group_of_uv_run_without_a_terminal_is_one_stop_request(tmp_path):
    """A script or supervisor signals the whole group of `uv run ... train` (no terminal): the
    trainer gets SIGINT from the group and again from uv, which forwards it. That used to count
    as Ctrl-C twice: `failed`, no checkpoint, exit 130."""
    log = tmp_path / "log"
    proc = subprocess.Popen(
        [
            "uv",
            "run",
            "--frozen",
            "python",
            "-m",
            "core.testing",
            "train",
            "trainer.max_steps=60",
            "trainer.log_every_n_steps=1",
            "data.collate_delay=0.2",
            "trainer.accelerator=cpu",
            "logger.progress_bar=false",
            f"run.root={tmp_path / 'runs'}",
        ],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        env=child_env(),
        start_new_session=True,
    )
    try:
        wait_for_step(tmp_path / "runs", 3, proc)
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 0, log.read_text()
    summary = _summary(tmp_path / "runs")
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGINT", summary
    run = _run_dir(tmp_path / "runs")
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == [
        f"step-{summary['global_step']:07d}"
    ]
    assert f"resume with: train run.dir={run}" in log.read_text()


_LATE_COPY_SCRIPT = """
import time
from core.engine.signals import StopSignal

class SlowTeardown:  # stands for a library whose clean-up at exit takes a moment (torch's does)
    def __del__(self):
        time.sleep(1.0)

keep = SlowTeardown()
with StopSignal() as stop:
    print("ready", flush=True)
    while stop.received is None:
        time.sleep(0.01)
print("stopped by", stop.name, flush=True)
"""


@pytest.mark.trains
@pytest.mark.skipif(shutil.which("uv") is None, reason="needs uv on PATH")
def test_uv_runs_copy_of_a_group_sigint_landing_after_a_quick_stop_does_not_kill_the_process(
    tmp_path,
):
    """`uv run` relays a SIGINT 200 ms after it got it. A run that stops sooner is shutting down
    by then, and Python puts back the default action while it shuts down: the copy used to kill
    the cleanly stopped process (exit 130; CI saw it when the step and checkpoint were quick)."""
    script = tmp_path / "late_copy.py"
    script.write_text(_LATE_COPY_SCRIPT)
    proc = subprocess.Popen(
        ["uv", "run", "--frozen", "python", str(script)],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
        start_new_session=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        os.killpg(proc.pid, signal.SIGINT)
        out = proc.stdout.read()
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert (code, out.strip()) == (0, "stopped by SIGINT")


def _peer_lost(text: str, code: int, left: list, runs: Path, stopped: str) -> dict:
    """What rank 0 of a 2-rank run shows when rank 1 is gone: exit 1, one paragraph naming the
    rank (no traceback), no process left in its session, summary ``failed`` with the reason.

    Returns:
        The run's summary.
    """
    assert code == 1, text
    assert stopped in text and "rank 1 is gone" in text, text
    assert "Traceback" not in text, text
    assert left == [], left
    summary = _summary(runs)
    assert summary["status"] == "failed" and "rank 1 is gone" in summary["error"]
    return summary


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(x) for x in (task / "children").read_text().split()]
    return found


def _session_alive(sid: int) -> list[int]:
    """Processes (not zombies) still in the session ``sid``."""
    alive = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and fields[0] != "Z":  # session id, state
                alive.append(int(entry.name))
    return alive


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc")
def test_a_killed_peer_rank_stops_the_other_with_one_paragraph_and_leaves_no_process(tmp_path):
    """SIGKILL rank 1 of a 2-rank DDP run: rank 0 used to end with a 30-line gloo traceback."""
    # Also how long rank 0 waits for rank 1 to start (imports take a while on a busy machine); a
    # dead peer is found at once anyway (its connection closes).
    timeout = 90
    log = tmp_path / "log"
    proc = subprocess.Popen(
        [
            *TOY,
            "train",
            "trainer.devices=2",
            "trainer.strategy=ddp",
            "trainer.accelerator=cpu",
            "trainer.batch_size=2",
            "trainer.max_steps=200",
            "trainer.log_every_n_steps=1",
            "trainer.ckpt_every_n_steps=2",
            "data.collate_delay=0.1",
            "logger.progress_bar=false",
            f"trainer.dist_timeout={timeout}",
            f"run.root={tmp_path / 'runs'}",
        ],
        stdin=subprocess.DEVNULL,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        env=child_env(),
        start_new_session=True,
    )
    try:
        wait_for_step(tmp_path / "runs", 3, proc)
        (rank1,) = _children(proc.pid)
        os.kill(rank1, signal.SIGKILL)
        killed = time.monotonic()
        code = proc.wait(timeout=timeout + 60)
        assert time.monotonic() - killed < timeout + 60
        left = _session_alive(proc.pid)
    finally:
        if proc.poll() is None or _session_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    _peer_lost(log.read_text(), code, left, tmp_path / "runs", "Rank 0 stopped at step")
    assert not (_run_dir(tmp_path / "runs") / "final").exists()


@pytest.mark.slow
def test_a_nan_on_one_rank_is_skipped_by_every_rank_at_the_same_step():
    """DDP, NaN loss on rank 1 only: without agreement rank 0 would step and rank 1 not, and
    the replicas would drift apart (or the NaN reach the weights through the synced gradients)."""
    result = script_result(Path(__file__).with_name("nonfinite_ranks_check.py"))
    assert result == {
        "status": "completed",
        "skipped_per_rank": [1, 1],
        "replicas_equal": True,
        "finite": True,
    }


@pytest.mark.trains
def test_the_way_on_that_a_stopped_run_names_works_with_the_lower_learning_rate(tmp_path):
    """`train run.dir=<run> optim.lr=<lower>` from the message: the resumed run goes on from the
    last good checkpoint with the lower rate (the checkpoint's optimizer and scheduler states
    used to bring the old one back)."""

    class Task(NaNAtSteps):
        nan_steps = {3}

    common = ["optim.scheduler=constant", "trainer.max_steps=5", "trainer.ckpt_every_n_steps=1"]
    with pytest.raises(FaultError) as caught:
        _fit(tmp_path, Task, *common)
    command = str(caught.value).split("with a lower learning rate: train ")[1].split(",")[0]
    overrides = command.split()
    assert overrides[1] == "optim.lr=3e-05", command
    result = _fit(tmp_path, ToyTask, *common, *overrides)
    assert result.status == "completed"
    lrs = {r["step"]: r["lr"] for r in read_jsonl(result.run_dir / "metrics.jsonl") if "lr" in r}
    assert lrs == {1: 3e-4, 2: 3e-4, 3: 3e-5, 4: 3e-5, 5: 3e-5}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc")
def test_a_peer_rank_dying_while_rank_0_is_outside_collectives_gives_one_paragraph(tmp_path):
    """Rank 1 exits while rank 0 spends 30 s in its collate, away from any collective: Lightning's
    watcher of the launched ranks used to SIGKILL rank 0 within 5 s (exit -9, no message, the
    summary left `running`)."""
    log = tmp_path / "log"
    proc = subprocess.Popen(
        [
            *TOY,
            "train",
            "trainer.devices=2",
            "trainer.strategy=ddp",
            "trainer.accelerator=cpu",
            "trainer.batch_size=2",
            "trainer.max_steps=200",
            "trainer.ckpt_every_n_steps=2",
            "data.peer_dies_at_batch=4",
            "logger.progress_bar=false",
            "trainer.dist_timeout=90",
            f"run.root={tmp_path / 'runs'}",
        ],
        stdin=subprocess.DEVNULL,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        env=child_env(),
        start_new_session=True,
    )
    try:
        code = proc.wait(timeout=150)
        left = _session_alive(proc.pid)
    finally:
        if proc.poll() is None or _session_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    summary = _peer_lost(text, code, left, tmp_path / "runs", "Rank 0 stopped at step 3 of")
    assert "step-0000002" in summary["error"], summary
