"""Run by ``test_fsdp.py`` in 2 CPU processes: each FSDP2 setting (and Adafactor on sharded
parameters) gives the same optimizer steps as one unsharded model on the whole batch, and
``fsdp.sync_module_states`` makes every rank
start from rank 0's weights. Rank 0 prints one ``RESULT {json}`` line.

    python fsdp_settings_check.py     # Fabric starts the second process itself
"""

from __future__ import annotations

import copy
import json
import sys

import torch
from lightning.fabric import Fabric
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from core.config.schema import FSDPConfig
from core.nn.optim import Adafactor
from core.parallel.fsdp import FSDP2Strategy, full_state_dict, parallelize
from core.parallel.strategy import destroy_process_group_at_exit
from core.task.base import IGNORE_INDEX

SETTINGS = {  # name: (fsdp settings, precision, optimizer)
    "full_shard": ({}, "32-true", "adamw"),
    "shard_grad_op": ({"sharding_strategy": "SHARD_GRAD_OP"}, "32-true", "adamw"),
    "no_shard_2d_mesh": ({"sharding_strategy": "NO_SHARD"}, "32-true", "adamw"),
    "hybrid_shard_2d_mesh": (
        {"sharding_strategy": "HYBRID_SHARD", "shard_size": 2},
        "32-true",
        "adamw",
    ),
    "activation_checkpointing": ({"activation_checkpointing": True}, "32-true", "adamw"),
    "prefetch": ({"prefetch_forward": 1, "prefetch_backward": 2}, "32-true", "adamw"),
    "adafactor": ({}, "32-true", "adafactor"),
    "adafactor_hybrid_shard": (
        {"sharding_strategy": "HYBRID_SHARD", "shard_size": 2},
        "32-true",
        "adafactor",
    ),
    "bf16_mixed": ({}, "bf16-mixed", "sgd"),
    "bf16_mixed_reduce_in_bf16": ({"reduce_dtype": "bfloat16"}, "bf16-mixed", "sgd"),
}


def tiny_llama(seed: int) -> LlamaForCausalLM:
    """A 2-layer Llama (no biases: a key bias gets an exactly-zero gradient in theory and rounding
    noise in practice, which Adafactor's normalised step turns into +-lr either way), from
    ``seed``."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def loss_sum(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of ``ids`` ``(batch, seq)`` against ``labels``."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def make_optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW turns any gradient difference into a step of about ``lr``: the strict check for
    float32. SGD's step is proportional to the gradient: the check for 16-bit compute. Adafactor's
    factored statistics reduce over the rows that FSDP2 shards."""
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1)
    if name == "adafactor":
        return Adafactor(model.parameters(), lr=1e-2)
    return torch.optim.AdamW(model.parameters(), lr=1e-2)


def one_step(
    model: torch.nn.Module,
    ids: torch.Tensor,
    labels: torch.Tensor,
    tokens: int,
    scale: float,
    optimizer: str,
) -> None:
    """Backward of the token-normalised loss, gradient clipping, two optimizer steps (the second
    one uses the statistics of the first)."""
    opt = make_optimizer(optimizer, model)
    for _ in range(2):
        (loss_sum(model, ids, labels) * scale / tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad()


def main() -> None:
    fabric = Fabric(
        accelerator="cpu", devices=2, strategy=FSDP2Strategy(parallelize_fn=lambda m, mesh: m)
    )
    destroy_process_group_at_exit()
    fabric.launch()
    rank, world = fabric.global_rank, fabric.world_size
    mesh = fabric.strategy.device_mesh
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, -3:] = IGNORE_INDEX  # rows with different loss-token counts
    tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
    expected = {}
    for optimizer in ("adamw", "sgd", "adafactor"):
        reference = tiny_llama(0)
        one_step(reference, ids, labels, tokens, 1.0, optimizer)
        expected[optimizer] = {
            k: v.detach() for k, v in reference.state_dict().items() if k != "lm_head.weight"
        }  # tied
    result: dict[str, float] = {}
    for name, (settings, precision, optimizer) in SETTINGS.items():
        model = tiny_llama(0)
        parallelize(
            model,
            mesh,
            cfg=FSDPConfig(**settings),
            wrap_classes={LlamaDecoderLayer},
            precision=precision,
            devices_per_node=2,
        )
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            # FSDP2 averages gradients over ranks: the world size turns that back into a sum.
            mine = slice(2 * rank, 2 * rank + 2)
            one_step(model, ids[mine], labels[mine], tokens, float(world), optimizer)
        state = full_state_dict(model)
        if rank == 0:
            result[name] = max(
                float((state[k] - v).abs().max()) for k, v in expected[optimizer].items()
            )
            result[f"{name}:dtypes"] = sorted({str(v.dtype) for v in state.values()})
    # Ranks that build different models: rank 0's weights reach every shard only with
    # sync_module_states.
    for sync in (True, False):
        model = tiny_llama(rank)
        original0 = copy.deepcopy(model.state_dict())
        parallelize(
            model,
            mesh,
            cfg=FSDPConfig(sync_module_states=sync),
            wrap_classes={LlamaDecoderLayer},
            precision="32-true",
            devices_per_node=2,
        )
        state = full_state_dict(model)
        if rank == 0:
            result[f"sync_module_states={sync}"] = max(
                float((state[k] - original0[k]).abs().max()) for k in state
            )
    if rank == 0:
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
    sys.exit(0)
