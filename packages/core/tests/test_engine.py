"""The trainer in one process: run folder, equivalences, checkpoints, resume, loggers,
optimizers."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from core.config.schema import CheckpointConfig
from core.errors import UserError
from core.parallel.checkpoint import CheckpointManager
from core.testing.toy import final_weights, max_weight_diff, read_jsonl, train_losses


@pytest.mark.trains
def test_run_folder_has_everything_and_final_loads_with_from_pretrained(run_toy, tmp_path):
    result = run_toy(
        "trainer.max_steps=6",
        "trainer.batch_size=4",
        "trainer.val_every_n_steps=3",
        "trainer.log_every_n_steps=2",
        "run.name=smoke",
    )
    run = result.run_dir
    assert result.status == "completed" and result.step == 6
    assert (
        run.parent == tmp_path / "runs"
        and run.name.startswith("001_")
        and run.name.endswith("_smoke")
    )
    for name in (
        "config.yaml",
        "manifest.json",
        "metrics.jsonl",
        "metrics.csv",
        "train.log",
        "summary.json",
        "curves.png",
    ):
        assert (run / name).is_file(), name
    # config.yaml is the resolved config: it builds the same config again.
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["trainer"]["precision"] == "32-true" and saved["trainer"]["max_steps"] == 6
    manifest = json.loads((run / "manifest.json").read_text())
    for key in (
        "seed",
        "python",
        "torch",
        "cuda",
        "distributions",
        "git",
        "uv_lock",
        "data_files",
        "metrics",
        "command",
        "host",
        "slurm",
        "gpus",
    ):
        assert key in manifest, key
    assert manifest["distributions"]["torch"] and manifest["uv_lock"]["sha256"]
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records if "train/loss" in r] == [2, 4, 6]
    train_records = [r for r in records if "train/loss" in r]
    assert {
        "lr",
        "throughput/samples_per_sec",
        "throughput/tokens_per_sec",
        "train/grad_norm",
        "epoch",
    } <= set(train_records[0])
    padding = [r for r in records if "data/padding_share" in r]
    assert padding and 0.0 < padding[0]["data/padding_share"] < 1.0
    assert [r["step"] for r in records if "val/loss" in r] == [3, 6]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 6
    assert summary["best"]["metric"] == "val/loss" and summary["samples_per_sec"] > 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-0000003",
        "step-0000006",
    ]

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run / "final")
    assert (run / "final" / "model.safetensors").is_file()
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 50)


@pytest.mark.trains
def test_accumulation_equivalence_8x1_equals_2x4(run_toy):
    common = (
        "model.dropout=0",
        "trainer.max_steps=4",
        "trainer.log_every_n_steps=1",
        "trainer.val_at_end=false",
    )
    big = run_toy(*common, "trainer.batch_size=8", "trainer.accumulate_grad_batches=1", root="big")
    small = run_toy(
        *common, "trainer.batch_size=2", "trainer.accumulate_grad_batches=4", root="small"
    )
    diff = max_weight_diff(final_weights(big.run_dir), final_weights(small.run_dir))
    assert diff < 1e-5, diff
    big_losses, small_losses = train_losses(big.run_dir), train_losses(small.run_dir)
    assert big_losses.keys() == small_losses.keys() == {1, 2, 3, 4}
    assert all(abs(big_losses[s] - small_losses[s]) < 1e-5 for s in big_losses)
    # The classic bug (mean of per-micro-batch means) gives a different model on variable-length
    # data.
    naive = run_toy(
        *common,
        "trainer.batch_size=2",
        "trainer.accumulate_grad_batches=4",
        "trainer.loss_normalization=mean",
        root="naive",
    )
    assert max_weight_diff(final_weights(big.run_dir), final_weights(naive.run_dir)) > 100 * max(
        diff, 1e-7
    )


@pytest.mark.trains
def test_same_seed_same_losses_other_seed_other_losses(run_toy):
    args = (
        "trainer.max_steps=5",
        "trainer.log_every_n_steps=1",
        "trainer.deterministic=true",
        "trainer.val_at_end=false",
    )
    a = train_losses(run_toy(*args, root="a").run_dir)
    b = train_losses(run_toy(*args, root="b").run_dir)
    c = train_losses(run_toy(*args, "trainer.seed=7", root="c").run_dir)
    assert a == b
    assert a != c


@pytest.mark.trains
def test_resume_from_path_matches_uninterrupted_run(run_toy):
    args = (
        "trainer.max_steps=8",
        "trainer.log_every_n_steps=1",
        "trainer.ckpt_every_n_steps=2",
        "checkpoint.keep_last=10",
        "trainer.deterministic=true",
    )
    full = run_toy(*args, root="full")
    ckpt = full.run_dir / "checkpoints" / "step-0000004"
    resumed = run_toy(*args, f"trainer.resume={ckpt}", root="resumed")
    assert max_weight_diff(final_weights(full.run_dir), final_weights(resumed.run_dir)) == 0.0
    full_losses, resumed_losses = train_losses(full.run_dir), train_losses(resumed.run_dir)
    assert sorted(resumed_losses) == [5, 6, 7, 8]
    assert all(resumed_losses[s] == full_losses[s] for s in resumed_losses)


@pytest.mark.trains
def test_resume_off_refuses_a_run_folder_with_checkpoints(run_toy, tmp_path):
    first = run_toy("trainer.max_steps=2")
    with pytest.raises(UserError, match="already has checkpoints"):
        run_toy("trainer.max_steps=4", f"run.dir={first.run_dir}", "trainer.resume=null")
    # resume=auto continues it; metrics of the first session stay.
    again = run_toy(
        "trainer.max_steps=4", f"run.dir={first.run_dir}", "trainer.log_every_n_steps=1"
    )
    assert again.run_dir == first.run_dir and again.step == 4
    assert sorted(train_losses(first.run_dir)) == [2, 3, 4]
    with pytest.raises(UserError, match="is not a complete checkpoint"):
        run_toy("trainer.max_steps=2", f"trainer.resume={tmp_path / 'nowhere'}")


@pytest.mark.trains
def test_keep_last_k_and_best_k_by_monitored_metric(run_toy):
    result = run_toy(
        "trainer.max_steps=6",
        "trainer.val_every_n_steps=1",
        "checkpoint.keep_last=2",
        "checkpoint.keep_best=1",
        "checkpoint.monitor=val/accuracy",
        "checkpoint.mode=max",
        "optim.lr=3e-3",
    )
    manager = CheckpointManager(
        result.run_dir / "checkpoints", CheckpointConfig(monitor="val/accuracy", mode="max")
    )
    steps = [c.step for c in manager.list()]
    best = manager.best()
    expected = sorted({5, 6, best.step})
    assert steps == expected
    metrics = read_jsonl(result.run_dir / "metrics.jsonl")
    accuracy = {r["step"]: r["val/accuracy"] for r in metrics if "val/accuracy" in r}
    assert best.metrics["val/accuracy"] == max(accuracy.values())
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["best"]["step"] == best.step


@pytest.mark.trains
def test_a_save_killed_before_its_rename_leaves_the_previous_checkpoint_usable(
    run_toy, monkeypatch
):
    result = run_toy(
        "trainer.max_steps=2", "trainer.ckpt_every_n_steps=1", "checkpoint.keep_last=5"
    )
    ckpts = result.run_dir / "checkpoints"
    from lightning.fabric import Fabric

    import core.parallel.checkpoint as checkpoint_module

    fabric = Fabric(accelerator="cpu", devices=1)
    manager = CheckpointManager(ckpts, CheckpointConfig(keep_last=5))

    def dies(*args, **kwargs):
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(checkpoint_module.os, "replace", dies)
    with pytest.raises(KeyboardInterrupt):
        manager.save(fabric, {"model": torch.nn.Linear(2, 2)}, step=3)
    monkeypatch.undo()
    assert (ckpts / ".tmp-step-0000003").is_dir()  # the half-written one
    assert manager.latest().step == 2  # ...is not a checkpoint
    state = torch.load(manager.latest().state_path, weights_only=False)
    assert state["progress"]["step"] == 2
    manager.save(fabric, {"model": torch.nn.Linear(2, 2)}, step=3)
    assert not list(ckpts.glob(".tmp-*")) and manager.latest().step == 3


@pytest.mark.trains
def test_trainable_only_checkpoints_hold_just_the_trainable_weights_and_resume(run_toy):
    args = (
        "model.freeze_embeddings=true",
        "checkpoint.trainable_only=true",
        "trainer.ckpt_every_n_steps=2",
        "checkpoint.keep_last=5",
        "trainer.deterministic=true",
    )
    full = run_toy(*args, "trainer.max_steps=4", root="full")
    state = torch.load(full.run_dir / "checkpoints" / "step-0000002" / "state", weights_only=False)
    assert not any("wte" in k or "wpe" in k for k in state["model"])
    assert any("h.0.attn" in k for k in state["model"])
    resumed = run_toy(
        *args,
        "trainer.max_steps=4",
        f"trainer.resume={full.run_dir / 'checkpoints' / 'step-0000002'}",
        root="resumed",
    )
    assert max_weight_diff(final_weights(full.run_dir), final_weights(resumed.run_dir)) == 0.0
    # final/ always holds the whole model, frozen weights included.
    assert "transformer.wte.weight" in final_weights(full.run_dir)


@pytest.mark.trains
def test_debug_shapes_logs_module_shapes_once(run_toy):
    result = run_toy("trainer.max_steps=2", "debug.shapes=true", "trainer.batch_size=3")
    log = (result.run_dir / "train.log").read_text()
    lines = [line for line in log.splitlines() if "shapes | " in line]
    assert any("lm_head (Linear): in [(3, " in line and ", 50) float32" in line for line in lines)
    assert len([line for line in lines if "lm_head (Linear)" in line]) == 1


@pytest.mark.trains
def test_wandb_offline_and_tensorboard(run_toy, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = run_toy(
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
        "logger.wandb=true",
        "logger.wandb_mode=offline",
        "logger.tensorboard=true",
    )
    assert list((result.run_dir / "wandb").glob("offline-run-*")), "W&B offline run folder missing"
    assert list((result.run_dir / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.trains
@pytest.mark.parametrize("name", ["adafactor", "adamw_8bit", "paged_adamw_8bit", "sgd"])
def test_optimizers_by_name_train(run_toy, name):
    result = run_toy(
        "trainer.max_steps=3", f"optim.name={name}", "trainer.log_every_n_steps=1", "optim.lr=1e-3"
    )
    losses = train_losses(result.run_dir)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses.values())


@pytest.mark.trains
def test_warmup_ratio_and_cosine_schedule_in_logged_lr(run_toy):
    result = run_toy(
        "trainer.max_steps=10",
        "optim.warmup_ratio=0.3",
        "optim.scheduler=cosine",
        "optim.lr=1e-3",
        "trainer.log_every_n_steps=1",
    )
    lrs = {r["step"]: r["lr"] for r in read_jsonl(result.run_dir / "metrics.jsonl") if "lr" in r}
    assert lrs[1] < lrs[2] < lrs[3] < lrs[4] == pytest.approx(1e-3)
    assert lrs[10] < lrs[6] < lrs[4]


@pytest.mark.trains
def test_overfit_batches_learns_a_fixed_batch(run_toy):
    result = run_toy(
        "debug.overfit_batches=1",
        "trainer.max_steps=80",
        "optim.lr=3e-3",
        "model.dropout=0",
        "trainer.log_every_n_steps=10",
        "trainer.val_at_end=false",
    )
    losses = train_losses(result.run_dir)
    assert losses[80] < 0.5 * losses[10], losses


@pytest.mark.trains
def test_bf16_mixed_precision_runs_on_cpu(run_toy):
    result = run_toy(
        "trainer.max_steps=2", "trainer.precision=bf16-mixed", "trainer.log_every_n_steps=1"
    )
    assert (
        yaml.safe_load((result.run_dir / "config.yaml").read_text())["trainer"]["precision"]
        == "bf16-mixed"
    )
    assert all(math.isfinite(v) for v in train_losses(result.run_dir).values())


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "trainer.accelerator=cuda",
            "Config key 'trainer.accelerator' = cuda, but this machine has no CUDA GPU",
        ),
        (
            "trainer.accelerator=gpu",
            "Config key 'trainer.accelerator' = gpu, but this machine has no CUDA GPU",
        ),
        (
            "trainer.precision=16-mixed",
            "Config key 'trainer.precision' = 16-mixed needs a CUDA GPU; on the CPU use bf16-mixed",
        ),
        ("trainer.strategy=deepspeed_stage_2", "DeepSpeed runs on CUDA GPUs only"),
        (
            "fsdp.cpu_offload=true trainer.strategy=fsdp",
            "fsdp.cpu_offload=true moves shards between GPU and CPU memory",
        ),
        ("trainer.devices=0", "Config key 'trainer.devices' = 0: at least one device is needed"),
        ("trainer.devices=many", "Config key 'trainer.devices' = 'many' is not a device count"),
        ("trainer.strategy=fsdp1", "Config key 'trainer.strategy' = 'fsdp1' is unknown"),
        (
            "trainer.num_nodes=2",
            "Config key 'trainer.num_nodes' = 2, but this process was not started by a cluster "
            "launcher",
        ),
    ],
)
def test_settings_this_machine_cannot_run_fail_by_key_before_anything_is_written(
    run_toy, tmp_path, override, message
):
    from core.errors import ConfigError

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match=message):
        run_toy("trainer.max_steps=1", *override.split())
    assert not (tmp_path / "runs").exists()


@pytest.mark.trains
def test_data_loader_workers_are_seeded_and_resume_exactly(run_toy):
    args = (
        "trainer.max_steps=6",
        "trainer.log_every_n_steps=1",
        "trainer.num_workers=2",
        "trainer.deterministic=true",
        "trainer.ckpt_every_n_steps=3",
        "checkpoint.keep_last=5",
    )
    a = run_toy(*args, root="a")
    b = run_toy(*args, root="b")
    assert train_losses(a.run_dir) == train_losses(b.run_dir)
    resumed = run_toy(
        *args, f"trainer.resume={a.run_dir / 'checkpoints' / 'step-0000003'}", root="c"
    )
    assert max_weight_diff(final_weights(a.run_dir), final_weights(resumed.run_dir)) == 0.0


gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (FSDP and CUDA memory are GPU-only)"
)


@pytest.mark.gpu
@gpu
def test_fsdp_and_bf16_on_one_gpu_log_memory_and_mfu(run_toy):
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    result = run_toy(
        "trainer.accelerator=cuda",
        "trainer.devices=1",
        "trainer.strategy=fsdp",
        "trainer.precision=bf16-mixed",
        f"fsdp.auto_wrap=[{GPT2Block.__module__}.{GPT2Block.__name__}]",
        "fsdp.activation_checkpointing=true",
        "fsdp.cpu_offload=true",
        "trainer.max_steps=4",
        "trainer.log_every_n_steps=1",
        "trainer.ckpt_every_n_steps=2",
    )
    records = [r for r in read_jsonl(result.run_dir / "metrics.jsonl") if "train/loss" in r]
    assert records and all(r["memory/peak_allocated_gb"] > 0 for r in records)
    assert "throughput/mfu" in records[-1]
    resumed = run_toy(
        "trainer.accelerator=cuda",
        "trainer.devices=1",
        "trainer.strategy=fsdp",
        "trainer.precision=bf16-mixed",
        f"fsdp.auto_wrap=[{GPT2Block.__module__}.{GPT2Block.__name__}]",
        "trainer.max_steps=4",
        f"trainer.resume={result.run_dir / 'checkpoints' / 'step-0000002'}",
        root="resumed",
    )
    assert resumed.step == 4
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(result.run_dir / "final")


@pytest.mark.trains
def test_adafactor_bf16_true_resume_keeps_float32_statistics_and_is_exact(run_toy):
    args = (
        "optim.name=adafactor",
        "trainer.precision=bf16-true",
        "trainer.max_steps=4",
        "trainer.ckpt_every_n_steps=2",
        "checkpoint.keep_last=5",
        "trainer.deterministic=true",
        "optim.lr=1e-3",
    )
    full = run_toy(*args, root="full")
    state = torch.load(full.run_dir / "checkpoints" / "step-0000002" / "state", weights_only=False)
    dtypes = {
        v.dtype
        for entries in state["optimizer"]["state"].values()
        for v in entries.values()
        if torch.is_tensor(v) and v.is_floating_point()
    }
    assert torch.float32 in dtypes, "Adafactor keeps float32 statistics for bf16 parameters"
    resumed = run_toy(
        *args, f"trainer.resume={full.run_dir / 'checkpoints' / 'step-0000002'}", root="resumed"
    )
    assert max_weight_diff(final_weights(full.run_dir), final_weights(resumed.run_dir)) == 0.0


@pytest.mark.trains
def test_max_time_stops_early_and_still_finishes_and_val_at_start_logs_step_0(run_toy):
    result = run_toy(
        "trainer.max_steps=10000",
        "trainer.max_time=00:00:02",
        "trainer.val_at_start=true",
        "data.collate_delay=0.05",
    )
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert result.status == "completed" and 1 <= result.step < 10000
    assert (
        summary["status"] == "completed"
        and (result.run_dir / "final" / "model.safetensors").is_file()
    )
    val_steps = [r["step"] for r in read_jsonl(result.run_dir / "metrics.jsonl") if "val/loss" in r]
    assert val_steps[0] == 0 and val_steps[-1] == result.step
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="is not a duration"):
        run_toy("trainer.max_time=soon")


@pytest.mark.trains
@pytest.mark.parametrize("strategy", ["auto", "ddp", "fsdp"])
def test_a_run_leaves_no_launch_variables_behind(run_toy, monkeypatch, strategy):
    """A leftover MASTER_PORT would be inherited by every job this process starts (sbatch,
    subprocess ranks) and make them collide; a leftover LOCAL_RANK / WORLD_SIZE (Fabric's launcher
    sets them even for one DDP or FSDP process) makes a later 2-rank run in a child process wait
    forever for a rank it never starts."""
    import os

    from core.parallel.strategy import LAUNCH_VARIABLES

    for key in LAUNCH_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    run_toy("trainer.max_steps=1", "trainer.devices=1", f"trainer.strategy={strategy}")
    assert [key for key in LAUNCH_VARIABLES if key in os.environ] == []
