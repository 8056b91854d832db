"""core.commands.estimate for decoder-only models: the activation and logits terms of a
transformers config, and where a model's architecture is read from."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from core.commands.estimate import (
    architecture_config,
    decoder_activation_bytes,
    layer_activation_bytes,
)
from core.errors import UserError


def gpt2(**sizes: int) -> object:
    """A small GPT-2 config (``n_inner`` unset: 4 x hidden)."""
    return AutoConfig.for_model("gpt2", **{"n_embd": 64, "n_layer": 3, "n_head": 4, **sizes})


def test_decoder_terms_follow_the_layer_formula() -> None:
    config = gpt2(vocab_size=100)
    plain = decoder_activation_bytes(config, 2, 16, 2, False, 4, eager=False)
    assert plain["activations"] == 3 * 2 * 16 * layer_activation_bytes(64, 256, 2, 4)
    assert plain["logits"] == 2 * 16 * 100 * (2 + 12)
    eager = decoder_activation_bytes(config, 2, 16, 2, False, 4, eager=True)
    assert eager["activations"] - plain["activations"] == 3 * 2 * 16 * 4 * 16 * 5
    kept = decoder_activation_bytes(config, 2, 16, 2, True, 4, eager=False)["activations"]
    assert kept == 3 * 2 * 16 * 64 * 2 + 2 * 16 * layer_activation_bytes(64, 256, 2, 4)
    offloaded = decoder_activation_bytes(config, 2, 16, 2, True, 4, False, offload=True)
    assert offloaded["activations"] < kept


def test_architecture_from_shipped_values_or_a_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    shipped = {"example-org/shipped": {"model_type": "gpt2", "n_layer": 5}}
    config, source = architecture_config("example-org/shipped", shipped)
    assert (config.n_layer, source) == (5, "shipped copy of config.json")
    gpt2(n_layer=7).save_pretrained(tmp_path)
    config, source = architecture_config(str(tmp_path), shipped)
    assert (config.n_layer, source) == (7, "config.json")
    with pytest.raises(UserError, match="Cannot read the architecture of 'example-org/other'"):
        architecture_config("example-org/other", shipped)
