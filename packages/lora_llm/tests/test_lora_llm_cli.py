"""Real processes: the command-line entry points and their exit codes, QLoRA with DDP and LoRA
with FSDP2 on 2 CPU processes (gloo), and the GPU-only paths (FSDP2 LoRA and QLoRA on CUDA),
skipped without a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.testing.toy import child_env, train_losses

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
CLI = [sys.executable, "-m", "lora_llm.cli"]


def env(**extra: str) -> dict[str, str]:
    """The test environment for subprocesses: offline, one thread, no SLURM or task selection."""
    return child_env(**extra)


def run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a command, capturing its output."""
    return subprocess.run(args, capture_output=True, text=True, env=env(), timeout=timeout)


def only_run(root: Path) -> Path:
    """The single run folder under ``root``."""
    runs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(runs) == 1, runs
    return runs[0]


def test_entry_points_and_exit_codes(tmp_path):
    # The shared `train` of core dispatches to this package; --dry-run needs no weights and no
    # network.
    done = run([str(BIN / "train"), "--task", "lora_llm", "-c", "tinyllama", "--dry-run"])
    assert done.returncode == 0, done.stderr
    assert "1,102,301,184 total, 2,252,800 trainable" in done.stdout
    # A Hub preset offline: exit code 2, one clear paragraph, fast, no run folder.
    start = time.time()
    done = run([str(BIN / "lora-llm-train"), "-c", "phi2", f"run.root={tmp_path / 'runs'}"])
    assert done.returncode == 2, done.stdout + done.stderr
    assert (
        "error: Cannot load the tokenizer 'microsoft/phi-2'" in done.stderr
        and "-c tiny" in done.stderr
    )
    assert time.time() - start < 60 and not (tmp_path / "runs").exists()
    # infer with an adapter folder that does not exist.
    done = run(
        [
            str(BIN / "infer"),
            "--task",
            "lora_llm",
            "--adapter",
            str(tmp_path / "missing"),
            "--prompt",
            "Hi",
        ]
    )
    assert done.returncode == 2 and "does not exist" in done.stderr, done.stderr
    # merge without its required arguments: argparse's usage error, also code 2.
    done = run([*CLI, "merge", "--adapter", str(tmp_path)])
    assert done.returncode == 2 and "--out" in done.stderr


def test_qlora_ddp_on_two_cpu_processes_matches_one_process(tmp_path, run_tiny):
    """2 ranks x batch 4 == 1 rank x batch 8 for a 4-bit base with LoRA (gloo, real processes)."""
    common = [
        "trainer.max_steps=3",
        "trainer.max_epochs=null",
        "data.max_samples=64",
        "lora.dropout=0",
        "trainer.log_every_n_steps=1",
        "trainer.val_every_n_steps=null",
        "logger.progress_bar=false",
        "logger.plot=false",
        "trainer.accelerator=cpu",
    ]
    done = run(
        [
            *CLI,
            "train",
            "-c",
            "tiny",
            *common,
            "trainer.devices=2",
            "trainer.strategy=ddp",
            "trainer.batch_size=4",
            f"run.root={tmp_path / 'two'}",
        ],
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    two = only_run(tmp_path / "two")
    one = run_tiny(*common, "trainer.batch_size=8", root="one").run_dir
    summary = json.loads((two / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert len(summary["rank_weight_sha256"]) == 2 and len(set(summary["rank_weight_sha256"])) == 1
    a, b = (
        load_file(two / "final" / "adapter_model.safetensors"),
        load_file(one / "final" / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    losses_two, losses_one = train_losses(two), train_losses(one)
    assert sorted(losses_two) == [1, 2, 3] and all(
        abs(losses_two[s] - losses_one[s]) < 1e-5 for s in losses_two
    )
    # The second rank loaded the base that rank 0 wrote into the run folder.
    assert (two / "base" / "model.safetensors").is_file()


FSDP2_LORA = [
    "quant.bits=null",
    "model.dtype=bfloat16",
    "optim.name=adamw",
    "trainer.strategy=fsdp",
    "trainer.devices=2",
    "trainer.max_steps=6",
    "trainer.max_epochs=null",
    "data.max_samples=64",
    "trainer.val_every_n_steps=3",
    "trainer.deterministic=true",
    "checkpoint.keep_last=5",
    "logger.progress_bar=false",
    "logger.plot=false",
]


def test_fsdp2_lora_with_a_16_bit_base_keeps_adapter_only_checkpoints_and_resumes_exactly(tmp_path):
    """LoRA on a bfloat16 base sharded per decoder layer over 2 CPU ranks: the checkpoints hold only
    the adapter (and its optimizer state), a run resumed from step 3 ends with the same adapter,
    and final/ loads with plain PeftModel.from_pretrained."""
    done = run(
        [
            *CLI,
            "train",
            "-c",
            "tiny",
            *FSDP2_LORA,
            "trainer.accelerator=cpu",
            f"run.root={tmp_path / 'full'}",
        ],
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    full = only_run(tmp_path / "full")
    assert json.loads((full / "manifest.json").read_text())["strategy"] == "FSDP2Strategy"
    import torch.distributed.checkpoint as dcp

    state = full / "checkpoints" / "step-0000003" / "state"
    stored = dcp.FileSystemReader(state).read_metadata().state_dict_metadata
    model_keys = [k for k in stored if k.startswith("model.")]
    assert len(model_keys) == 16 and all(".lora_A." in k or ".lora_B." in k for k in model_keys), (
        model_keys
    )
    assert sorted(p.name for p in state.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]

    done = run(
        [
            *CLI,
            "train",
            "-c",
            "tiny",
            *FSDP2_LORA,
            "trainer.accelerator=cpu",
            f"run.root={tmp_path / 'resumed'}",
            f"trainer.resume={full / 'checkpoints' / 'step-0000003'}",
        ],
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    resumed = only_run(tmp_path / "resumed")
    a = load_file(full / "final" / "adapter_model.safetensors")
    b = load_file(resumed / "final" / "adapter_model.safetensors")
    assert len(a) == 16 and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(resumed) == {s: v for s, v in train_losses(full).items() if s > 3}

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(full / "base", dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(base, full / "final")
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == 16 and all(
        torch.equal(loaded[k.replace(".weight", ".default.weight")], v) for k, v in a.items()
    )


def test_qlora_under_fsdp_is_refused_naming_ddp(tmp_path):
    done = run([*CLI, "train", "-c", "tiny", "trainer.strategy=fsdp", f"run.root={tmp_path}"])
    assert (
        done.returncode == 2 and "Use trainer.strategy=ddp for QLoRA on several GPUs" in done.stderr
    ), done.stderr
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


@pytest.mark.gpu
@pytest.mark.skipif(
    torch.cuda.device_count() < 1, reason="FSDP2 on CUDA needs a GPU; this machine has none"
)
def test_fsdp2_lora_on_gpus(tmp_path):
    """LoRA (16-bit base, no quantization) sharded with FSDP2 over every visible GPU."""
    devices = torch.cuda.device_count()
    done = run(
        [
            *CLI,
            "train",
            "-c",
            "tiny",
            "quant.bits=null",
            "optim.name=adamw",  # the preset's paged_adamw_8bit cannot step DTensor shards
            "trainer.strategy=fsdp",
            f"trainer.devices={devices}",
            "trainer.accelerator=cuda",
            "trainer.max_steps=4",
            "trainer.max_epochs=null",
            "data.max_samples=64",
            "logger.progress_bar=false",
            f"run.root={tmp_path}",
        ],
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = only_run(tmp_path)
    assert json.loads((result / "manifest.json").read_text())["strategy"] == "FSDP2Strategy"
    tensors = load_file(result / "final" / "adapter_model.safetensors")
    assert len(tensors) == 16 and all(torch.isfinite(t).all() for t in tensors.values())


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="QLoRA on CUDA needs a GPU; this machine has none"
)
def test_qlora_on_a_gpu_with_bf16_compute(tmp_path):
    done = run(
        [
            *CLI,
            "train",
            "-c",
            "tiny",
            "trainer.accelerator=cuda",
            "trainer.devices=1",
            "trainer.max_steps=4",
            "trainer.max_epochs=null",
            "data.max_samples=64",
            "logger.progress_bar=false",
            f"run.root={tmp_path}",
        ],
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = only_run(tmp_path)
    metrics = [json.loads(line) for line in (result / "metrics.jsonl").read_text().splitlines()]
    assert any("memory/peak_allocated_gb" in m for m in metrics)
    done = run(
        [
            *CLI,
            "infer",
            "--adapter",
            str(result / "final"),
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "4",
        ]
    )
    assert done.returncode == 0, done.stderr
