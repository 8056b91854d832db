"""Parameters and peak GPU memory of a training config, without loading weights
(``train -c phi2 --dry-run``): the model and its LoRA adapter are built on the ``meta`` device
and :mod:`core.commands.estimate` turns the sizes into bytes per GPU (its activation and logits
terms, ``t`` = adapted projections per layer). The task's own terms:

- **base weights**: quantized linear layers at 4.13 bits (NF4 + double-quantised constants) or
  4.5 bits, 1 B in 8 bits, the rest (embeddings, head, norms, biases) in float32 as
  ``prepare_model_for_kbit_training`` upcasts it; unquantized: all in ``model.dtype``.
- **adapters**: float32 weights + gradients + optimizer state; DoRA's kept outputs and norms.
- **logits**: autocast's 16-bit copy of a float32 (quantized-base) head on top.

Self-check: ``python -m lora_llm.memory``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.commands.estimate import (
    architecture_config,
    autocast_bytes,
    decoder_activation_bytes,
    gpu_verdict,
    logits_bytes,
    on,
    optimizer_bytes,
    setup_lines,
    shard_ranks,
    shipped_architectures,
    trained_report,
)
from core.commands.estimate import format_report as core_format_report
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
    """``(transformers config of model.name, its source)``: built-in tiny, else
    :func:`core.commands.estimate.architecture_config`."""
    m = cfg.model
    if is_tiny(m.name):
        return tiny_config(m.tiny, load_tokenizer(m, TINY_TOKENIZER)), "built-in tiny"
    return architecture_config(m.name, KNOWN_CONFIGS, m.revision, m.trust_remote_code)


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
    """:func:`core.commands.estimate.decoder_activation_bytes` of the run's micro-batch, plus
    what DoRA keeps."""
    tc, checkpointed = cfg.trainer, cfg.model.gradient_checkpointing
    targets = round(
        sum(1 for n, _ in model.named_modules() if n.endswith("lora_A"))
        / max(config.num_hidden_layers, 1)
    )
    eager = cfg.model.attn_implementation == "eager"
    seq, offload = cfg.data.max_length, tc.offload_activations
    kept = decoder_activation_bytes(
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
    from transformers import AutoModelForCausalLM

    config, source = model_config(cfg)
    with torch.device("meta"):  # shapes only
        model = AutoModelForCausalLM.from_config(
            config, trust_remote_code=cfg.model.trust_remote_code
        )
        model = add_adapter(model, cfg.lora, gradient_checkpointing=False)
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
        facts=dict(
            layers=config.num_hidden_layers, hidden=config.hidden_size, vocab=config.vocab_size
        ),
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
