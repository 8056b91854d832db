"""The transformer block classes of a Hugging Face model: the units FSDP shards and checkpoints
one at a time (a task's ``fsdp_wrap_classes``).

Self-check: ``python -m core.task.blocks``.
"""

from __future__ import annotations

from torch import nn


def block_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The classes of ``model``'s modules that its ``_no_split_modules`` names (a transformers
    model's blocks); empty for a model that names none."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return {type(m) for m in model.modules() if type(m).__name__ in names}


if __name__ == "__main__":  # self-check: python -m core.task.blocks
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=2, num_attention_heads=2)
    found = block_classes(BertModel(config))
    assert {c.__name__ for c in found} >= {"BertLayer"}, found
    assert block_classes(nn.Linear(2, 2)) == set()
    print("core.task.blocks: ok")
