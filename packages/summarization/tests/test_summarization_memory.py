"""``train --dry-run`` of the summarization task: parameters and memory per GPU of the presets
from the shipped architectures (no weights, no network), sharded by FSDP."""

from __future__ import annotations

import json

import pytest

from summarization.cli import train


def test_dry_run_reports_the_presets_without_weights(capsys):
    assert train(["-c", "bart_large_cnn", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "406,290,432 total, 406,290,432 trainable" in text
    assert "source 512 + summary 128 tokens per sample" in text and "24 GB GPU" in text
    assert train(["-c", "t5_small", "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == 60_506_624
    sizes = {}
    for devices in (1, 4):
        argv = ["-c", "bart_large_cnn", "--dry-run", "--json", f"trainer.devices={devices}"]
        assert train([*argv, "trainer.strategy=fsdp", "trainer.precision=bf16-mixed"]) == 0
        sizes[devices] = json.loads(capsys.readouterr().out)["bytes"]
    for key in ("weights", "gradients", "optimizer"):
        assert sizes[1][key] == pytest.approx(4 * sizes[4][key])
    assert sizes[1]["activations"] == pytest.approx(sizes[4]["activations"])
    assert train(["-c", "small", "--dry-run", "model.freeze_encoder=true"]) == 0
    assert "trainable" in capsys.readouterr().out
