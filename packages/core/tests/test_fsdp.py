"""FSDP2 (``trainer.strategy=fsdp``) on 2 CPU processes over gloo: every setting of the ``fsdp``
group gives the step of one unsharded model, retired FSDP1 keys say what replaced them, and the
settings a CPU cannot run are refused by name. Training, resume and evaluation under FSDP2 are
in ``test_processes.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config.loader import load_config
from core.config.schema import TrainConfig
from core.errors import ConfigError
from core.testing.toy import script_result


@pytest.mark.slow
def test_every_fsdp2_setting_gives_the_unsharded_step_and_rank0_weights_reach_every_rank():
    result = script_result(Path(__file__).with_name("fsdp_settings_check.py"))
    # float32: sharded, replicated (2-D meshes), checkpointed and prefetching runs all take the
    # step of one model on the whole batch; AdamW's step of ~lr would show any gradient error.
    for name in (
        "full_shard",
        "shard_grad_op",
        "no_shard_2d_mesh",
        "hybrid_shard_2d_mesh",
        "activation_checkpointing",
        "prefetch",
        "adafactor",
        "adafactor_hybrid_shard",
    ):
        assert result[name] < 1e-5, (name, result[name])
    # bfloat16 compute (SGD step proportional to the gradient): close, and really not float32;
    # the master weights stay float32.
    for name in ("bf16_mixed", "bf16_mixed_reduce_in_bf16"):
        assert 1e-6 < result[name] < 5e-4, (name, result[name])
        assert result[f"{name}:dtypes"] == ["torch.float32"]
    assert result["sync_module_states=True"] == 0.0
    assert result["sync_module_states=False"] > 1e-3, (
        "without the broadcast rank 1 keeps its own init"
    )


@pytest.mark.parametrize(
    "key, replacement",
    [
        ("use_orig_params", "always keeps the original parameters"),
        ("limit_all_gathers", "without the CPU rate limiter"),
        ("backward_prefetch", "fsdp.prefetch_backward=N"),
        ("state_dict_type", "always sharded"),
    ],
)
def test_fsdp1_keys_are_retired_with_what_replaced_them(key, replacement):
    with pytest.raises(ConfigError, match=rf"Config key 'fsdp.{key}' is gone: .*{replacement}"):
        load_config(TrainConfig, overrides=[f"fsdp.{key}=true"])


def test_fsdp_settings_are_checked():
    with pytest.raises(
        ConfigError, match="fsdp.shard_size' only applies to fsdp.sharding_strategy=HYBRID_SHARD"
    ):
        load_config(TrainConfig, overrides=["fsdp.shard_size=2"])
    with pytest.raises(ConfigError, match="fsdp.prefetch_forward' must be 0 or more"):
        load_config(TrainConfig, overrides=["fsdp.prefetch_forward=-1"])


def test_mixed_precision_follows_trainer_precision():
    import torch

    from core.config.schema import FSDPConfig
    from core.parallel.fsdp import mixed_precision_dtypes

    assert mixed_precision_dtypes(FSDPConfig(), "bf16-mixed") == (torch.bfloat16, torch.float32)
    assert mixed_precision_dtypes(FSDPConfig(), "bf16-true") == (None, torch.float32)
    assert mixed_precision_dtypes(FSDPConfig(), "32-true") == (None, None)
    assert mixed_precision_dtypes(FSDPConfig(reduce_dtype="bfloat16"), "bf16-mixed") == (
        torch.bfloat16,
        torch.bfloat16,
    )
