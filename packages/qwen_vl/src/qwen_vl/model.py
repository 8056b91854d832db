"""Qwen2.5-VL models: the tiny random one, Hub presets, local folders; what trains; ``final/``.

The parts that train (transformers 5 layout of ``Qwen2_5_VLForConditionalGeneration``)::

    model.visual.patch_embed, model.visual.blocks[i]  (Qwen2_5_VLVisionBlock)   -> "vision"
    model.visual.merger                              (Qwen2_5_VLPatchMerger)   -> "merger"
    model.language_model (embed_tokens, layers[i]: Qwen2_5_VLDecoderLayer, norm), lm_head -> "llm"

Self-check: ``python -m qwen_vl.model``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.errors import UserError
from core.nn.models import liger_kernel
from core.nn.optim import parameter_groups
from core.nn.peft_lora import peft_lora_config
from core.task.hub import ensure_available
from qwen_vl.config import LoraConfig, ModelConfig, TinyModelConfig

TINY_PROCESSOR_DIR = Path(__file__).parent / "assets" / "tiny_processor"
"""The shipped tiny processor (built by ``packages/qwen_vl/tools/tiny_processor.py``)."""

TINY = "tiny"
"""``model.name`` of the small random model."""


def processor_source(cfg: ModelConfig) -> str:
    """Where the processor comes from: ``model.processor``, else ``model.name`` (``tiny``: the
    shipped folder)."""
    return cfg.processor or (str(TINY_PROCESSOR_DIR) if cfg.name == TINY else cfg.name)


def check_sources(cfg: ModelConfig) -> None:
    """Fail fast (``UserError``, not a 30 s retry loop) on a model or processor not found here."""
    if cfg.name != TINY:
        ensure_available(cfg.name, what="model", key="model.name", offline_preset=TINY)
    # a Hub processor repo may lack config.json; every Qwen2.5-VL one has preprocessor_config.json
    ensure_available(
        processor_source(cfg),
        what="processor",
        key="model.processor" if cfg.processor else "model.name",
        offline_preset=TINY,
        filename="preprocessor_config.json",
    )


def load_processor(cfg: ModelConfig) -> Any:
    """The Qwen2.5-VL processor (``UserError``: not found, or not a vision-language one)."""
    from transformers import AutoProcessor

    check_sources(cfg)
    source = processor_source(cfg)
    try:
        processor = AutoProcessor.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise UserError(f"Cannot load a processor from {source!r}: {err}") from None
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise UserError(
            f"{source!r} holds a {type(processor).__name__}, not a vision-language processor; "
            "point model.processor at a Qwen2.5-VL one."
        )
    return processor


def tiny_config(t: TinyModelConfig, tokenizer: Any, image_processor: Any) -> Any:
    """A small ``Qwen2_5_VLConfig`` of sizes ``t`` that fits the tokenizer (vocabulary, special
    ids) and the image processor (patch, merge and temporal patch sizes)."""
    from transformers import Qwen2_5_VLConfig

    ids = tokenizer.convert_tokens_to_ids
    half = t.hidden_size // t.num_heads // 2
    # 3D RoPE splits each head's rotary half into temporal / height / width (Qwen: 16/24/24 of 64)
    section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads,
        max_position_embeddings=8192,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
        bos_token_id=None,
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
    )
    vision = dict(
        depth=t.vision_depth,
        hidden_size=t.vision_hidden_size,
        intermediate_size=t.vision_intermediate_size,
        num_heads=t.vision_heads,
        out_hidden_size=t.hidden_size,
        patch_size=int(image_processor.patch_size),
        spatial_merge_size=int(image_processor.merge_size),
        temporal_patch_size=int(image_processor.temporal_patch_size),
        window_size=112,
        fullatt_block_indexes=[t.vision_depth - 1],
        tokens_per_second=2,
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def hf_model(model: nn.Module) -> nn.Module:
    """The ``Qwen2_5_VLForConditionalGeneration`` inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_parts(model: nn.Module) -> dict[str, list[nn.Module]]:
    """``{"vision": [patch_embed, blocks], "merger": [merger], "llm": [language_model, lm_head]}``
    (``UserError``: not Qwen2.5-VL's layout)."""
    base = hf_model(model)
    try:
        visual, language = base.model.visual, base.model.language_model
        return {
            "vision": [visual.patch_embed, visual.blocks],
            "merger": [visual.merger],
            "llm": [language, base.lm_head],
        }
    except AttributeError:
        raise UserError(
            f"{type(base).__name__} does not have Qwen2.5-VL's layout (model.visual / model."
            "language_model / lm_head); model.name must be a Qwen2.5-VL model."
        ) from None


def lora_config(lora: LoraConfig) -> Any:
    """The peft ``LoraConfig``: adapters on the named linear layers of the language model's
    decoder layers only (the vision blocks have layers of the same names, e.g. ``gate_proj``)."""
    names = "|".join(sorted(lora.target_modules))
    targets = rf".*language_model\.layers\.\d+\.(?:self_attn|mlp)\.(?:{names})"
    return peft_lora_config(lora, target_modules=targets, bias="none")


def set_trainable(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """Apply the ``model`` group's switches: LoRA (then returns a peft model) and which parts
    train."""
    if cfg.lora.enabled:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(cfg.lora))  # freezes everything but the adapters
    parts = model_parts(model)
    llm = cfg.train_llm and not cfg.lora.enabled
    wanted = {"vision": cfg.train_vision, "merger": cfg.train_merger, "llm": llm}
    for name, modules in parts.items():
        for param_name, param in nn.ModuleList(modules).named_parameters():
            if "lora_" not in param_name:  # adapters stay trainable
                param.requires_grad_(wanted[name])
    return model


def set_generation(model: nn.Module, tok: Any) -> None:
    """Set greedy generation that stops at the end of a turn (``UserError``: the tokenizer's
    image token is not the model's)."""
    image_token = tok.convert_tokens_to_ids("<|image_pad|>")
    own = getattr(model.config, "image_token_id", None)
    if own != image_token:
        raise UserError(
            f"The processor's <|image_pad|> id ({image_token}) differs from the model's image_"
            f"token_id ({own}): model.processor does not belong to model.name."
        )
    gen = model.generation_config
    # Answers end at <|im_end|>; <|endoftext|> also stops (as in Qwen's own generation config)
    gen.eos_token_id = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    gen.pad_token_id, gen.do_sample = tok.pad_token_id, False
    for key in ("temperature", "top_p", "top_k"):  # Qwen's Hub config samples; greedy here
        setattr(gen, key, None)  # (and without warnings)


def build_model(cfg: ModelConfig, processor: Any, gradient_checkpointing: bool) -> nn.Module:
    """The model of the ``model`` group on the default device and dtype (Fabric's
    ``init_module`` sets both), checked against ``processor``, with the switches applied."""
    from transformers import AutoModelForImageTextToText

    options = {"dtype": torch.get_default_dtype(), "attn_implementation": cfg.attn_implementation}
    if cfg.name == TINY:
        config = tiny_config(cfg.tiny, processor.tokenizer, processor.image_processor)
        model = AutoModelForImageTextToText.from_config(config, **options)
    else:
        check_sources(cfg)
        try:
            model = AutoModelForImageTextToText.from_pretrained(cfg.name, **options)
        except (OSError, ValueError) as err:
            raise UserError(f"Cannot load the model {cfg.name!r} (model.name): {err}") from None
    set_generation(model, processor.tokenizer)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.liger_kernel:
        liger_kernel(model)
    return set_trainable(model, cfg)


def param_groups(
    model: nn.Module, cfg: ModelConfig, lr: float, weight_decay: float
) -> list[dict[str, Any]]:
    """Optimizer groups ``vision/decay``, ``llm/no_decay``, ... at the ``model`` group's rates
    (else ``lr``), parts without trainable parameters left out (``RuntimeError``: a trainable
    parameter that no part holds)."""
    rates = {"vision": cfg.lr_vision, "merger": cfg.lr_merger, "llm": cfg.lr_llm}
    groups: list[dict[str, Any]] = []
    for name, modules in model_parts(model).items():
        # a ModuleList view de-duplicates shared tensors (tied embeddings) within a part
        groups += parameter_groups(nn.ModuleList(modules), weight_decay, rates[name] or lr, name)
    covered = {id(p) for g in groups for p in g["params"]}
    stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
    if stray:
        raise RuntimeError(
            f"Trainable parameters outside the vision / merger / llm parts: {stray[:5]}"
        )
    return groups


def export_final(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    out_dir: Path,
    processor: Any,
    lora: LoraConfig | None,
) -> None:
    """Write ``model`` (its full CPU ``state_dict``, put into a fresh meta-device skeleton: the
    training model is not touched) and ``processor`` to ``out_dir``; with ``lora`` the adapters
    are merged, and the adapter alone goes to ``out_dir/adapter``."""
    from transformers import AutoModelForImageTextToText

    base = hf_model(model)
    dtype = next((t.dtype for t in state_dict.values() if t.is_floating_point()), torch.float32)
    with torch.device("meta"):
        skeleton = AutoModelForImageTextToText.from_config(base.config, dtype=dtype)
        if lora is not None:
            from peft import get_peft_model

            skeleton = get_peft_model(skeleton, lora_config(lora))
    skeleton.load_state_dict(state_dict, strict=True, assign=True)
    if lora is not None:
        skeleton.save_pretrained(out_dir / "adapter")
        skeleton = skeleton.merge_and_unload()
    skeleton.generation_config = base.generation_config
    skeleton.config.dtype = dtype
    skeleton.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


if __name__ == "__main__":  # self-check: python -m qwen_vl.model
    import tempfile

    from transformers import AutoModelForImageTextToText, AutoProcessor

    cfg = ModelConfig(train_vision=True, lr_vision=1e-5)
    processor = load_processor(cfg)
    model = build_model(cfg, processor, gradient_checkpointing=False)
    parts = model_parts(model).items()
    counts = {k: sum(p.numel() for m in v for p in m.parameters()) for k, v in parts}
    print(type(model).__name__, "parameters per part:", counts)
    groups = param_groups(model, cfg, lr=1e-4, weight_decay=0.0)
    print("groups:", [(g["name"], g.get("lr"), len(g["params"])) for g in groups])
    lora_cfg = ModelConfig(lora=LoraConfig(enabled=True))
    lora = build_model(lora_cfg, processor, gradient_checkpointing=False)
    adapters = [n for n, p in lora.named_parameters() if p.requires_grad and "lora_" in n]
    assert adapters and all("language_model" in n for n in adapters)
    print(f"LoRA: {len(adapters)} adapter tensors, all in the language model")
    with tempfile.TemporaryDirectory() as tmp:
        state = {k: v.detach().clone() for k, v in lora.state_dict().items()}
        export_final(lora, state, Path(tmp), processor, ModelConfig().lora)
        loaded = AutoModelForImageTextToText.from_pretrained(tmp)
        AutoProcessor.from_pretrained(tmp)
        print("final/ with merged LoRA loads as", type(loaded).__name__)
    print("qwen_vl.model: ok")
