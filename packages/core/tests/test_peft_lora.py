"""core.nn.peft_lora: a task's lora group -> peft's LoraConfig."""

from __future__ import annotations

from torch import nn

from core.config.schema import LoraConfig
from core.nn.peft_lora import peft_lora_config


def test_shared_fields_and_task_arguments_reach_peft():
    """Rank, scaling, dropout, rsLoRA and DoRA come from the group; the task's own arguments
    (targets, bias) win; the config adapts exactly the named layers of a real model."""
    from peft import get_peft_model

    lora = LoraConfig(r=2, alpha=4.0, dropout=0.0, use_rslora=True)
    config = peft_lora_config(lora, target_modules=r".*\.up", bias="none")
    assert (config.r, config.lora_alpha, config.lora_dropout) == (2, 4.0, 0.0)
    assert config.use_rslora and not config.use_dora and config.bias == "none"
    model = nn.Sequential()
    model.add_module("block", nn.ModuleDict({"up": nn.Linear(3, 3), "down": nn.Linear(3, 3)}))
    adapted = get_peft_model(model, config)
    names = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert names and all(".up." in n for n in names), names
    default = peft_lora_config(LoraConfig()).target_modules
    assert set(default) == {"q_proj", "k_proj", "v_proj", "o_proj"}
