"""Parameters and GPU memory of a qwen_vl training config, without loading weights
(``train --dry-run``; :mod:`core.commands.estimate` on the model built on the ``meta`` device).
Self-check: ``python -m qwen_vl.memory`` (the 3B and 7B presets on 4 GPUs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import core.commands.estimate as est
from qwen_vl.config import QwenVLConfig

KNOWN_CONFIGS = est.shipped_architectures(__file__)
"""Architectures of the Hub presets (text model, vision tower, tied embeddings)."""

TEXT_TOKENS = 256
"""Text tokens of a sample besides its image when ``data.max_length`` is not set."""


def model_config(cfg: QwenVLConfig) -> tuple[Any, str]:
    """The transformers config of ``model.name`` and where it came from (``UserError``: neither
    shipped here nor a local folder)."""
    from transformers import Qwen2_5_VLConfig

    if cfg.model.name == "tiny":
        from qwen_vl.model import load_processor, tiny_config

        processor = load_processor(cfg.model)
        config = tiny_config(cfg.model.tiny, processor.tokenizer, processor.image_processor)
        return config, "built-in tiny"

    def build(known: dict[str, Any]) -> Any:
        """A ``Qwen2_5_VLConfig`` from the shipped text and vision values."""
        text, vision, tied = known["text"], known["vision"], known["tie_word_embeddings"]
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied)

    return est.shipped_config(cfg.model.name, KNOWN_CONFIGS, build)


def sample_shape(cfg: QwenVLConfig, vision: Any) -> dict[str, int]:
    """``{"pixels", "patches", "vision_tokens", "seq", "text_tokens"}`` of one sample: an image at
    ``data.max_pixels`` (patches of 14 x 14, merged 2 x 2 into vision tokens) plus its text."""
    pixels = cfg.data.max_pixels or 12_845_056
    patches = pixels // (vision.patch_size * vision.patch_size)
    vision_tokens = patches // vision.spatial_merge_size**2
    seq = cfg.data.max_length or vision_tokens + TEXT_TOKENS
    text_tokens = max(seq - vision_tokens, 1)
    shape = dict(pixels=pixels, patches=patches, vision_tokens=vision_tokens, seq=seq)
    return {**shape, "text_tokens": text_tokens}


def activations(
    cfg: QwenVLConfig, config: Any, shape: dict[str, int], e: int, checkpointed: bool
) -> float:
    """Bytes the language model (over the whole sequence) and, when it trains, the vision tower
    (over each image's patches) keep for backward; ``e`` bytes per value."""
    text, vision, m = config.text_config, config.vision_config, cfg.model
    batch, offload = cfg.trainer.batch_size, cfg.trainer.offload_activations
    lora_targets = len(m.lora.target_modules) if m.lora.enabled else 0
    per_token = est.layer_activation_bytes(
        text.hidden_size, text.intermediate_size, e, lora_targets
    )
    tokens, layers, hidden = batch * shape["seq"], text.num_hidden_layers, text.hidden_size
    total = est.stack_activation_bytes(layers, tokens, per_token, hidden, e, checkpointed, offload)
    if m.train_vision:  # a frozen tower's outputs need no gradient inside it: nothing is kept
        per_patch = est.layer_activation_bytes(vision.hidden_size, vision.intermediate_size, e, 0)
        patches, depth, hidden = batch * shape["patches"], vision.depth, vision.hidden_size
        total += est.stack_activation_bytes(
            depth, patches, per_patch, hidden, e, checkpointed, offload
        )
    return total


def setup(cfg: QwenVLConfig, shape: dict[str, int], checkpointed: bool) -> dict[str, str]:
    """:func:`core.commands.estimate.setup_lines` with the sample's shape and the task's
    switches."""
    m = cfg.model
    sample = (
        f"{shape['seq']:,} tokens per sample: one image at data.max_pixels={shape['pixels']:,} "
        f"({shape['vision_tokens']:,} vision tokens, {shape['patches']:,} patches) + "
        f"{shape['text_tokens']:,} text tokens"
    )
    switches = (
        f", activation checkpointing={est.on(checkpointed)}, "
        f"model.lora.enabled={est.on(m.lora.enabled)} (use_dora={est.on(m.lora.use_dora)}), "
        f"model.liger_kernel={est.on(m.liger_kernel)} (not modelled)"
    )
    return est.setup_lines(cfg, sample, switches)


def estimate(cfg: QwenVLConfig) -> dict[str, Any]:
    """Parameters and training memory of ``cfg`` per GPU: a report for
    :func:`core.commands.estimate.format_report`."""
    from transformers import AutoModelForImageTextToText

    from qwen_vl.model import set_trainable

    config, source = model_config(cfg)
    text, m, batch = config.text_config, cfg.model, cfg.trainer.batch_size
    with torch.device("meta"):  # shapes only
        model = set_trainable(AutoModelForImageTextToText.from_config(config), cfg.model)
    e = est.compute_bytes(cfg.trainer.precision)
    shape = sample_shape(cfg, config.vision_config)
    labelled = batch * shape["text_tokens"]
    checkpointed = est.checkpointing(cfg, m.gradient_checkpointing)
    offloaded = ", inputs offloaded to CPU" if cfg.trainer.offload_activations else ""
    parts = [n for n in ("vision", "merger", "llm") if getattr(m, f"train_{n}")]
    adapters = " (LoRA adapters)" if m.lora.enabled else ""
    kept = (
        f"micro-batch {batch}, {'with' if checkpointed else 'without'} activation checkpointing"
        f"{offloaded}, vision tower {'trained' if m.train_vision else 'frozen (keeps nothing)'}"
    )
    chunks = f"chunks of {cfg.loss.chunk_tokens}" if cfg.loss.chunked else "full logits"
    logits = est.logits_bytes(labelled, text.vocab_size, text.hidden_size, e, cfg.loss)
    sizes = (text.num_hidden_layers, text.hidden_size, text.vocab_size, config.vision_config.depth)
    return est.trained_report(
        cfg,
        model,
        name=m.name,
        config=config,
        source=source,
        facts=dict(zip(("layers", "hidden", "vocab", "vision blocks"), sizes)),
        setup=setup(cfg, shape, checkpointed),
        units=("decoder layers", ("Qwen2_5_VLDecoderLayer",)),
        parts={
            "activations": (activations(cfg, config, shape, e, checkpointed), kept),
            "logits": (logits, f"{labelled:,} labelled tokens at most, {chunks}"),
        },
        notes={"gradients": f"trained: {', '.join(parts) or 'nothing'}{adapters}"},
    )


def render(report: dict[str, Any]) -> str:
    """The report as text, with a verdict for 80 GB GPUs (H100 / A100 80 GB)."""
    advice = "more ranks (fsdp), fsdp.activation_checkpointing=true, lower data.max_pixels / "
    advice += "data.max_length / trainer.batch_size"
    return est.format_report(report, est.gpu_verdict(report, 80, advice))


if __name__ == "__main__":  # self-check: python -m qwen_vl.memory
    from core.config.loader import load_config

    presets = Path(__file__).parent / "presets"  # the module does not import the cli
    for preset in ("qwen2_5_vl_3b", "qwen2_5_vl_7b"):
        report = estimate(load_config(QwenVLConfig, preset, ["trainer.devices=4"], presets))
        print(f"--- {preset}\n{render(report)}")
    print("qwen_vl.memory: ok")
