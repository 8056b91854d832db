"""Packed rows (core.task.packed_forward): a model whose attention follows restarting position ids
passes the packing check; one whose samples see each other is refused."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from core.errors import ConfigError
from core.task.packed_forward import call_model, check_packing


class RunningSum(nn.Module):
    """A "model" whose logit at each position sums the embeddings of every token so far, ignoring
    the position ids: packed samples see each other."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 4)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, input_ids: torch.Tensor, **_: object) -> SimpleNamespace:
        return SimpleNamespace(logits=self.embed(input_ids).cumsum(dim=1))


def test_llama_passes_the_packing_check_and_a_leaking_model_is_refused():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    llama = LlamaForCausalLM(config).eval()
    assert check_packing(llama, pad_id=0) < 1e-4 and not llama.training
    with pytest.raises(ConfigError, match="data.packing=true is not safe for this model"):
        check_packing(RunningSum(), pad_id=0)
    # call_model: packed rows go by position ids, padded rows by their attention mask
    ids = torch.tensor([[1, 2, 3, 1, 2]])
    packed = call_model(llama, {"input_ids": ids, "position_ids": torch.tensor([[0, 1, 2, 0, 1]])})
    alone = call_model(llama, {"input_ids": ids[:, 3:], "attention_mask": torch.ones(1, 2)})
    assert torch.allclose(packed.logits[:, 3:], alone.logits, atol=1e-5)
