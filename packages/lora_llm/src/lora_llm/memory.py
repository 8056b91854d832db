"""Parameters and peak GPU memory of a training config, without loading weights
(``train -c phi2 --dry-run``): the model and its LoRA adapter are built on the ``meta`` device
from ``config.json`` and :mod:`core.commands.estimate` turns the sizes into bytes per GPU:

- **base weights**: quantized linear layers at 4.13 bits (NF4 + double-quantised constants) or
  4.5 bits, 1 B in 8 bits, the rest (embeddings, head, norms, biases) in float32 as
  ``prepare_model_for_kbit_training`` upcasts it; unquantized: all in ``model.dtype``.
- **adapters**: float32 weights + gradients + optimizer state.
- **activations** of a micro-batch ``b x s``: per layer and token about ``e*((10 + t)h + 4i) +
  28h`` bytes (``e`` bytes per value, ``t`` adapted projections per layer), fitted to what
  autograd saves for Llama layers; eager attention adds ``heads*s*s*(2e+1)`` per layer.
- **logits and loss**: ``b*s*vocab*(e + 12)``, plus autocast's 16-bit copy of a float32 head.

The CUDA context and allocator slack (0.5-1 GiB) come on top; ``metrics.jsonl`` has the real
``memory/peak_allocated_gb``.

Self-check: ``python -m lora_llm.memory``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.commands.estimate import (
    autocast_bytes,
    gpu_verdict,
    layer_activation_bytes,
    logits_bytes,
    on,
    optimizer_bytes,
    setup_lines,
    shard_ranks,
    shipped_architectures,
    shipped_config,
    stack_activation_bytes,
    trained_report,
)
from core.commands.estimate import format_report as core_format_report
from core.errors import UserError
from core.task.hub import hub_reachable, is_cached, looks_like_path
from lora_llm.config import LoraLLMConfig
from lora_llm.model import (
    TINY_TOKENIZER,
    add_adapter,
    is_tiny,
    load_tokenizer,
    parameter_counts,
    tiny_config,
)

KNOWN_CONFIGS = shipped_architectures(__file__)


def model_config(cfg: LoraLLMConfig) -> tuple[Any, str]:
    """``(transformers config of model.name, its source)``; ``UserError`` when it is neither
    local, cached, downloadable nor shipped."""
    from transformers import AutoConfig

    name = cfg.model.name
    if is_tiny(name):
        return tiny_config(
            cfg.model.tiny, load_tokenizer(cfg.model, TINY_TOKENIZER)
        ), "built-in tiny"
    if looks_like_path(name) or is_cached(name) or (name not in KNOWN_CONFIGS and hub_reachable()):
        from core.task.hub import ensure_available

        ensure_available(name, what="model", key="model.name")
        return AutoConfig.from_pretrained(
            name, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        ), "config.json"
    if name in KNOWN_CONFIGS:
        return shipped_config(name, KNOWN_CONFIGS)
    raise UserError(
        f"Cannot read the architecture of '{name}' (model.name): not a local folder, not in the "
        "Hugging Face cache, the Hub is not reachable, and it is not one of the shipped "
        f"architectures ({', '.join(KNOWN_CONFIGS)})."
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
    """Weights of the linear layers bitsandbytes quantizes (not the head, not ``skip``)."""
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
    offload: bool = False,
) -> dict[str, float]:
    """``{"activations", "logits"}``: bytes of one ``batch x seq`` micro-batch (the module
    docstring's terms; ``act_bytes`` = ``e``, ``lora_targets`` = ``t``; logits unchunked)."""
    h = config.hidden_size
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * h
    tokens = batch * seq
    per_token = layer_activation_bytes(h, inner, act_bytes, lora_targets)
    if eager:
        per_token += config.num_attention_heads * seq * (2 * act_bytes + 1)
    activations = stack_activation_bytes(
        config.num_hidden_layers, tokens, per_token, h, act_bytes, checkpointing, offload
    )
    return {
        "activations": float(activations),
        "logits": float(tokens * config.vocab_size * (act_bytes + 12)),
    }


def base_weights(
    model: nn.Module, cfg: LoraLLMConfig, frozen: int, ranks: int
) -> tuple[float, str, int]:
    """``(bytes per GPU, note, quantized weights)`` of the frozen base over ``ranks`` shards."""
    quant = cfg.quant
    if quant.bits is None:
        per_weight = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}[cfg.model.dtype]
        note = f"{frozen:,} weights in {'16' if per_weight == 2 else '32'}-bit"
        quantized, weights = 0, float(frozen * per_weight)
    else:
        quantized = quantizable_weights(model, list(quant.skip_modules))
        per_weight = (
            (0.5 + 1 / 64 + 4 / (64 * 256))
            if (quant.bits == 4 and quant.double_quant)
            else (0.5 + 4 / 64 if quant.bits == 4 else 1.0)
        )
        weights = quantized * per_weight + (frozen - quantized) * 4
        note = (
            f"{quantized:,} weights in {quant.bits}-bit"
            f"{' ' + quant.quant_type.upper() if quant.bits == 4 else ''}, "
            f"{frozen - quantized:,} in float32"
        )
    if ranks > 1:
        note += f", / {ranks} ranks"
    return weights / ranks, note, quantized


def adapted_activations(config: Any, model: nn.Module, cfg: LoraLLMConfig, act_bytes: int) -> float:
    """:func:`activation_bytes` of the run's micro-batch, plus what DoRA keeps."""
    tc, checkpointed = cfg.trainer, cfg.model.gradient_checkpointing
    targets = round(
        sum(1 for n, _ in model.named_modules() if n.endswith("lora_A"))
        / max(config.num_hidden_layers, 1)
    )
    eager = cfg.model.attn_implementation == "eager"
    seq, offload = cfg.data.max_length, tc.offload_activations
    kept = activation_bytes(
        config, tc.batch_size, seq, act_bytes, checkpointed, targets, eager, offload
    )["activations"]
    if cfg.lora.use_dora:
        # DoRA keeps the adapter's output and the base output of each adapted projection, and
        # builds the full (dequantized) weight of one projection at a time for its column norms.
        h = config.hidden_size
        layers = 1 if (checkpointed or offload) else config.num_hidden_layers
        dora = layers * targets * tc.batch_size * seq * 2 * h * act_bytes
        inner = getattr(config, "intermediate_size", None) or 4 * h
        kept += dora + h * inner * act_bytes
    return kept


def setup(cfg: LoraLLMConfig) -> dict[str, str]:
    """:func:`core.commands.estimate.setup_lines` with the sample's shape and switches."""
    data = cfg.data
    layout = "padding-free rows" if data.padding_free else "padded to the longest"
    shape = f"{data.max_length:,} tokens per sample ({'packed rows' if data.packing else layout})"
    switches = (
        f", lora.use_dora={on(cfg.lora.use_dora)}, lora.use_rslora={on(cfg.lora.use_rslora)}, "
        f"data.padding_free={on(data.padding_free)}, "
        f"model.liger_kernel={on(cfg.model.liger_kernel)} (not modelled)"
    )
    return setup_lines(cfg, shape, switches, auto_bf16=True)


def estimate(cfg: LoraLLMConfig) -> dict[str, Any]:
    """The :func:`core.commands.estimate.trained_report` of ``cfg`` (plus
    ``quantized_weights``)."""
    config, source = model_config(cfg)
    model = meta_model(config, cfg)
    trainable, total = parameter_counts(model)
    tc, split = cfg.trainer, shard_ranks(cfg)
    weights, weights_note, quantized = base_weights(model, cfg, total - trainable, split["weights"])
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    adapters = trainable * 4 / split["weights"] + trainable * 4 / split["gradients"]
    optim = optimizer_bytes(cfg.optim.name, trainable_params, cfg.optim.momentum)
    adapters += optim / split["optimizer"]
    act_bytes = autocast_bytes(tc.precision)
    tokens = tc.batch_size * cfg.data.max_length
    logits = logits_bytes(tokens, config.vocab_size, config.hidden_size, act_bytes, cfg.loss)
    if cfg.quant.bits is not None and act_bytes == 2:
        # Autocast keeps a 16-bit copy of the float32 output head for the matmul and its backward.
        logits += model.get_output_embeddings().weight.numel() * act_bytes
    checkpointed = "with" if cfg.model.gradient_checkpointing else "without"
    offloaded = ", layer inputs offloaded to CPU" if tc.offload_activations else ""
    kept = (
        f"micro-batch {tc.batch_size} x {cfg.data.max_length} tokens, {checkpointed} gradient "
        f"checkpointing{offloaded}, {8 * act_bytes}-bit activations"
    )
    chunks = f"chunks of {cfg.loss.chunk_tokens} tokens" if cfg.loss.chunked else None
    sizes = {"base_weights": weights, "adapters_and_optimizer": adapters}
    return trained_report(
        cfg,
        model,
        name=cfg.model.name,
        config=config,
        source=source,
        facts={
            "layers": config.num_hidden_layers,
            "hidden": config.hidden_size,
            "vocab": config.vocab_size,
        },
        setup=setup(cfg),
        units=("decoder layers", ("DecoderLayer", "Block")),
        parts={
            "activations": (adapted_activations(config, model, cfg, act_bytes), kept),
            "logits": (logits, chunks or "full float32 logits"),
        },
        # the notes' order of the report's JSON: base weights, activations, adapters, logits
        notes={
            "activations": kept,
            "adapters_and_optimizer": f"float32 weights + gradients + {cfg.optim.name} state",
        },
        state=(total, trainable, sizes, {"base_weights": weights_note}),
        quantized_weights=quantized,
    )


def render(report: dict[str, Any]) -> str:
    """The report as text (:func:`core.commands.estimate.format_report`), with the 8 GB verdict."""
    advice = "lower data.max_length / trainer.batch_size / lora.r, or quantize (quant.bits=4)"
    return core_format_report(report, gpu_verdict(report, 8, advice))


if __name__ == "__main__":  # self-check: python -m lora_llm.memory
    from core.config.loader import load_config

    presets = Path(__file__).parent / "presets"
    for preset in ("tiny", "gpt2", "tinyllama", "phi2"):
        report = estimate(load_config(LoraLLMConfig, preset, [], presets))
        print(f"--- {preset}\n{render(report)}")
    print("lora_llm.memory: ok")
