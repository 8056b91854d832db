"""Run by ``test_loss.py`` in 2 CPU processes: the chunked cross-entropy (``core.nn.loss``) under
FSDP2 takes the same optimizer steps as the plain loss on one unsharded model with the whole
batch, with tied and untied heads, with activation checkpointing (also with ``trainer.compile``'s
compiled units), and with a head that is not a plain ``nn.Linear`` (peft LoRA on ``lm_head``).
Rank 0 prints one ``RESULT {json}`` line.

    python fsdp_loss_check.py     # Fabric starts the second process itself
"""

from __future__ import annotations

import json

import torch
from lightning.fabric import Fabric
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from core.config.schema import FSDPConfig
from core.parallel.fsdp import FSDP2Strategy, full_state_dict, parallelize
from core.parallel.strategy import destroy_process_group_at_exit
from core.task.base import IGNORE_INDEX, chunked_token_loss_sum, token_loss_sum

VOCAB = 200
CASES = {  # name: (tied head, fsdp settings, LoRA on lm_head)
    "tied": (True, {}, False),
    "untied": (False, {}, False),
    "tied_activation_checkpointing": (True, {"activation_checkpointing": True}, False),
    "lora_on_head": (False, {}, True),
    # trainer.compile under FSDP2 with activation checkpointing (the units' forward compiled).
    "compiled_activation_checkpointing": (True, {"activation_checkpointing": True}, False),
}


def tiny_llama(tied: bool, lora_head: bool) -> torch.nn.Module:
    """A 2-layer Llama with a 200-token vocabulary (seeded), optionally with LoRA on its head."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config)
    if lora_head:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"]))
        with torch.no_grad():  # B starts at zero: make the adapter change the logits
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return model


def two_steps(model, ids, labels, tokens, scale, chunked) -> list[float]:
    """Two AdamW steps on the token-normalised loss; returns the two loss sums."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(2):
        if chunked:
            out = chunked_token_loss_sum(model, lambda: model(input_ids=ids), labels, True, 5)
        else:
            out = token_loss_sum(model(input_ids=ids).logits, labels, shift=True)
        (out.loss_sum * scale / tokens).backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out.loss_sum.detach()))
    return losses


def main() -> None:
    fabric = Fabric(
        accelerator="cpu", devices=2, strategy=FSDP2Strategy(parallelize_fn=lambda m, mesh: m)
    )
    destroy_process_group_at_exit()
    fabric.launch()
    rank, world = fabric.global_rank, fabric.world_size
    ids = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, -3:] = IGNORE_INDEX
    labels[1, :4] = IGNORE_INDEX
    tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
    result: dict[str, float] = {}
    for name, (tied, settings, lora_head) in CASES.items():
        reference = tiny_llama(tied, lora_head)
        expected_losses = two_steps(reference, ids, labels, tokens, 1.0, chunked=False)
        expected = {k: v.detach() for k, v in reference.state_dict().items()}
        model = tiny_llama(tied, lora_head)
        parallelize(
            model,
            fabric.strategy.device_mesh,
            cfg=FSDPConfig(**settings),
            wrap_classes={LlamaDecoderLayer},
            precision="32-true",
            devices_per_node=2,
            compile_blocks=name.startswith("compiled"),
        )
        mine = slice(2 * rank, 2 * rank + 2)
        # FSDP2 averages gradients over ranks: the world size turns that back into a sum.
        losses = two_steps(model, ids[mine], labels[mine], tokens, float(world), chunked=True)
        summed = fabric.all_reduce(torch.tensor(losses), reduce_op="sum").tolist()
        state = full_state_dict(model)
        if rank == 0:
            state = {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in state.items()}
            result[name] = max(
                float((state[k] - v).abs().max()) for k, v in expected.items() if k in state
            )
            result[f"{name}:keys"] = len(set(expected) & set(state))
            result[f"{name}:compiled"] = sum("forward" in vars(m) for m in model.modules())
            result[f"{name}:loss"] = max(abs(a - b) for a, b in zip(summed, expected_losses))
    if rank == 0:
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
