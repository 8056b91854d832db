"""The peft ``LoraConfig`` of a task's ``lora`` group (:class:`core.config.schema.LoraConfig`).

Every task with adapters maps the same shared fields (rank, scaling, dropout, rsLoRA, DoRA); what
differs per task (which layers, bias, ``task_type``) is passed on as it is.

Self-check: ``python -m core.nn.peft_lora``.
"""

from __future__ import annotations

from typing import Any

from core.config.schema import LoraConfig


def peft_lora_config(lora: LoraConfig, **task: Any) -> Any:
    """The ``peft.LoraConfig`` of ``lora``'s shared fields, with ``task``'s keyword arguments
    (``target_modules`` defaults to ``lora.target_modules``; ``bias``, ``task_type``, ...)."""
    from peft import LoraConfig as PeftLoraConfig

    task.setdefault("target_modules", list(lora.target_modules))
    shared = {"r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout}
    return PeftLoraConfig(**shared, use_rslora=lora.use_rslora, use_dora=lora.use_dora, **task)


if __name__ == "__main__":  # self-check: python -m core.nn.peft_lora
    config = peft_lora_config(LoraConfig(r=4, alpha=8.0, use_dora=True), bias="none")
    assert (config.r, config.lora_alpha, config.use_dora, config.bias) == (4, 8.0, True, "none")
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    print(config.target_modules, "->", type(config).__name__)
    print("core.nn.peft_lora: ok")
