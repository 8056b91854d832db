"""core.task.adapters: a saved LoRA adapter read, its base found, put on a base checked to fit
(tiny random Llamas, real peft save and load)."""

from __future__ import annotations

from pathlib import Path

import pytest
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from core.errors import UserError
from core.task.adapters import (
    attach_adapter,
    linear_module_names,
    read_adapter_config,
    resolve_base,
)


def llama(layers: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A moved run: ``base/`` (two layers) and ``final/`` (its adapter, naming a gone base)."""
    root = tmp_path_factory.mktemp("run")
    llama(2).save_pretrained(root / "base")
    model = llama(2)
    model.name_or_path = "/gone/base"  # what peft writes as the adapter's base
    lora = LoraConfig(r=2, target_modules=["q_proj"])
    get_peft_model(model, lora).save_pretrained(root / "final")
    return root


def test_an_adapter_finds_its_base_and_loads_onto_it(run):
    config = read_adapter_config(run / "final")
    assert config["base_model_name_or_path"] == "/gone/base"
    assert resolve_base(run / "final", config, "given/base") == "given/base"
    base = resolve_base(run / "final", config, None)
    assert base == str((run / "base").resolve())
    model = attach_adapter(LlamaForCausalLM.from_pretrained(base), run / "final", base)
    assert not model.training
    assert sum("lora_" in n for n, _ in model.named_parameters()) == 2 * 2  # A and B per layer
    assert {"q_proj", "v_proj", "lm_head"} <= set(linear_module_names(llama(1)))


def test_what_is_not_an_adapter_or_does_not_fit_is_named(run, tmp_path):
    with pytest.raises(UserError, match="does not exist; give a run's final/ folder"):
        read_adapter_config(tmp_path / "nowhere")
    with pytest.raises(UserError, match="is not a LoRA adapter folder"):
        read_adapter_config(run / "base")
    alone = tmp_path / "alone"
    get_peft_model(llama(1), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(alone)
    config = {"base_model_name_or_path": "/gone/base"}
    with pytest.raises(UserError, match="names base model '/gone/base', which is not here"):
        resolve_base(alone, config, None)
    with pytest.raises(UserError, match="it holds 4 LoRA tensors, the base has places for 2"):
        attach_adapter(llama(1), run / "final", "one layer")
