"""Forward passes of decoder-only models on padded, packed or padding-free rows.

:func:`call_model` runs one batch the way :mod:`core.task.batching` built it: packed and
padding-free rows carry ``position_ids`` and get neither an attention mask nor a KV cache, so
transformers keeps their samples apart by the restarting positions. :func:`check_packing` proves
that a model's attention does so before a run trains on packed rows.

Self-check: ``python -m core.task.packed_forward``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from core.errors import ConfigError


def call_model(model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
    """One forward of the model on a batch; returns the model's output object.

    Packed and padding-free rows carry ``position_ids`` and get no attention mask and no KV
    cache: transformers then keeps the samples apart by the restarting position ids (a
    block-diagonal mask, or flash-attention's variable-length kernel); a cache would treat the
    row as one sequence.
    """
    key = "position_ids" if "position_ids" in batch else "attention_mask"
    return model(input_ids=batch["input_ids"], **{key: batch[key]}, use_cache=False)


def check_packing(model: nn.Module, pad_id: int) -> float:
    """The largest relative logit difference between two random sequences packed into one row
    and each on its own, run on the base ``model``; ``ConfigError`` when packed samples see each
    other."""
    vocab = model.get_input_embeddings().weight.shape[0]
    device = model.get_input_embeddings().weight.device
    gen = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, vocab, (1, n), generator=gen).to(device) for n in (7, 5))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        alone = [model(input_ids=x, use_cache=False).logits.float() for x in (first, second)]
        positions = torch.cat([torch.arange(7), torch.arange(5)]).unsqueeze(0).to(device)
        packed = model(
            input_ids=torch.cat([first, second], dim=1), position_ids=positions, use_cache=False
        ).logits.float()
    model.train(was_training)
    reference = torch.cat(alone, dim=1)
    diff = float((packed - reference).abs().max() / (reference.abs().max() + 1e-6))
    if diff > (1e-4 if next(model.parameters()).dtype == torch.float32 else 2e-2):
        raise ConfigError(
            "data.packing=true is not safe for this model: packed samples change each other's "
            f"logits (relative difference {diff:.2e}). "
            "Its attention does not follow restarting position ids; set data.packing=false."
        )
    return diff


if __name__ == "__main__":  # self-check: python -m core.task.packed_forward
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config)
    diff = check_packing(model, pad_id=0)
    print(f"packed vs separate logits: {diff:.1e}")
    assert diff < 1e-4 and model.training
    batch = {"input_ids": torch.tensor([[1, 2, 3, 4]]), "attention_mask": torch.ones(1, 4)}
    assert call_model(model, batch).logits.shape == (1, 4, 64)
    print("core.task.packed_forward: ok")
