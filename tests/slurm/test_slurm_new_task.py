"""A package made by ``new-task`` trains on the real (single-node, CPU) Slurm cluster with its own
``slurm/train.sbatch``, right after generation, like the shipped tasks in test_slurm_jobs.py.

The package is generated in a copy of this workspace (``core.testing.workspace``), so the checkout
under test never changes; the job runs from that copy (``REPO_DIR``), syncs the new package into
the copy's venv on the node and trains ``-c tiny`` with 2 ranks.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from core.testing.workspace import clean_env, copy_workspace

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("uv") is None, reason="uv is not on PATH"),
]

REPO = Path(__file__).resolve().parents[2]


def test_a_new_task_package_trains_with_two_ranks_from_its_own_sbatch(slurm_cluster, tmp_path):
    workspace = copy_workspace(REPO, tmp_path / "ws")
    made = subprocess.run(
        [str(workspace / ".venv/bin/new-task"), "mood", "--kind", "classification"],
        cwd=workspace,
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=600,
    )
    assert made.returncode == 0, made.stderr
    job = slurm_cluster.submit_task(
        tmp_path,
        "mood",
        ["--ntasks-per-node=2", "--mem=8G", "--time=30"],
        ["trainer.max_steps=3", "trainer.log_every_n_steps=1"],
        repo=workspace,
    )
    info = slurm_cluster.wait(job, timeout=900)
    log = tmp_path / "logs" / f"mood_{job}.out"
    text = log.read_text() if log.is_file() else f"no log at {log}"
    assert info["JobState"] == "COMPLETED", text[-3000:]
    assert "GLOBAL_RANK: 0" in text and "GLOBAL_RANK: 1" in text, text[-3000:]
    runs = tmp_path / "runs"
    (run,) = [p for p in runs.iterdir() if p.is_dir() and not p.name.startswith(".")]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 3
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["slurm"]["SLURM_JOB_ID"] == job
    assert (run / "final").is_dir()
    # The job used the copy's environment, with the new package synced into it on the node.
    assert (workspace / ".venv" / "bin" / "train").is_file()
    assert not (REPO / "packages" / "mood").exists()
