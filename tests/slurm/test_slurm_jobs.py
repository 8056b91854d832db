"""Every task's sbatch script on a real (single-node, CPU) Slurm cluster.

Each task's ``train.sbatch`` in CPU mode on its ``tiny`` preset with 2 tasks (DDP over gloo
across the srun tasks): the run folder is complete, the log file is where the users expect it,
both ranks took part, and no secret from the environment or the secrets file leaks into any log,
manifest or config.

A running job interrupted the way a time limit does it (``scancel --signal=USR1``: checkpoint,
requeue, resume in the same run folder, the same weights as an uninterrupted job) is tested where
it also crosses nodes or tasks of an array: summarization with DDP and qwen_vl with FSDP2
(sharded checkpoints, one file per rank) in test_slurm_multinode.py, one task of a job array in
test_slurm_sweep.py; DDP's stop and exact resume without Slurm in
packages/core/tests/test_processes.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TASKS = ["summarization", "lora_llm", "qwen_vl"]
HF_SECRET = "hf_SlurmTestSecret0123456789"
WANDB_SECRET = "wandbSlurmTestSecretABCDEF"
FILE_SECRET = "hf_FromSecretsFile987654321"


def submit(cluster, workdir: Path, task: str, *train_args: str, **env: str) -> str:
    """Submit ``packages/<task>/slurm/train.sbatch`` in CPU mode with 2 tasks; returns the job
    id."""
    return cluster.submit_task(
        workdir, task, ["--ntasks-per-node=2", "--mem=8G", "--time=30"], list(train_args), **env
    )


def only_run(root: Path) -> Path:
    runs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.mark.parametrize("task", TASKS)
def test_each_task_trains_with_two_ranks_and_leaks_no_secret(slurm_cluster, tmp_path, task):
    secrets = tmp_path / "secrets.env"
    secrets.write_text(f"HUGGING_FACE_HUB_TOKEN={FILE_SECRET}\n")
    secrets.chmod(0o600)
    job = submit(
        slurm_cluster,
        tmp_path,
        task,
        "trainer.max_steps=3",
        "trainer.log_every_n_steps=1",
        HF_TOKEN=HF_SECRET,
        WANDB_API_KEY=WANDB_SECRET,
        SECRETS_FILE=str(secrets),
    )
    info = slurm_cluster.wait(job, timeout=900)
    log = tmp_path / "logs" / f"{task}_{job}.out"
    assert log.is_file(), (
        f"expected the log at logs/%x_%j.out: {list((tmp_path / 'logs').iterdir())}"
    )
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-3000:]
    assert "GLOBAL_RANK: 0" in text and "GLOBAL_RANK: 1" in text, (
        "both ranks must join the process group"
    )
    run = only_run(tmp_path / "runs")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 3
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["slurm"]["SLURM_JOB_ID"] == job
    assert (run / "final").is_dir() and (run / "config.yaml").is_file()
    for path in [
        log,
        *[
            p
            for p in run.rglob("*")
            if p.is_file() and p.suffix in (".json", ".jsonl", ".yaml", ".log", ".txt", ".csv")
        ],
    ]:
        content = path.read_text(errors="replace")
        for secret in (HF_SECRET, WANDB_SECRET, FILE_SECRET):
            assert secret not in content, f"secret leaked into {path}"
