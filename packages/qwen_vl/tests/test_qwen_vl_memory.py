"""qwen_vl's memory switches: DoRA / rsLoRA reach peft, and ``train --dry-run`` estimates the
3B and 7B presets on 4 GPUs from the shipped architectures, without weights or network."""

from __future__ import annotations

import json

import pytest

from qwen_vl.config import LoraConfig as LoraSettings
from qwen_vl.config import ModelConfig


def test_dora_and_rslora_reach_the_adapter(processor, tmp_path):
    from qwen_vl.model import build_model

    lora = LoraSettings(enabled=True, use_dora=True, use_rslora=True, r=4)
    cfg = ModelConfig(lora=lora)
    model = build_model(cfg, processor, gradient_checkpointing=False)
    peft_config = model.peft_config["default"]
    assert peft_config.use_dora and peft_config.use_rslora
    assert any(
        "lora_magnitude_vector" in n and p.requires_grad for n, p in model.named_parameters()
    )


def test_dry_run_estimates_the_3b_and_7b_presets_on_4_gpus(capsys):
    from qwen_vl.cli import train

    numbers = {}
    for preset, params in (("qwen2_5_vl_3b", 3_754_622_976), ("qwen2_5_vl_7b", 8_292_166_656)):
        for chunked in ("true", "false"):
            argv = ["-c", preset, "--dry-run", "trainer.devices=4", f"loss.chunked={chunked}"]
            assert train([*argv, "--json"]) == 0
            report = json.loads(capsys.readouterr().out)
            assert report["parameters"] == params
            assert "over 4 ranks" in report["setup"]["strategy"]
            assert "max_pixels=401,408" in report["setup"]["batch"]
            numbers[(preset, chunked)] = report["bytes"]
        assert train(["-c", preset, "--dry-run", "trainer.devices=4"]) == 0
        text = capsys.readouterr().out
        assert f"{params:,} total" in text and "80 GB GPU            fits" in text
        assert "loss.chunked=true" in text and "activation checkpointing=true" in text
    for preset in ("qwen2_5_vl_3b", "qwen2_5_vl_7b"):
        chunked, plain = numbers[(preset, "true")], numbers[(preset, "false")]
        assert chunked["logits"] < 0.1 * plain["logits"]
    # FSDP divides weights, gradients and optimizer state by the ranks.
    assert train(["-c", "qwen2_5_vl_7b", "--dry-run", "trainer.devices=1", "--json"]) == 0
    one = json.loads(capsys.readouterr().out)["bytes"]
    four = numbers[("qwen2_5_vl_7b", "true")]
    assert one["weights"] == pytest.approx(4 * four["weights"])
    assert one["gradients"] == pytest.approx(4 * four["gradients"])
    assert one["activations"] == pytest.approx(four["activations"])
    # The image budget is part of the estimate.
    assert train(["-c", "qwen2_5_vl_7b", "--dry-run", "data.max_pixels=12845056", "--json"]) == 0
    assert "16,384 vision tokens" in json.loads(capsys.readouterr().out)["setup"]["batch"]
