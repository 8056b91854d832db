"""core.nn.models: the dtype choice, the parameter-dtype check, counting, and the dry-run report
of a model trained in full or in parts (core.commands.estimate.trained_report)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core.commands.estimate import memory_report, trained_report, trained_state
from core.config.loader import load_config
from core.config.schema import TrainConfig
from core.nn.models import (
    DTYPES,
    auto_dtype,
    check_dtypes,
    default_dtype,
    parameter_counts,
    precision_dtype,
)


def test_dtype_choice() -> None:
    assert auto_dtype("auto", "cpu") == torch.float32
    assert all(auto_dtype(name, "cuda") == dtype for name, dtype in DTYPES.items())
    assert precision_dtype("16-true") == torch.float16 and precision_dtype("32-true") == (
        torch.float32
    )
    with default_dtype(torch.float64):
        assert nn.Linear(2, 2).weight.dtype == torch.float64
    assert torch.get_default_dtype() == torch.float32


def test_check_dtypes_and_counts() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model[0].requires_grad_(False)
    assert parameter_counts(model) == (8, 23)
    check_dtypes(model, torch.float32)
    model[1].bias.data = model[1].bias.data.double()
    with pytest.raises(RuntimeError, match=r"1 parameters are not torch.float32: \['1.bias"):
        check_dtypes(model, torch.float32)


class Block(nn.Linear):
    """Stands for a transformer layer FSDP wraps."""


def test_trained_report_is_memory_report_of_trained_state() -> None:
    cfg = load_config(TrainConfig, overrides=["trainer.strategy=fsdp", "trainer.devices=2"])
    model = nn.Sequential(Block(8, 8), Block(8, 4))
    model[1].requires_grad_(False)
    config = type("Config", (), {"model_type": "toy"})()
    report = trained_report(
        cfg,
        model,
        name="toy",
        config=config,
        source="here",
        facts={"layers": 2},
        setup={"batch": "1"},
        units=("blocks", ("Block",)),
        parts={"activations": (100.0, "kept"), "logits": (50.0, "head")},
        notes={"gradients": "first block"},
    )
    total, trainable, state, notes = trained_state(cfg, model)
    gathered = 2.0 * 72 * 4  # two units of the largest block in float32
    expected = memory_report(
        model="toy",
        architecture={"type": "toy", "layers": 2},
        config_source="here",
        parameters=total,
        trainable=trainable,
        setup={"batch": "1"},
        components={**state, "activations": 100.0, "logits": 50.0, "gathered": gathered},
        notes={**notes, "gradients": "first block", "activations": "kept", "logits": "head"}
        | {"gathered": "two blocks unsharded at a time"},
    )
    assert report == expected and list(report["notes"]) == list(expected["notes"])


def test_liger_kernel_refusal_is_a_user_error() -> None:
    from core.errors import UserError
    from core.nn.models import liger_kernel

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match="model.liger_kernel"):
        liger_kernel(nn.Linear(2, 2))
