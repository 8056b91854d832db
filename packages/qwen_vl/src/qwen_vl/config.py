"""The root config of the qwen_vl task: the engine's groups plus ``data``, ``model`` and
``generation``; range checks in ``__post_init__``. Self-check: ``python -m qwen_vl.config``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from core.config.schema import LoraConfig as CoreLoraConfig
from core.config.schema import LossConfig, TrainConfig, check_at_least, check_positive
from core.errors import ConfigError

PRESETS_DIR = Path(__file__).parent / "presets"
"""The YAML presets shipped in the package."""
DEFAULT_PRESET = "tiny"
"""Preset of ``train`` without ``-c`` (offline; the built-in counting data, drawn on first use)."""


@dataclass
class DataConfig:
    """Conversation files, image size limits and sequence length."""

    train_file: Path | None = None
    """JSONL of training conversations (image paths relative to it); ``builtin:counting``: the
    built-in counting data (400 records, drawn into a cache folder on first use)."""
    val_file: Path | None = None
    """JSONL of validation conversations (same layout); ``builtin:counting``: the built-in
    counting data's dev split (80 records); null: no validation."""
    min_pixels: int | None = 3136
    """Smallest image area (height x width) fed to the vision tower (an image makes
    ``round(h/28) * round(w/28)`` vision tokens after resizing); null: the processor's own."""
    max_pixels: int | None = 401408
    """Largest image area fed to the vision tower (at most ``max_pixels / 784`` vision tokens: 512);
    null: the processor's own (Qwen2.5-VL's: 16384 tokens; set this for big images)."""
    max_source_pixels: int = 100_000_000
    """Refuse image files with more pixels than this before decoding them (an input error)."""
    verify_images: Literal["decode", "header"] = "decode"
    """Check images before training by ``decode`` (a corrupt file stops the run before it starts)
    or by ``header`` only (faster; a corrupt file stops the run when it is reached)."""
    max_length: int | None = None
    """Longest conversation in tokens (text + vision); longer is an input error; null: no limit."""
    drop_too_long: bool = False
    """Drop records longer than ``data.max_length`` (logged with their ids) instead of failing."""
    system_prompt: str | None = None
    """System message for records that have none; null: the chat template's default."""

    def __post_init__(self) -> None:
        check_positive("data", self, "min_pixels", "max_pixels", "max_source_pixels")
        check_at_least("data", self, 8, "max_length")
        if None not in (self.min_pixels, self.max_pixels) and self.min_pixels > self.max_pixels:
            raise ConfigError(
                f"Config key 'data.min_pixels' ({self.min_pixels}) is larger than "
                f"'data.max_pixels' ({self.max_pixels})."
            )


@dataclass
class LoraConfig(CoreLoraConfig):
    """LoRA adapters on the language model (never on the vision tower)."""

    KEY = "model.lora"

    alpha: int = 16
    """Adapter scaling numerator (scale = alpha / r)."""
    target_modules: list[str] = field(
        default_factory=lambda: "q_proj k_proj v_proj o_proj gate_proj up_proj down_proj".split()
    )
    """Linear layers of the language model that get adapters (names inside its decoder layers;
    the vision tower's layers of the same names are excluded)."""
    enabled: bool = False
    """Train LoRA adapters instead of the language model's weights (needs ``model.train_llm=true``);
    ``final/`` holds the merged model and the adapter in ``final/adapter``."""


@dataclass
class TinyModelConfig:
    """Size of the ``tiny`` model (random weights; for tests and CPU smoke runs)."""

    hidden_size: int = 64
    """Language model hidden size."""
    num_layers: int = 2
    """Language model decoder layers."""
    num_heads: int = 4
    """Attention heads (head size = hidden_size / num_heads, a multiple of 4 for 3D RoPE)."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention)."""
    intermediate_size: int = 128
    """Language model MLP width."""
    vision_depth: int = 2
    """Vision transformer blocks (the last one uses full attention, the others window attention)."""
    vision_hidden_size: int = 32
    """Vision transformer width."""
    vision_heads: int = 2
    """Vision attention heads."""
    vision_intermediate_size: int = 64
    """Vision MLP width."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ConfigError(
                "Config keys 'model.tiny.hidden_size' / 'model.tiny.num_heads': the head size "
                f"must be a whole multiple of 4, got {self.hidden_size} / {self.num_heads}."
            )
        for part, whole in (("num_kv_heads", "num_heads"), ("vision_heads", "vision_hidden_size")):
            if getattr(self, whole) % getattr(self, part):
                raise ConfigError(
                    f"Config key 'model.tiny.{part}' must divide 'model.tiny.{whole}'."
                )


@dataclass
class ModelConfig:
    """Which model, which parts train, and their learning rates."""

    name: str = "tiny"
    """``tiny`` (a small random Qwen2.5-VL with the processor shipped here; offline), a Hub id
    such as ``Qwen/Qwen2.5-VL-3B-Instruct``, or a local ``save_pretrained`` folder."""
    processor: str | None = None
    """Processor folder or Hub id; null: the one of ``model.name``."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel (``flash_attention_2`` needs the flash-attn package and a GPU)."""
    liger_kernel: bool = False
    """Patch Liger Kernel's fused Triton kernels (RMSNorm, RoPE, SwiGLU) into the model (CUDA; the
    ``liger`` extra: ``uv sync --all-packages --extra liger``). The loss stays ``loss``'s."""
    train_vision: bool = False
    """Train the vision tower (patch embedding and vision blocks)."""
    train_merger: bool = True
    """Train the merger (the projector from vision features to the language model)."""
    train_llm: bool = True
    """Train the language model (embeddings, decoder layers, head), or its LoRA adapters when
    ``model.lora.enabled``."""
    lr_vision: float | None = None
    """Learning rate of the vision tower; null: ``optim.lr``."""
    lr_merger: float | None = None
    """Learning rate of the merger; null: ``optim.lr``."""
    lr_llm: float | None = None
    """Learning rate of the language model (or its adapters); null: ``optim.lr``."""
    gradient_checkpointing: bool = False
    """Activation checkpointing of decoder layers and vision blocks (transformers', for single
    device / DDP; ignored under FSDP, where ``fsdp.activation_checkpointing`` applies)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA on the language model."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Size of the ``tiny`` model."""

    def __post_init__(self) -> None:
        if self.lora.enabled and not self.train_llm:
            raise ConfigError(
                "Config key 'model.lora.enabled' is true but 'model.train_llm' is false: LoRA "
                "adapters that do not train do nothing. Set model.train_llm=true (the base "
                "weights stay frozen) or model.lora.enabled=false."
            )
        check_positive("model", self, "lr_vision", "lr_merger", "lr_llm")


@dataclass
class GenerationConfig:
    """Generation during validation, ``evaluate`` and ``infer`` (greedy decoding)."""

    max_new_tokens: int = 16
    """Most tokens generated per answer."""
    in_validation: bool = True
    """Generate answers during validation for the counting metrics; false: loss only (faster)."""

    def __post_init__(self) -> None:
        check_at_least("generation", self, 1, "max_new_tokens")


@dataclass
class QwenVLConfig(TrainConfig):
    """Root config of the qwen_vl task."""

    data: DataConfig = field(default_factory=DataConfig)
    """Data settings."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model settings."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Generation settings."""
    loss: LossConfig = field(default_factory=LossConfig)
    """How the token loss is computed over the vocabulary (chunked by default)."""


if __name__ == "__main__":  # self-check: python -m qwen_vl.config
    from core.config.loader import load_config
    from core.testing.checks import check_config, refused

    check_config(QwenVLConfig, PRESETS_DIR, DEFAULT_PRESET)
    cfg = load_config(QwenVLConfig, overrides=["data.max_pixels=12544", "model.lr_merger=1e-4"])
    assert cfg.data.max_pixels == 12544 and cfg.model.lr_merger == 1e-4
    fsdp1 = ["trainer.strategy=fsdp", "fsdp.use_orig_params=false"]
    refused(lambda: load_config(QwenVLConfig, overrides=fsdp1), "use_orig_params")
    no_llm = ["model.lora.enabled=true", "model.train_llm=false"]
    refused(lambda: load_config(QwenVLConfig, overrides=no_llm), "model.train_llm")
    refused(lambda: load_config(QwenVLConfig, overrides=["model.lora.r=0"]), "'model.lora.r'")
    print("qwen_vl.config: ok")
