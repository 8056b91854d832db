"""The sbatch material without a cluster: syntax, the generated srun command lines (container
flags on and off, node-local venv or not), and the handling of secrets."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TASKS = ["summarization", "lora_llm", "qwen_vl"]
SCRIPTS = [REPO / "packages" / t / "slurm" / "train.sbatch" for t in TASKS]


def dry_run(
    script: Path, *args: str, **env: str
) -> tuple[list[list[str]], subprocess.CompletedProcess]:
    """Run an sbatch script with DRY_RUN=1 outside Slurm; return the commands it would run."""
    # UV: `uv run` exports the path of its own binary, which launch.sh would use instead of "uv".
    base = {
        k: v
        for k, v in os.environ.items()
        if k != "UV"
        and not k.startswith(("SLURM_", "HF_", "WANDB", "CONTAINER_", "LOCAL_SCRATCH", "VENV_DIR"))
    }
    base.update(
        {
            "REPO_DIR": str(REPO),
            "DRY_RUN": "1",
            "SLURM_NNODES": "2",
            "SLURM_NTASKS_PER_NODE": "4",
            "HOME": env.pop("HOME", str(REPO / "logs")),
            **env,
        }
    )
    done = subprocess.run(
        ["bash", str(script), *args], capture_output=True, text=True, env=base, timeout=60
    )
    commands = [shlex.split(line) for line in done.stdout.splitlines() if line.strip()]
    return commands, done


@pytest.mark.parametrize(
    "path",
    SCRIPTS + sorted((REPO / "slurm" / "lib").glob("*.sh")),
    ids=lambda p: str(p.relative_to(REPO)),
)
def test_bash_syntax(path):
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0


@pytest.mark.parametrize("script", SCRIPTS, ids=TASKS)
def test_sbatch_header_has_the_users_form(script):
    text = script.read_text()
    for directive in (
        "--job-name=",
        "--time=",
        "--nodes=",
        "--ntasks-per-node=",
        "--gres=gpu:",
        "--cpus-per-task=",
        "--mem=",
        "--output=logs/%x_%j.out",
        "--signal=USR1@",
        "--requeue",
        "--open-mode=append",
    ):
        assert f"#SBATCH {directive}" in text, directive


def test_srun_without_container_runs_the_tasks_trainer_with_slurm_counts():
    commands, done = dry_run(SCRIPTS[0], "-c", "tiny", "optim.lr=1e-4")
    assert done.returncode == 0, done.stderr
    sync, train = commands
    assert sync == [
        "uv",
        "sync",
        "--frozen",
        "--package",
        "summarization",
        "--directory",
        str(REPO),
        "--inexact",
    ]
    assert train == [
        "srun",
        "--kill-on-bad-exit=1",
        str(REPO / ".venv" / "bin" / "train"),
        "trainer.num_nodes=2",
        "trainer.devices=4",
        "trainer.accelerator=gpu",
        "-c",
        "tiny",
        "optim.lr=1e-4",
    ]
    assert "task summarization on 2 node(s) x 4 task(s)" in done.stderr


def test_srun_with_container_and_node_local_venv(tmp_path):
    commands, done = dry_run(
        SCRIPTS[2],
        CONTAINER_IMAGE="/images/torch.sqsh",
        CONTAINER_MOUNTS="/data:/data",
        LOCAL_SCRATCH=str(tmp_path / "nvme"),
    )
    assert done.returncode == 0, done.stderr
    sync, train = commands
    flags = [
        "--container-image=/images/torch.sqsh",
        f"--container-mounts={REPO}:{REPO},{tmp_path / 'nvme'}:{tmp_path / 'nvme'},/data:/data",
        "--no-container-mount-home",
        "--container-writable",
        f"--container-workdir={REPO}",
    ]
    # One set-up task per node builds the node-local venv, inside the container.
    assert sync[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert sync[4:9] == flags and sync[9:] == [
        "uv",
        "sync",
        "--frozen",
        "--package",
        "qwen_vl",
        "--directory",
        str(REPO),
    ]
    assert train[:2] == ["srun", "--kill-on-bad-exit=1"] and train[2:7] == flags
    assert train[7] == str(tmp_path / "nvme" / "venv-qwen_vl" / "bin" / "train")
    assert train[-2:] == ["-c", "qwen2_5_vl_3b"], "the default preset when no arguments are given"


def test_cpu_test_mode_uses_ddp_on_cpu():
    commands, done = dry_run(SCRIPTS[1], "-c", "tiny", DEVICE="cpu", SKIP_SYNC="1")
    assert done.returncode == 0, done.stderr
    (train,) = commands
    assert "trainer.accelerator=cpu" in train and "trainer.strategy=ddp" in train


def test_secrets_file_must_be_private_and_is_never_executed_or_echoed(tmp_path):
    secrets = tmp_path / "secrets.env"
    marker = tmp_path / "executed"
    secrets.write_text(
        f"HF_TOKEN=hf_from_file_123456\n$(touch {marker})\nWANDB_API_KEY='wandb_file_abcdef'\n"
    )
    secrets.chmod(0o644)
    _, done = dry_run(SCRIPTS[0], SECRETS_FILE=str(secrets), SKIP_SYNC="1")
    assert done.returncode == 2 and "is readable by other users (mode 644)" in done.stderr
    secrets.chmod(0o600)
    probe = REPO / "slurm" / "lib" / "env.sh"
    script = (
        f"set -x; TASK=summarization; REPO_DIR={REPO}; source {probe}; set +x; echo "
        '"HF=$HF_TOKEN W=$WANDB_API_KEY"'
    )
    done = subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        env={
            "PATH": os.environ["PATH"],
            "HOME": str(tmp_path),
            "SECRETS_FILE": str(secrets),
            "USER": "test",
        },
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "HF=hf_from_file_123456 W=wandb_file_abcdef"
    assert "hf_from_file_123456" not in done.stderr and "wandb_file_abcdef" not in done.stderr, (
        "xtrace must not print secrets"
    )
    assert not marker.exists(), "the secrets file must be parsed, not executed"


def test_old_wandb_key_variable_is_mapped_and_not_left_in_the_environment(tmp_path):
    script = (
        f"TASK=lora_llm; REPO_DIR={REPO}; source {REPO / 'slurm' / 'lib' / 'env.sh'}; echo "
        f'"$WANDB_API_KEY|${{WANDB_KEY:-unset}}"'
    )
    done = subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), "WANDB_KEY": "old_style_key_1"},
    )
    assert done.stdout.strip() == "old_style_key_1|unset"
