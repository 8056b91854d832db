"""Parameters, trainable parameters and GPU memory of a training config, without loading weights.

``train -c phi2 --dry-run`` (or ``estimate -c phi2``) builds the model on PyTorch's ``meta``
device (shapes only, no memory, no download beyond ``config.json``), adds the LoRA adapter with
peft, counts parameters exactly, and estimates the peak training memory of one GPU:

- **base weights**: quantized linear layers at 4.13 bits (NF4 + double-quantised constants:
  0.5 B + 1 B per 64-block + 4 B per 256 blocks) or 4.5 bits without double quantisation, 1 B in
  8 bits; everything bitsandbytes leaves alone (embeddings, output head, norms, biases) in float32,
  which ``prepare_model_for_kbit_training`` upcasts it to; without quantization all in ``model.dtype``.
- **adapters**: float32 weights + float32 gradients + optimizer state (AdamW 8 B, 8-bit AdamW 2 B,
  SGD 0-4 B per parameter).
- **activations** of a micro-batch ``b x s``: per layer and token about
  ``e*((10 + t)h + 4i) + 28h`` bytes (``e`` = 2 under bf16/fp16 autocast, 4 in float32; ``t``
  adapted projections per layer, each keeping a dropout copy of its input; the ``28h`` are the
  float32 copies the RMSNorm / LayerNorm upcasts keep). The coefficients were fitted to the
  tensors autograd saves for Llama layers (float32 and bfloat16 autocast). With gradient
  checkpointing only each layer's input (``e*h``) is kept, plus one layer being recomputed.
  Eager attention adds ``heads*s*s*(2e+1)`` per layer.
- **logits and loss**: ``b*s*vocab*(e + 12)`` (the logits, their float32 copy, log-softmax and its
  gradient), plus autocast's 16-bit copy of a float32 output head.

It is an estimate (the tests check the activation and logit terms against the tensors autograd
really saves for a small Llama); the CUDA context and allocator slack (0.5-1 GiB) come on top.
Real numbers appear in ``metrics.jsonl`` as ``memory/peak_allocated_gb`` during training.

Self-check: ``python -m lora_llm.memory``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.errors import UserError
from core.hub import hub_reachable, is_cached, looks_like_path
from lora_llm.config import LoraLLMConfig
from lora_llm.model import (
    TINY_TOKENIZER,
    add_adapter,
    is_tiny,
    load_tokenizer,
    parameter_counts,
    tiny_config,
)

GIB = 2**30

KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2": {
        "model_type": "gpt2",
        "n_embd": 768,
        "n_layer": 12,
        "n_head": 12,
        "n_positions": 1024,
        "vocab_size": 50257,
    },
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": {
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "max_position_embeddings": 2048,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
    "microsoft/phi-2": {
        "model_type": "phi",
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 2048,
        "vocab_size": 51200,
        "partial_rotary_factor": 0.4,
        "tie_word_embeddings": False,
    },
}
"""Architectures of the Hub presets (from their ``config.json``), so ``--dry-run`` works offline."""
KNOWN_CONFIGS["TinyLlama/TinyLlama_v1.1"] = KNOWN_CONFIGS["TinyLlama/TinyLlama-1.1B-Chat-v1.0"]

OPTIMIZER_BYTES = {
    "adamw": 8,
    "adamw_fused": 8,
    "paged_adamw_32bit": 8,
    "adamw_8bit": 2,
    "paged_adamw_8bit": 2,
    "adafactor": 0.1,
    "sgd": 0,
}
"""Optimizer state bytes per trainable parameter (SGD with momentum: 4)."""


def model_config(cfg: LoraLLMConfig) -> tuple[Any, str]:
    """The transformers config of ``model.name`` and where it came from.

    Returns:
        ``(config, source)``; source is ``built-in tiny``, ``config.json`` or ``shipped copy``.

    Raises:
        UserError: a model whose config is neither local, cached, downloadable nor shipped.
    """
    from transformers import AutoConfig

    name = cfg.model.name
    if is_tiny(name):
        return tiny_config(
            cfg.model.tiny, load_tokenizer(cfg.model, TINY_TOKENIZER)
        ), "built-in tiny"
    if looks_like_path(name) or is_cached(name) or (name not in KNOWN_CONFIGS and hub_reachable()):
        from core.hub import ensure_available

        ensure_available(name, what="model", key="model.name")
        return AutoConfig.from_pretrained(
            name, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        ), "config.json"
    if name in KNOWN_CONFIGS:
        known = dict(KNOWN_CONFIGS[name])
        return AutoConfig.for_model(known.pop("model_type"), **known), "shipped copy of config.json"
    raise UserError(
        f"Cannot read the architecture of '{name}' (model.name): not a local folder, not in the Hugging Face cache, the Hub "
        f"is not reachable, and it is not one of the shipped architectures ({', '.join(KNOWN_CONFIGS)})."
    )


def meta_model(config: Any, cfg: LoraLLMConfig) -> nn.Module:
    """The model with its LoRA adapter on the ``meta`` device (shapes only, no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, trust_remote_code=cfg.model.trust_remote_code
        )
        return add_adapter(model, cfg.lora, gradient_checkpointing=False)


def quantizable_weights(model: nn.Module, skip: list[str]) -> int:
    """Weights of the linear layers bitsandbytes would quantize (all but the output head and ``skip``)."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Conv1D)) or module is head or ".lora_" in name:
            continue
        if name.removesuffix(".base_layer").rsplit(".", 1)[-1] in skip:
            continue
        count += module.weight.numel()
    return count


def activation_bytes(
    config: Any,
    batch: int,
    seq: int,
    act_bytes: int,
    checkpointing: bool,
    lora_targets: int,
    eager: bool,
) -> dict[str, float]:
    """Activation and logit memory of one micro-batch (see the module docstring).

    Args:
        config: the transformers config (hidden size, layers, heads, vocab).
        batch: micro-batch size ``b``.
        seq: tokens per sample ``s``.
        act_bytes: bytes per activation value ``e`` (2 under 16-bit autocast, 4 in float32).
        checkpointing: gradient checkpointing.
        lora_targets: adapted projections per layer (each keeps a dropout copy of its input).
        eager: eager attention (materialises the ``s x s`` attention matrix).

    Returns:
        ``{"activations", "logits"}`` in bytes.
    """
    h = config.hidden_size
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * h
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    tokens = batch * seq
    per_layer = tokens * (act_bytes * ((10 + lora_targets) * h + 4 * inner) + 28 * h)
    if eager:
        per_layer += batch * heads * seq * seq * (2 * act_bytes + 1)
    activations = (
        layers * tokens * h * act_bytes + per_layer if checkpointing else layers * per_layer
    )
    return {
        "activations": float(activations),
        "logits": float(tokens * config.vocab_size * (act_bytes + 12)),
    }


def estimate(cfg: LoraLLMConfig) -> dict[str, Any]:
    """Parameters and training memory of ``cfg`` on one GPU, without loading weights.

    Returns:
        A report: model facts, parameter counts and bytes per component (weights, adapters,
        activations, logits, total).
    """
    config, source = model_config(cfg)
    model = meta_model(config, cfg)
    trainable, total = parameter_counts(model)
    quant = cfg.quant
    base_bytes = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}[cfg.model.dtype]
    frozen = total - trainable
    if quant.bits is not None:
        quantized = quantizable_weights(model, list(quant.skip_modules))
        per_weight = (
            (0.5 + 1 / 64 + 4 / (64 * 256))
            if (quant.bits == 4 and quant.double_quant)
            else (0.5 + 4 / 64 if quant.bits == 4 else 1.0)
        )
        weights = quantized * per_weight + (frozen - quantized) * 4
        weights_note = f"{quantized:,} weights in {quant.bits}-bit{' ' + quant.quant_type.upper() if quant.bits == 4 else ''}, {frozen - quantized:,} in float32"
    else:
        quantized = 0
        weights = frozen * base_bytes
        weights_note = f"{frozen:,} weights in {'16' if base_bytes == 2 else '32'}-bit"
    optim_bytes = (
        OPTIMIZER_BYTES[cfg.optim.name]
        if cfg.optim.name != "sgd"
        else (4 if cfg.optim.momentum else 0)
    )
    adapters = trainable * (4 + 4 + optim_bytes)
    act_bytes = 4 if cfg.trainer.precision in ("32-true", "32", "64-true") else 2
    targets = sum(1 for n, m in model.named_modules() if n.endswith("lora_A")) / max(
        config.num_hidden_layers, 1
    )
    acts = activation_bytes(
        config,
        cfg.trainer.batch_size,
        cfg.data.max_length,
        act_bytes,
        cfg.model.gradient_checkpointing,
        round(targets),
        cfg.model.attn_implementation == "eager",
    )
    if quant.bits is not None and act_bytes == 2:
        # Autocast keeps a 16-bit copy of the float32 output head for the matmul and its backward.
        acts["logits"] += model.get_output_embeddings().weight.numel() * act_bytes
    total_bytes = weights + adapters + acts["activations"] + acts["logits"]
    return {
        "model": cfg.model.name,
        "architecture": {
            "type": config.model_type,
            "layers": config.num_hidden_layers,
            "hidden": config.hidden_size,
            "vocab": config.vocab_size,
        },
        "config_source": source,
        "parameters": total,
        "trainable_parameters": trainable,
        "trainable_share": trainable / total,
        "quantized_weights": quantized,
        "bytes": {
            "base_weights": weights,
            "adapters_and_optimizer": adapters,
            **acts,
            "total": total_bytes,
        },
        "notes": {
            "base_weights": weights_note,
            "activations": f"micro-batch {cfg.trainer.batch_size} x {cfg.data.max_length} tokens, "
            f"{'with' if cfg.model.gradient_checkpointing else 'without'} gradient checkpointing, {8 * act_bytes}-bit activations",
            "adapters": f"float32 weights + gradients + {cfg.optim.name} state",
        },
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as an aligned text table."""
    b = report["bytes"]
    arch = report["architecture"]
    lines = [
        f"model                {report['model']} ({arch['type']}, {arch['layers']} layers, hidden {arch['hidden']}, vocab {arch['vocab']}; architecture from {report['config_source']})",
        f"parameters           {report['parameters']:,} total, {report['trainable_parameters']:,} trainable ({100 * report['trainable_share']:.3f}%)",
        f"base weights         {b['base_weights'] / GIB:6.2f} GiB  ({report['notes']['base_weights']})",
        f"adapters + optimizer {b['adapters_and_optimizer'] / GIB:6.2f} GiB  ({report['notes']['adapters']})",
        f"activations          {b['activations'] / GIB:6.2f} GiB  ({report['notes']['activations']})",
        f"logits + loss        {b['logits'] / GIB:6.2f} GiB",
        f"estimated peak       {b['total'] / GIB:6.2f} GiB  + CUDA context and allocator slack (about 0.5-1 GiB)",
        f"8 GB GPU             {'fits' if b['total'] / GIB + 1.0 <= 8 * 1e9 / GIB else 'does NOT fit: lower data.max_length / trainer.batch_size / lora.r, or quantize (quant.bits=4)'}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":  # self-check: python -m lora_llm.memory
    from core.config import load_config

    presets = Path(__file__).parent / "presets"
    for preset in ("tiny", "gpt2", "tinyllama", "phi2"):
        report = estimate(load_config(LoraLLMConfig, preset, [], presets))
        print(f"--- {preset}\n{format_report(report)}")
    print("lora_llm.memory: ok")
