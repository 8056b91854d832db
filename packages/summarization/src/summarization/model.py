"""Seq2seq models: any ``AutoModelForSeq2SeqLM`` by Hub id or folder (``model.init=pretrained``;
one that cannot be downloaded fails in a second, :func:`core.task.hub.ensure_available`), or a
random (m)BART sized by ``model.scratch.*`` with the shipped tokenizer (``scratch``: no download).
Fine-tuning switches (activation checkpointing, freezing) and a per-part parameter count.

Self-check: ``python -m summarization.model``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from torch import nn

from core.errors import ConfigError, UserError
from core.nn.models import enable_checkpointing
from core.task.hub import ensure_available
from summarization.config import SHIPPED_TOKENIZER, ModelConfig

log = logging.getLogger(__name__)


# -- loading ---------------------------------------------------------------------------------


def tokenizer_source(cfg: ModelConfig) -> str:
    """Where the tokenizer comes from: ``model.tokenizer``, the shipped one (scratch) or
    ``model.name``."""
    if cfg.tokenizer:
        return cfg.tokenizer
    return str(SHIPPED_TOKENIZER) if cfg.init == "scratch" else cfg.name


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer, checked for availability first (``UserError``: a folder that does not
    exist, a Hub id that cannot be downloaded here, or no padding token)."""
    from transformers import AutoTokenizer

    source = tokenizer_source(cfg)
    ensure_available(
        source,
        what="tokenizer",
        key="model.tokenizer" if cfg.tokenizer else "model.name",
        offline_preset="tiny",
    )
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        raise UserError(
            f"The tokenizer of '{source}' has no padding token; seq2seq batches need one (set "
            "model.tokenizer to one that has)."
        )
    return tokenizer


def load_model_config(cfg: ModelConfig, tokenizer: Any) -> Any:
    """The ``PretrainedConfig`` of the model to train (scratch: a ``BartConfig`` or
    ``MBartConfig``, nothing downloaded)."""
    if cfg.init == "scratch":
        return scratch_config(cfg, tokenizer)
    from transformers import AutoConfig

    ensure_available(cfg.name, what="model", key="model.name", offline_preset="tiny")
    config = AutoConfig.from_pretrained(cfg.name)
    if not getattr(config, "is_encoder_decoder", False):
        raise UserError(
            f"model.name='{cfg.name}' is a {config.model_type} model, not an encoder-decoder "
            "(seq2seq) model; summarization needs one such as facebook/bart-large-cnn, "
            "facebook/bart-base or t5-small."
        )
    return config


def scratch_config(cfg: ModelConfig, tokenizer: Any) -> Any:
    """A ``BartConfig`` or ``MBartConfig`` (``model.scratch.architecture``) sized by
    ``model.scratch`` for ``tokenizer``'s vocabulary and special tokens."""
    s = cfg.scratch
    return scratch_config_class(cfg)(
        vocab_size=len(tokenizer),
        d_model=s.d_model,
        encoder_layers=s.encoder_layers,
        decoder_layers=s.decoder_layers,
        encoder_attention_heads=s.attention_heads,
        decoder_attention_heads=s.attention_heads,
        encoder_ffn_dim=s.ffn_dim,
        decoder_ffn_dim=s.ffn_dim,
        dropout=s.dropout,
        attention_dropout=s.attention_dropout,
        max_position_embeddings=s.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,  # BART's convention: </s> starts the decoder
        forced_bos_token_id=tokenizer.bos_token_id,  # labels begin with <s>
        forced_eos_token_id=tokenizer.eos_token_id,
    )


def scratch_config_class(cfg: ModelConfig) -> type:
    """The transformers config class of ``model.scratch.architecture`` (``BartConfig`` or
    ``MBartConfig``)."""
    from transformers import BartConfig, MBartConfig

    return {"bart": BartConfig, "mbart": MBartConfig}[cfg.scratch.architecture]


def decoder_start_id(config: Any) -> int:
    """The decoder's first input id (BART: ``</s>``; T5: ``<pad>``); ``UserError`` if none."""
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(getattr(config, "decoder", None), "decoder_start_token_id", None)
    if start is None:
        raise UserError(
            f"The {config.model_type} config has no decoder_start_token_id; seq2seq training "
            "needs it."
        )
    return int(start)


def check_precision(config: Any, precision: str) -> None:
    """Refuse (``ConfigError``) a 16-bit float ``precision`` for T5-family models: they overflow
    to inf/NaN in fp16."""
    if "t5" in str(getattr(config, "model_type", "")) and str(precision).startswith("16"):
        raise ConfigError(
            f"trainer.precision={precision} with a {config.model_type} model: T5 overflows in "
            "float16 and its loss becomes NaN. "
            "Use trainer.precision=bf16-mixed (GPUs with bfloat16) or 32-true."
        )


def build_model(cfg: ModelConfig, config: Any) -> nn.Module:
    """The ``AutoModelForSeq2SeqLM`` model (pretrained, or random from ``config``, the output of
    :func:`load_model_config`) with the fine-tuning switches of ``cfg`` applied, in train mode."""
    from transformers import AutoModelForSeq2SeqLM

    kwargs = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    if cfg.init == "scratch":
        model = AutoModelForSeq2SeqLM.from_config(config, **kwargs)
    else:
        model = AutoModelForSeq2SeqLM.from_pretrained(cfg.name, **kwargs)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    apply_freezing(model, cfg)
    model.train()
    return model


# -- freezing and counting -------------------------------------------------------------------


def blocks(stack: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of an encoder or decoder (``layers`` in BART, ``block`` in
    T5); ``UserError`` if none is found."""
    for attr in ("layers", "block", "layer"):
        found = getattr(stack, attr, None)
        if isinstance(found, nn.ModuleList):
            return found
    raise UserError(
        f"Cannot find the blocks of {type(stack).__name__} (no 'layers' / 'block' list); layer "
        "freezing does not support this model."
    )


def chosen_layers(spec: int | Sequence[int], count: int, key: str) -> list[int]:
    """Indices selected by a freeze setting: ``N`` -> the first N, a list -> those indices;
    ``ConfigError`` for N above ``count`` or an index out of range."""
    if isinstance(spec, int):
        if not 0 <= spec <= count:
            raise ConfigError(
                f"{key}={spec}, but the model has {count} blocks there; use 0..{count}."
            )
        return list(range(spec))
    bad = [i for i in spec if not -count <= i < count]
    if bad:
        raise ConfigError(
            f"{key}={list(spec)} names blocks {bad} that do not exist; the model has {count} "
            f"(0..{count - 1})."
        )
    return sorted({i % count for i in spec})


def embedding_modules(model: nn.Module) -> list[nn.Module]:
    """Token embeddings (shared, and tied to the output layer when the model ties them) and
    learned position embeddings."""
    found: list[nn.Module] = [model.get_input_embeddings()]
    for name, module in model.named_modules():
        if name.endswith(("embed_positions", "embed_tokens")) and module not in found:
            found.append(module)
    return found


def apply_freezing(model: nn.Module, cfg: ModelConfig) -> None:
    """Set ``requires_grad=False`` on the parts of an encoder-decoder ``model`` named by the
    ``model.freeze_*`` switches of ``cfg``."""
    encoder, decoder = model.get_encoder(), model.get_decoder()
    if cfg.freeze_encoder:
        # The token embeddings are shared with the decoder (and tied to the output layer): leave
        # them to freeze_embeddings, freeze everything else of the encoder.
        shared = {id(p) for p in decoder.parameters()} | {
            id(p) for p in model.get_input_embeddings().parameters()
        }
        for param in encoder.parameters():
            if id(param) not in shared:
                param.requires_grad_(False)
    stacks = (
        (encoder, cfg.freeze_encoder_layers, "model.freeze_encoder_layers"),
        (decoder, cfg.freeze_decoder_layers, "model.freeze_decoder_layers"),
    )
    for stack, spec, key in stacks:
        layer_list = blocks(stack)
        for index in chosen_layers(spec, len(layer_list), key):
            layer_list[index].requires_grad_(False)
    if cfg.freeze_embeddings:
        for module in embedding_modules(model):
            module.requires_grad_(False)


def parameter_report(model: nn.Module) -> dict[str, dict[str, int]]:
    """Parameter counts ``{part: {"total": n, "trainable": n}}`` of an encoder-decoder model (tied
    weights once) for ``embeddings``, ``encoder.N`` / ``decoder.N`` blocks, ``other`` (norms,
    heads, biases) and ``all``."""
    part_of: dict[int, str] = {}
    for module in embedding_modules(model):
        for p in module.parameters():
            part_of.setdefault(id(p), "embeddings")
    for side, stack in (("encoder", model.get_encoder()), ("decoder", model.get_decoder())):
        for i, block in enumerate(blocks(stack)):
            for p in block.parameters():
                part_of.setdefault(id(p), f"{side}.{i}")
    report: dict[str, dict[str, int]] = {}
    seen: set[int] = set()
    for p in model.parameters():  # parameters() yields a tied tensor once
        if id(p) in seen:
            continue
        seen.add(id(p))
        for part in (part_of.get(id(p), "other"), "all"):
            entry = report.setdefault(part, {"total": 0, "trainable": 0})
            entry["total"] += p.numel()
            entry["trainable"] += p.numel() if p.requires_grad else 0
    return report


def format_report(report: dict[str, dict[str, int]]) -> str:
    """A small text table of :func:`parameter_report` (one line per part)."""
    lines = [f"{'part':<12} {'total':>12} {'trainable':>12}"]
    for part, counts in report.items():
        if part != "all":
            lines.append(f"{part:<12} {counts['total']:>12,} {counts['trainable']:>12,}")
    total = report["all"]
    lines.append(
        f"{'all':<12} {total['total']:>12,} {total['trainable']:>12,}  "
        f"({100.0 * total['trainable'] / max(total['total'], 1):.1f}% trainable)"
    )
    return "\n".join(lines)


if __name__ == "__main__":  # self-check: python -m summarization.model
    import tempfile

    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from summarization.config import ScratchConfig

    sizes = ScratchConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, attention_heads=2, ffn_dim=64
    )
    cfg = ModelConfig(init="scratch", scratch=sizes)
    tokenizer = load_tokenizer(cfg)
    config = load_model_config(cfg, tokenizer)
    model = build_model(cfg, config)
    full = parameter_report(model)["all"]
    frozen_cfg = ModelConfig(
        init="scratch",
        scratch=cfg.scratch,
        freeze_embeddings=True,
        freeze_encoder_layers=1,
        freeze_decoder_layers=[1],
        gradient_checkpointing=True,
    )
    frozen = build_model(frozen_cfg, config)
    report = parameter_report(frozen)
    print(format_report(report))
    assert all(report[part]["trainable"] == 0 for part in ("embeddings", "encoder.0", "decoder.1"))
    assert report["encoder.1"]["trainable"] > 0 and full["trainable"] == full["total"]
    assert frozen.is_activation_checkpointing
    batch = tokenizer(["#Person1#: 안녕하세요. #Person2#: Hello!"], return_tensors="pt")
    out = model(**batch, decoder_input_ids=batch["input_ids"][:, :4])
    print("logits", tuple(out.logits.shape), "(batch, target length, vocab)")
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        again = AutoModelForSeq2SeqLM.from_pretrained(tmp)
        assert type(again).__name__ == "BartForConditionalGeneration"
        assert len(AutoTokenizer.from_pretrained(tmp)) == len(tokenizer)
    try:
        ensure_available("facebook/bart-large-cnn")
        print("facebook/bart-large-cnn is available here")
    except UserError as err:
        print("hub preset offline ->", str(err)[:100], "...")
    print("summarization.model: ok")
