"""``sweep --slurm`` on a real (single-node, CPU) Slurm cluster: a 2-point sweep of the
summarization ``tiny`` preset is one job array; one array task is interrupted the way a time limit
does it (``scancel --signal=USR1``), checkpoints, requeues itself and resumes its own point folder;
both points end with the same weights as the points of a sweep that was never interrupted."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ARGS = [
    "-c",
    "tiny",
    "trainer.max_steps=30",
    "trainer.log_every_n_steps=1",
    "trainer.deterministic=true",
    "trainer.val_every_n_steps=1000",
    "data.max_val_samples=8",
    "generation.max_new_tokens=8",
    "logger.progress_bar=false",
    "optim.lr=1e-3,2e-3",
]


def submit_sweep(cluster, workdir: Path) -> tuple[str, Path]:
    """Submit the sweep as a job array (CPU mode, one process per array task).

    Returns:
        ``(array job id, sweep folder)``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    env = cluster.task_env(workdir, PYTHONUNBUFFERED="1")
    done = subprocess.run(
        [
            str(BIN / "sweep"),
            "--task",
            "summarization",
            *ARGS,
            f"run.root={workdir / 'runs'}",
            "--slurm",
            f"--chdir={workdir}",
            "--gres=none",
            "--ntasks-per-node=1",
            "--cpus-per-task=1",
            "--mem=4G",
            "--time=30",
            f"--partition={cluster.partition}",
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    job = done.stdout.strip().splitlines()[-1]
    assert job.isdigit(), done.stdout
    assert "--array=0-1%2" in done.stderr
    (folder,) = [p for p in (workdir / "runs" / "sweeps").iterdir() if not p.name.startswith(".")]
    return job, folder


def test_sweep_job_array_survives_usr1_on_one_task_with_unchanged_weights(slurm_cluster, tmp_path):
    from safetensors.torch import load_file

    full_job, full = submit_sweep(slurm_cluster, tmp_path / "full")
    for task in ("0", "1"):
        info = slurm_cluster.wait(f"{full_job}_{task}", timeout=900)
        log = tmp_path / "full" / "logs" / f"summarization_{full_job}_{task}.out"
        assert info["JobState"] == "COMPLETED", log.read_text()[-3000:] if log.is_file() else info

    job, cut = submit_sweep(slurm_cluster, tmp_path / "cut")
    metrics = cut / "001_lr=2e-3" / "metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics.is_file() and '"step": 3,' in metrics.read_text()):
        assert time.time() < deadline, "array task 1 did not reach step 3"
        state = slurm_cluster.job_state(f"{job}_1").get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), state
        time.sleep(0.2)
    slurm_cluster.run("scancel", "--signal=USR1", f"{job}_1")  # as --signal=USR1@N before the limit
    infos = {task: slurm_cluster.wait(f"{job}_{task}", timeout=900) for task in ("0", "1")}
    logs = {
        t: (tmp_path / "cut" / "logs" / f"summarization_{job}_{t}.out").read_text() for t in infos
    }
    assert all(i["JobState"] == "COMPLETED" for i in infos.values()), logs["1"][-3000:]
    assert int(infos["1"].get("Restarts", "0")) >= 1, f"array task 1 was not requeued: {infos['1']}"
    assert "Received SIGUSR1" in logs["1"] and "Requeued SLURM job" in logs["1"]
    assert "Resumed from" in logs["1"] and "Resumed from" not in logs["0"]
    assert int(infos["0"].get("Restarts", "0")) == 0

    for point in ("000_lr=1e-3", "001_lr=2e-3"):
        run = cut / point
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["global_step"] == 30
        steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert max(steps) == 30
        a = load_file(full / point / "final" / "model.safetensors")
        b = load_file(run / "final" / "model.safetensors")
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), (
            f"{point}: weights differ from the uninterrupted sweep's"
        )
    # The two points learned with different rates: the sweep really swept.
    a = load_file(cut / "000_lr=1e-3" / "final" / "model.safetensors")
    b = load_file(cut / "001_lr=2e-3" / "final" / "model.safetensors")
    assert any((a[k] != b[k]).any() for k in a)
    record = [json.loads(x) for x in (cut / "slurm" / "submissions.jsonl").read_text().splitlines()]
    assert [r["job_id"] for r in record] == [job]
