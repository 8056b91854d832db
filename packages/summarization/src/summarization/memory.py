"""Parameters and GPU memory of a summarization training config, without loading weights
(``train -c bart_large_cnn --dry-run``): the encoder-decoder is built on the ``meta`` device
(Hub presets from their shipped ``config.json`` values), frozen as configured, and
:mod:`core.commands.estimate` turns its sizes into memory per GPU. Encoder activations cover the
source tokens, decoder ones the summary tokens; the logits are plain float32 (the seq2seq head
adds ``final_logits_bias`` after them, so ``loss.chunked`` does not apply to this task).

Self-check: ``python -m summarization.memory``.
"""

from __future__ import annotations

from typing import Any

import torch

from core.commands.estimate import (
    autocast_bytes,
    checkpointing,
    format_report,
    gpu_verdict,
    layer_activation_bytes,
    on,
    setup_lines,
    shipped_architectures,
    shipped_config,
    stack_activation_bytes,
    trained_report,
)
from summarization.config import SummarizationConfig

KNOWN_CONFIGS = shipped_architectures(__file__)
"""Architectures of the Hub presets (the public ``config.json`` values that set the sizes)."""


def model_config(cfg: SummarizationConfig) -> tuple[Any, str]:
    """The transformers config of the model to train and where it came from; ``UserError`` for
    a Hub id whose architecture is not shipped and not a local folder."""
    m = cfg.model
    if m.init == "scratch":
        from summarization.model import load_tokenizer, scratch_config

        return scratch_config(m, load_tokenizer(m)), "model.scratch"
    return shipped_config(m.name, KNOWN_CONFIGS)


def sizes(config: Any) -> dict[str, int]:
    """Width, FFN width, heads and depth of either family (BART's and T5's config names)."""
    return {
        "d": config.d_model,
        "ffn": getattr(config, "encoder_ffn_dim", None) or config.d_ff,
        "enc": getattr(config, "encoder_layers", None) or config.num_layers,
        "dec": getattr(config, "decoder_layers", None) or config.num_decoder_layers,
    }


def activations(cfg: SummarizationConfig, config: Any, e: int, checkpointed: bool) -> float:
    """Bytes the encoder and decoder stacks keep for backward (``e`` bytes per value): encoder
    layers over the source tokens, decoder layers over the summary tokens."""
    s, batch = sizes(config), cfg.trainer.batch_size
    src, tgt = cfg.data.max_source_length, cfg.data.max_target_length
    offload = cfg.trainer.offload_activations
    per_token = layer_activation_bytes(s["d"], s["ffn"], e, 0)
    encoder = stack_activation_bytes(
        s["enc"], batch * src, per_token, s["d"], e, checkpointed, offload
    )
    # Decoder layers: self-attention + cross-attention (its queries per summary token, its keys
    # and values over the source) + FFN.
    per_target = per_token + 4 * s["d"] * e + 2 * s["d"] * e * src / max(tgt, 1)
    return encoder + stack_activation_bytes(
        s["dec"], batch * tgt, per_target, s["d"], e, checkpointed, offload
    )


def estimate(cfg: SummarizationConfig) -> dict[str, Any]:
    """Parameters and training memory of ``cfg`` per GPU, without loading weights: a report for
    :func:`core.commands.estimate.format_report`."""
    from transformers import AutoModelForSeq2SeqLM

    from summarization.model import apply_freezing

    config, source = model_config(cfg)
    with torch.device("meta"):
        model = AutoModelForSeq2SeqLM.from_config(config)
    apply_freezing(model, cfg.model)
    e, s = autocast_bytes(cfg.trainer.precision), sizes(config)
    batch, src, tgt = cfg.trainer.batch_size, cfg.data.max_source_length, cfg.data.max_target_length
    checkpointed = checkpointing(cfg, cfg.model.gradient_checkpointing)
    shape = f"source {src} + summary {tgt} tokens per sample"
    kept = f"micro-batch {batch}, {'with' if checkpointed else 'without'} activation checkpointing"
    logits = f"{batch * tgt:,} summary tokens, full float32 logits"
    return trained_report(
        cfg,
        model,
        name=cfg.model.name if cfg.model.init == "pretrained" else "scratch",
        config=config,
        source=source,
        facts={"layers": f"{s['enc']}+{s['dec']}", "hidden": s["d"], "vocab": config.vocab_size},
        setup=setup_lines(cfg, shape, f", activation checkpointing={on(checkpointed)}", True),
        units=("layers", ("EncoderLayer", "DecoderLayer", "Block")),
        parts={
            "activations": (activations(cfg, config, e, checkpointed), kept),
            "logits": (float(batch * tgt * config.vocab_size * (e + 12)), logits),
        },
    )


def render(report: dict[str, Any]) -> str:
    """The report as text, with a verdict for a 24 GB GPU."""
    advice = (
        "lower trainer.batch_size (raise accumulation), turn on model.gradient_checkpointing, "
        "or shard (trainer.strategy=fsdp)"
    )
    return format_report(report, gpu_verdict(report, 24, advice))


if __name__ == "__main__":  # self-check: python -m summarization.memory
    from core.config.loader import load_config
    from summarization.config import PRESETS_DIR

    for preset in ("bart_large_cnn", "t5_small", "small"):
        print(f"--- {preset}")
        print(render(estimate(load_config(SummarizationConfig, preset, [], PRESETS_DIR))))
    print("summarization.memory: ok")
