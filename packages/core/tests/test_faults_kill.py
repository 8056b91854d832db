"""SIGKILL at chosen points of writing a run's files (node failure, OOM killer, ``kill -9``).

``kill_points_check.py`` trains the toy task once uninterrupted and once per kill point, each
child killing itself with SIGKILL halfway through a checkpoint's ``state``, between ``state``
and its manifest, halfway through ``final/``, halfway through the completed ``summary.json`` and
in the middle of pruning an old checkpoint. For each point this checks what a user relies on:
the process died with -9; every ``step-*`` folder left is a complete, verified checkpoint and the
half-written folders are not listed as checkpoints; no half-written ``final/``; ``runs list``
shows the run as ``stopped (no live process)``; and resuming the run ends with final weights and
losses bit-identical to the uninterrupted run, with no temporary folder left behind.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from core.config.schema import CheckpointConfig
from core.parallel.checkpoint import (
    CKPT_PATTERN,
    CheckpointManager,
    read_checkpoint,
    verify_checkpoint,
)
from core.report import STOPPED
from core.report import main as runs_main
from core.run.folder import lock_state
from core.testing.toy import child_env, final_weights, train, train_losses

pytestmark = pytest.mark.faults  # the fault suite (issue 20): uv run pytest -m faults

DRIVER = Path(__file__).with_name("kill_points_check.py")
SETTINGS = [
    "trainer.max_steps=6",
    "trainer.ckpt_every_n_steps=2",
    "checkpoint.keep_last=1",  # so that saving step 4 prunes step 2
    "trainer.log_every_n_steps=1",
    "trainer.deterministic=true",
    "logger.progress_bar=false",
    "logger.plot=false",
    "trainer.accelerator=cpu",
]
# point -> (complete checkpoint steps left by the kill, leftovers that must not count as one)
POINTS: dict[str, tuple[list[int], list[str]]] = {
    "state_half": ([2], ["checkpoints/.tmp-step-0000004"]),
    "before_meta": ([2], ["checkpoints/.tmp-step-0000004"]),
    "final_half": ([6], ["final.tmp"]),
    "summary_half": ([6], ["summary.json.tmp"]),
    "prune_mid": ([4], ["checkpoints/.tmp-delete-step-0000002"]),
}


def only_run(root: Path) -> Path:
    runs = [p for p in root.iterdir() if p.is_dir() and p.name[:1].isdigit()]
    assert len(runs) == 1, runs
    return runs[0]


def resume(run: Path) -> int:
    """``train run.dir=<run> trainer.resume=auto`` with the same settings, in this process."""
    return train([f"run.dir={run}", "trainer.resume=auto", *SETTINGS])


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """One driver process: the uninterrupted reference run (``none``) and one killed run per
    point, under ``root/<point>``; returns ``(root, {point: {"pid", "signal", "exit"}})``."""
    root = tmp_path_factory.mktemp("kill")
    done = subprocess.run(
        [sys.executable, str(DRIVER), str(root), *POINTS, "--", *SETTINGS],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=600,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, output
    results = json.loads(line.removeprefix("RESULT "))
    assert (results["none"]["signal"], results["none"]["exit"]) == (None, 0), output
    return root, results


@pytest.mark.slow
@pytest.mark.parametrize("point", list(POINTS))
def test_a_run_killed_while_writing_keeps_only_complete_files_and_resumes_bit_identically(
    killed, point, capsys
):
    root, results = killed
    steps, leftovers = POINTS[point]
    assert results[point]["signal"] == signal.SIGKILL, results[point]  # reached and died, -9
    run = only_run(root / point)

    # What the kill left: only complete, verified checkpoints under checkpoint names.
    folders = sorted(p.name for p in (run / "checkpoints").iterdir())
    complete = [name for name in folders if CKPT_PATTERN.match(name)]
    assert complete == [f"step-{s:07d}" for s in steps], folders
    for name in complete:
        info = read_checkpoint(run / "checkpoints" / name)
        assert info.files and verify_checkpoint(info) is None, name
    manager = CheckpointManager(run / "checkpoints", CheckpointConfig(keep_last=1))
    good, bad = manager.scan()
    assert [c.step for c in good] == steps and bad == []
    if point == "summary_half":  # final/ was complete before the summary was begun
        assert (run / "final" / "model.safetensors").is_file()
    else:
        assert not (run / "final").exists(), "a half-written final/ must never be there"

    # The summary still says running, the lock names a dead process: stopped, not running.
    assert json.loads((run / "summary.json").read_text())["status"] == "running"
    lock = json.loads((run / "run.lock").read_text())
    assert lock["pid"] == results[point]["pid"] and lock_state(run) == "dead"
    capsys.readouterr()
    assert runs_main(["list", str(root / point), "--wide"]) == 0
    listing = capsys.readouterr().out
    assert STOPPED in listing and "corrupt" not in listing, listing
    for leftover in leftovers:  # the half-written thing itself, under a name no reader takes
        assert (run / leftover).exists(), f"the kill point {point} was not where it should be"

    # Resume the same run: it completes like the run that was never killed, bit for bit. Its
    # reference ran with one intra-op thread (child_env): so does the resume (another thread
    # count sums in another order, and CPU float sums are exact only in the same order).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = resume(run)
    finally:
        torch.set_num_threads(threads)
    assert code == 0, capsys.readouterr().err
    reference = only_run(root / "none")
    ref_weights, weights = final_weights(reference), final_weights(run)
    assert ref_weights.keys() == weights.keys()
    for key in ref_weights:
        assert torch.equal(ref_weights[key], weights[key]), key
    assert train_losses(run) == train_losses(reference)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 6
    assert not (run / "run.lock").exists()
    assert [c.step for c in manager.list()] == [6]
    left = [p.name for p in run.rglob("*") if p.name.startswith(".tmp-") or p.suffix == ".tmp"]
    assert left == [], left
