"""The LoRA / QLoRA task's config: the engine's groups plus ``data``, ``model``, ``lora`` and
``quant``. Defaults are the users' recipe; the presets in ``lora_llm/presets/`` set the engine's.

Self-check: ``python -m lora_llm.config``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from core.config.schema import LoraConfig as CoreLoraConfig
from core.config.schema import LossConfig, TrainConfig, check_at_least
from core.errors import ConfigError

PRESETS_DIR = Path(__file__).parent / "presets"
"""The YAML presets shipped in the package (``PRESETS``: its older name)."""
PRESETS = PRESETS_DIR
DEFAULT_PRESET = "phi2"
"""Preset of ``train`` without ``-c``."""


@dataclass
class DataConfig:
    """Where the instruction / chat records come from and how they become token sequences."""

    train_files: list[str] = field(default_factory=lambda: ["sample:en"])
    """Training data: JSON array or JSONL files of instruction records (``instruction``, ``input``,
    ``output``: Alpaca / KoAlpaca form), chat records (``messages`` with ``role`` / ``content``)
    or pre-tokenized records (``input_ids`` + ``labels``, as ``prepare`` writes them); a Hugging
    Face dataset id or a local dataset folder; or a shipped sample: ``sample:en`` (300 Stanford
    Alpaca records, CC BY-NC 4.0) or ``sample:ko`` (48 Korean records)."""
    val_files: list[str] = field(default_factory=list)
    """Validation data in the same forms; empty: hold out ``val_size`` of the training records."""
    val_size: float = 0.05
    """Held-out share of the training records when ``val_files`` is empty: a fraction below 1, or a
    record count (1 and up); 0 for no validation."""
    hf_split: str = "train"
    """Split to read from a Hugging Face dataset id or local dataset folder."""
    hf_subset: str | None = None
    """Configuration (subset) name of a Hugging Face dataset, if it has several."""
    max_samples: int | None = None
    """Use only the first N records of each training file (after reading; null: all). For smoke
    runs."""
    template: Literal["auto", "alpaca", "alpaca_ko", "chat"] = "auto"
    """How an instruction record becomes a prompt: ``alpaca`` (the Stanford Alpaca prompt),
    ``alpaca_ko`` (the same prompt in Korean, as KoAlpaca uses), ``chat`` (the tokenizer's chat
    template, or a built-in plain one when it has none), ``auto`` (``chat`` when the tokenizer has a
    chat template, else ``alpaca`` / ``alpaca_ko`` by the record's language). Chat records always
    use the chat template."""
    max_length: int = 512
    """Longest token sequence (prompt + response + EOS); longer responses are cut at the end
    (counted and reported), never dropped whole."""
    min_response_tokens: int = 8
    """A record whose prompt leaves fewer response tokens than this within ``max_length`` counts
    as a too-long prompt (see ``long_prompts``)."""
    long_prompts: Literal["error", "skip"] = "error"
    """What to do with a record whose prompt is too long for ``max_length``: ``error`` (exit code 2,
    naming the file and line) or ``skip`` it (counted and reported)."""
    on_bad_record: Literal["error", "skip"] = "error"
    """What to do with a malformed record (missing or non-text fields, empty output): ``error``
    (exit code 2, naming the file and line) or ``skip`` it (counted and reported)."""
    train_on_prompt: bool = False
    """Also train on the prompt tokens (default: only the response and its EOS carry loss)."""
    packing: bool = False
    """Pack several samples into each row of up to ``max_length`` tokens (less padding). Every
    sample keeps its own positions and attends only to itself (see the package README)."""
    padding_free: bool = False
    """Train on each micro-batch as one row without padding: its samples (or packed rows)
    concatenated, ``position_ids`` restarting at 0 for every sample, no attention mask. With
    ``model.attn_implementation=flash_attention_2`` (GPU) transformers hands the sample boundaries
    to flash-attention's variable-length kernel and builds no mask at all; with sdpa / eager it
    builds the block-diagonal mask over the whole micro-batch (correct, but slower than ``packing``
    or ``trainer.group_by_length`` on a CPU: bench 12). Validation stays per sample."""
    seed: int = 1234
    """Seed of the train / validation split (independent of ``trainer.seed``)."""

    def __post_init__(self) -> None:
        """Range checks (``ConfigError`` names the key)."""
        if not self.train_files:
            raise ConfigError(
                "Config key 'data.train_files' is empty: give at least one data file, dataset id "
                "or sample:en."
            )
        check_at_least("data", self, 8, "max_length")
        if not 1 <= self.min_response_tokens < self.max_length:
            raise ConfigError(
                "Config key 'data.min_response_tokens' must be in [1, data.max_length), got "
                f"{self.min_response_tokens}."
            )
        if self.val_size < 0 or (self.val_size >= 1 and not float(self.val_size).is_integer()):
            raise ConfigError(
                "Config key 'data.val_size' must be 0, a fraction below 1, or a whole record "
                f"count; got {self.val_size}."
            )
        check_at_least("data", self, 1, "max_samples")


@dataclass
class TinyModelConfig:
    """The ``tiny`` model: a small Llama built from a config with random weights (offline tests)."""

    hidden_size: int = 64
    """Hidden size."""
    intermediate_size: int = 192
    """MLP inner size (sizes are multiples of 32: bitsandbytes' CPU 4-bit inference kernel needs
    that)."""
    num_layers: int = 2
    """Decoder layers."""
    num_heads: int = 4
    """Attention heads."""
    num_kv_heads: int = 2
    """Key / value heads (grouped-query attention when fewer than ``num_heads``)."""
    max_positions: int = 1024
    """Longest sequence the position embedding (RoPE) is set up for."""
    seed: int = 0
    """Seed of the random weights: every rank and every resumed session builds the same model."""


@dataclass
class ModelConfig:
    """The base causal LM."""

    name: str = "microsoft/phi-2"
    """A Hugging Face Hub id (``gpt2``, ``TinyLlama/TinyLlama-1.1B-Chat-v1.0``,
    ``microsoft/phi-2``), a local folder written by ``save_pretrained``, or ``tiny`` (built from
    ``model.tiny`` with the tokenizer shipped in the package, saved to ``<run>/base``)."""
    tokenizer: str | None = None
    """Tokenizer to use (Hub id or folder); null: the model's own."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the model and tokenizer; null: the default branch."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of the frozen (not quantized) base weights. ``auto``: bfloat16 on GPUs that support it,
    else float16 on GPUs; float32 on the CPU. Adapters are always float32 (FSDP2 shards the 16-bit
    base and the float32 adapters of a block together)."""
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = "sdpa"
    """Attention kernel (null: the transformers default)."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward (non-reentrant, input gradients enabled so a frozen base
    still passes gradients to the adapters): much less memory, about 30% slower."""
    trust_remote_code: bool = False
    """Allow model code from the Hub repository (only for repositories you trust)."""
    liger_kernel: bool = False
    """Patch Liger Kernel's fused Triton kernels (RMSNorm, RoPE, SwiGLU) into the base model
    (Llama, Qwen2, Mistral, Gemma, Phi-3 ...; not GPT-2 or Phi-2). CUDA only; needs the ``liger``
    extra (``uv sync --all-packages --extra liger``). The loss stays ``loss.chunked``'s."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Shape of the ``tiny`` model."""


@dataclass
class LoraConfig(CoreLoraConfig):
    """The LoRA adapter (peft ``LoraConfig``; the shared fields are core's)."""

    TARGETS_EXAMPLE = "[q_proj, v_proj] or [all-linear]"

    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    """Module names (or name suffixes such as ``attn.c_attn``) that get adapters; ``[all-linear]``
    adapts every linear layer except the output head."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases train along with the adapters."""


@dataclass
class QuantConfig:
    """Loading the frozen base in 4 or 8 bits with bitsandbytes (QLoRA)."""

    bits: Literal[4, 8] | None = 4
    """4 (NF4 / FP4), 8 (LLM.int8) or null (no quantization: plain LoRA on a 16/32-bit base)."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type; NF4 is the QLoRA paper's choice for normally distributed weights."""
    double_quant: bool = True
    """Quantize the quantization constants too (about 0.4 bits per parameter less)."""
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """dtype the 4-bit weights are dequantized to for matmuls. ``auto``: bfloat16 on GPUs that
    support it, else float16 on GPUs, float32 on the CPU."""
    skip_modules: list[str] = field(default_factory=list)
    """Module names left unquantized besides the output head (e.g. ``[dense]``)."""


@dataclass
class LoraLLMConfig(TrainConfig):
    """Root config of the ``lora_llm`` task."""

    data: DataConfig = field(default_factory=DataConfig)
    """Data files, prompt template, lengths, packing."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """The adapter."""
    quant: QuantConfig = field(default_factory=QuantConfig)
    """Quantization of the frozen base."""
    loss: LossConfig = field(default_factory=LossConfig)
    """How the token loss is computed over the vocabulary (chunked by default)."""

    def __post_init__(self) -> None:
        """Refuse a quantized base with FSDP or 16-bit-true precision."""
        if self.quant.bits is not None and self.trainer.strategy == "fsdp":
            raise ConfigError(
                "QLoRA (quant.bits=4/8) cannot be sharded with FSDP: bitsandbytes' packed 4/8-bit "
                "weights are not DTensors that FSDP2 can shard. Use trainer.strategy=ddp for QLoRA "
                "on several GPUs (only the adapters are synchronised), or quant.bits=null for LoRA "
                "with FSDP."
            )
        if self.quant.bits is not None and self.trainer.precision in ("bf16-true", "16-true"):
            raise ConfigError(
                f"trainer.precision={self.trainer.precision} casts every weight, which "
                "bitsandbytes forbids for a quantized base: use bf16-mixed (GPU), 16-mixed (GPU) "
                "or 32-true, or quant.bits=null."
            )


# The older class names (code written before the *Config naming).
LoraSettings = LoraConfig

if __name__ == "__main__":  # self-check: python -m lora_llm.config
    from core.config.loader import load_config
    from core.testing.checks import check_config, refused

    check_config(LoraLLMConfig, PRESETS_DIR, DEFAULT_PRESET)
    cfg = load_config(
        LoraLLMConfig, overrides=["lora.r=16", "quant.bits=null", "data.train_files=[a.jsonl]"]
    )
    assert cfg.lora.r == 16 and cfg.quant.bits is None and cfg.data.train_files == ["a.jsonl"]
    refused(lambda: load_config(LoraLLMConfig, overrides=["trainer.strategy=fsdp"]), "FSDP")
    refused(lambda: load_config(LoraLLMConfig, overrides=["lora.r=0"]), "'lora.r'")
    print("lora_llm.config: ok")
