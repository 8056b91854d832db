"""The base causal LM (a Hub id, a folder, or ``tiny``: a small Llama with seeded random
weights, saved so it loads and quantizes through the real loading code), its 4/8-bit loading
(bitsandbytes, on the CPU too), the LoRA adapter it trains, and a saved adapter on its base for
``infer`` / ``merge`` (:mod:`core.task.adapters` checks that it fits).

Self-check: ``python -m lora_llm.model`` (tiny model, 4-bit, one backward pass, save and reload).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.errors import UserError
from core.nn.models import (
    auto_dtype,
    default_dtype,
    enable_checkpointing,
    liger_kernel,
    parameter_counts,
    transformers_errors_only,
)
from core.nn.peft_lora import peft_lora_config
from core.task.adapters import (
    attach_adapter,
    linear_module_names,
    peft_quietly,
    read_adapter_config,
)
from core.task.hub import ensure_available
from lora_llm.config import LoraSettings, ModelConfig, QuantConfig, TinyModelConfig
from lora_llm.data import ASSETS

# bitsandbytes warns at import that an optional extra ('kernels') is missing, then uses its own
# CPU kernel; the message only confuses.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

TINY = "tiny"
TINY_TOKENIZER = ASSETS / "tiny_tokenizer"
SETTINGS_FILE = "lora_llm.json"
"""Written next to the adapter: the prompt template, quantization and base model it was trained
with."""


def is_tiny(name: str) -> bool:
    """Whether ``model.name`` asks for the built-in tiny model."""
    return str(name) == TINY


def load_tokenizer(cfg: ModelConfig, source: str | Path | None = None) -> Any:
    """The tokenizer of the ``model`` group ``cfg`` (or of ``source``, a folder or Hub id that
    overrides ``model.tokenizer`` / ``model.name``), with a pad token and right padding;
    ``UserError`` for a Hub id that cannot be downloaded here or a missing folder."""
    from transformers import AutoTokenizer

    key = "model.tokenizer" if cfg.tokenizer else "model.name"
    if source is None:
        source = cfg.tokenizer or (TINY_TOKENIZER if is_tiny(cfg.name) else cfg.name)
    ensure_available(source, what="tokenizer", key=key, filename="tokenizer_config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise UserError(f"Cannot load a tokenizer from '{source}' ({key}): {err}") from None
    if tokenizer.pad_token is None:
        # Padding positions are masked by length, so pad == EOS does not hide the trained EOS.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def tiny_config(spec: TinyModelConfig, tokenizer: Any) -> Any:
    """The ``LlamaConfig`` of the tiny model (vocabulary and special ids from ``tokenizer``)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def build_tiny_base(spec: TinyModelConfig, tokenizer: Any, out_dir: Path) -> Path:
    """Write the tiny model of ``spec`` (``model.tiny``) and its ``tokenizer`` to ``out_dir``
    (``<run>/base``, returned); an existing one (a resumed run) is kept. The weights depend only
    on ``spec`` (``seed`` included), so every rank and session builds the same model."""
    from transformers import LlamaForCausalLM

    if (out_dir / "config.json").is_file():
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with torch.random.fork_rng(devices=[]), torch.device("cpu"), default_dtype(torch.float32):
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(tiny_config(spec, tokenizer))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out_dir)
    return out_dir


def quantization_config(quant: QuantConfig, device_type: str) -> Any:
    """``BitsAndBytesConfig`` for ``quant`` (None when ``quant.bits`` is null)."""
    if quant.bits is None:
        return None
    from transformers import BitsAndBytesConfig

    if quant.bits == 8:
        return BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_skip_modules=list(quant.skip_modules) or None
        )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=auto_dtype(quant.compute_dtype, device_type),
        llm_int8_skip_modules=list(quant.skip_modules) or None,
    )


def is_quantized(model: nn.Module) -> bool:
    """Whether a transformers model was loaded in 4 or 8 bits."""
    return bool(
        getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    )


def cpu_4bit_inference_kernel(model: nn.Module, enabled: bool) -> None:
    """Allow (``enabled``: inference) or forbid (training) bitsandbytes' AVX512-BF16 4-bit
    kernel on the CPU in a 4-bit ``model`` (other models are left alone).

    bitsandbytes 0.50 repacks a ``Linear4bit`` weight for that kernel the first time it runs in
    eval mode without gradients (a validation pass), and from then on uses the kernel in training
    too, although it has no backward: gradients through the frozen base are silently lost
    (``tests/test_lora_llm_model.py`` shows it). Training therefore turns it off. For inference it
    stays on where bitsandbytes can use it (output features a multiple of 32).
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = bool(
                module.support_avx512bf16_for_cpu and enabled and module.out_features % 32 == 0
            )


def load_base(
    name_or_path: str | Path,
    cfg: ModelConfig,
    quant: QuantConfig | None,
    device: torch.device,
    training: bool = True,
    compute_device: torch.device | None = None,
) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(name_or_path)`` with the ``model`` group's dtype,
    attention and revision, its weights on ``device``, quantized by the ``quant`` group (None: a
    16/32-bit base); in eval mode, as from_pretrained leaves it. ``training``: see
    :func:`cpu_4bit_inference_kernel`. ``compute_device``: where the model will compute, if not
    ``device`` (FSDP2 loads on the CPU and moves each rank's shards to its GPU); it picks the
    ``auto`` dtype. ``UserError`` when the model cannot be found or loaded."""
    from transformers import AutoModelForCausalLM

    ensure_available(name_or_path, what="model", key="model.name")
    bnb = quantization_config(quant, device.type) if quant is not None else None
    kwargs: dict[str, Any] = {
        "dtype": auto_dtype(cfg.dtype, (compute_device or device).type),
        "revision": cfg.revision,
        "trust_remote_code": cfg.trust_remote_code,
        "device_map": {"": device},
        "quantization_config": bnb,  # None: not quantized (from_pretrained's default)
    }
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    check_causal_lm(name_or_path, cfg)
    try:
        with transformers_errors_only():
            model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise UserError(f"Cannot load the model '{name_or_path}' (model.name): {err}") from None
    cpu_4bit_inference_kernel(model, enabled=not training)
    if cfg.liger_kernel and training:
        liger_kernel(model)
    return model


def check_causal_lm(name_or_path: str | Path, cfg: ModelConfig) -> None:
    """Refuse a local model folder whose architecture is not a causal LM (e.g. a seq2seq model
    passed as ``--base``) before loading it, naming what it is.

    Raises:
        UserError: the folder's config.json names an encoder-decoder or non-causal architecture.
    """
    config_file = Path(name_or_path) / "config.json"
    if not config_file.is_file():
        return
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    architectures = config.get("architectures") or []
    causal = any("CausalLM" in a or "LMHeadModel" in a for a in architectures)  # GPT2LMHeadModel
    if config.get("is_encoder_decoder") or (architectures and not causal):
        raise UserError(
            f"'{name_or_path}' holds a {config.get('model_type', '?')} model "
            f"({', '.join(architectures) or 'no architecture'}), "
            "not a causal language model: give the base the adapter was trained on (--base), or a "
            "causal LM for model.name."
        )


def add_adapter(model: nn.Module, lora: LoraSettings, gradient_checkpointing: bool) -> nn.Module:
    """Freeze the causal LM ``model`` (quantized or not), set up checkpointing
    (``model.gradient_checkpointing``), and wrap it in a peft ``PeftModel`` with the ``lora``
    group's adapter: only the adapter weights (float32) require grad. ``UserError`` when
    ``lora.target_modules`` names layers the model does not have."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if is_quantized(model):
        # Freezes everything and casts the other 16-bit weights (norms, embeddings, head) to fp32.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model.requires_grad_(False)
    if gradient_checkpointing:
        enable_checkpointing(model)
        # the embedding output requires grad, so the first checkpointed block's input carries a
        # gradient although every base weight is frozen
        model.enable_input_require_grads()
    model.config.use_cache = False  # useless in training, in conflict with checkpointing
    targets: Any = (
        "all-linear" if list(lora.target_modules) == ["all-linear"] else list(lora.target_modules)
    )
    # GPT-2's Conv1D layers store their weight transposed; peft must know (it would warn, guess).
    conv1d = any(type(m).__name__ == "Conv1D" for m in model.modules())
    config = peft_lora_config(
        lora, target_modules=targets, bias=lora.bias, fan_in_fan_out=conv1d, task_type="CAUSAL_LM"
    )
    try:
        with peft_quietly():
            return get_peft_model(model, config)
    except ValueError as err:
        raise UserError(
            f"lora.target_modules={list(lora.target_modules)} does not fit this model ({err}). "
            "Its linear layers are: "
            f"{', '.join(linear_module_names(model))}; or use lora.target_modules=[all-linear]."
        ) from None


def causal_lm_class(config: Any) -> type:
    """The transformers class ``AutoModelForCausalLM`` builds for a model config (no weights
    read)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM._model_mapping[type(config)]


def read_adapter(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``adapter_config.json`` and this package's ``lora_llm.json`` (empty if absent) of an adapter
    folder (:func:`core.task.adapters.read_adapter_config` says why a folder is not one)."""
    settings_file = Path(adapter_dir) / SETTINGS_FILE
    config = read_adapter_config(adapter_dir)
    settings = (
        json.loads(settings_file.read_text(encoding="utf-8")) if settings_file.is_file() else {}
    )
    return config, settings


def load_adapter_model(
    adapter_dir: Path, base: str, cfg: ModelConfig, quant: QuantConfig | None, device: torch.device
) -> nn.Module:
    """Base model (:func:`load_base` with ``cfg`` and ``quant``, on ``device``) + the saved
    adapter, checked to fit (:func:`core.task.adapters.attach_adapter`), in eval mode."""
    model = load_base(base, cfg, quant, device, training=False)
    return attach_adapter(model, adapter_dir, base)


def write_settings(out_dir: Path, settings: dict[str, Any]) -> None:
    """Write ``lora_llm.json`` (prompt template, quantization, base) next to an adapter."""
    (Path(out_dir) / SETTINGS_FILE).write_text(
        json.dumps(settings, indent=1, ensure_ascii=False), encoding="utf-8"
    )


if __name__ == "__main__":  # self-check: python -m lora_llm.model
    import tempfile

    tok = load_tokenizer(ModelConfig(name=TINY))
    with tempfile.TemporaryDirectory() as tmp:
        base = build_tiny_base(TinyModelConfig(), tok, Path(tmp) / "base")
        model = load_base(
            base, ModelConfig(name=str(base)), QuantConfig(bits=4), torch.device("cpu")
        )
        print(
            "quantized:",
            type(model.model.layers[0].self_attn.q_proj).__name__,
            "compute",
            model.model.layers[0].self_attn.q_proj.compute_dtype,
        )
        model = add_adapter(model, LoraSettings(), gradient_checkpointing=True)
        trainable, total = parameter_counts(model)
        print(f"trainable {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
        model.train()
        ids = torch.tensor([tok.encode("Hello world, this is a test.")])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), (
            "LoRA B must get gradients through the frozen 4-bit base"
        )
        model.save_pretrained(Path(tmp) / "adapter")
        cfg = ModelConfig(name=str(base))
        again = load_adapter_model(Path(tmp) / "adapter", str(base), cfg, None, torch.device("cpu"))
        print(
            f"loss {loss.item():.3f}; adapter files: "
            f"{sorted(p.name for p in (Path(tmp) / 'adapter').iterdir())}; reloaded "
            f"{type(again).__name__}"
        )
    print("lora_llm.model: ok")
