"""The summarization task's config: the engine's groups plus ``data``, ``model``, ``generation``,
``metric``; the presets are ``summarization/presets/*.yaml``.

Self-check: ``python -m summarization.config``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from core.config.schema import CheckpointConfig, TrainConfig, check_at_least
from core.errors import ConfigError

PACKAGE_DIR = Path(__file__).parent
PRESETS_DIR = PACKAGE_DIR / "presets"
ASSETS_DIR = PACKAGE_DIR / "assets"
SHIPPED_TOKENIZER = ASSETS_DIR / "tokenizer"
SAMPLES = {"en": ASSETS_DIR / "dialogsum_sample", "ko": ASSETS_DIR / "korean_sample"}
"""The data samples shipped in the package, by ``data.sample``."""
DEFAULT_PRESET = "bart_large_cnn"


@dataclass
class DataConfig:
    """Where the dialogues come from and how they are cut into tokens."""

    train_file: Path | None = None
    """Training JSONL (one object per line: ``fname``, ``dialogue``, ``summary``, ``topic``).
    null: the ``train.jsonl`` of the sample chosen by ``data.sample``."""
    val_file: Path | None = None
    """Validation JSONL (same fields; ``summary1..N`` rows are scored against every reference).
    null: the sample's ``dev.jsonl``."""
    test_file: Path | None = None
    """Test JSONL for ``evaluate --split test`` (rows with ``summary`` or ``summary1..N``).
    null: the sample's ``test.jsonl``."""
    sample: Literal["en", "ko"] = "en"
    """Shipped sample used for the files left null: ``en`` (500/100/50 DialogSum rows, CC BY-NC-SA
    4.0) or ``ko`` (a few Korean dialogues written for this package)."""
    dataset: str | None = None
    """A Hugging Face dataset id (e.g. ``knkarthick/dialogsum``) or a local dataset folder to load
    with ``datasets.load_dataset`` instead of the files; a Hub id needs the Hub or a cached copy
    (``HF_HUB_OFFLINE=1`` to use the cache)."""
    train_split: str = "train"
    """Split of ``data.dataset`` used for training."""
    val_split: str = "validation"
    """Split of ``data.dataset`` used for validation."""
    test_split: str = "test"
    """Split of ``data.dataset`` used by ``evaluate --split test``."""
    max_source_length: int = 512
    """Dialogue tokens kept (longer dialogues are truncated at the end)."""
    max_target_length: int = 128
    """Summary tokens kept for the loss (longer summaries are truncated)."""
    max_train_samples: int | None = None
    """Use only the first N training rows (null: all)."""
    max_val_samples: int | None = None
    """Use only the first N validation rows (null: all); generation makes validation slow."""
    cache_dir: Path | None = None
    """Folder of the tokenised-data cache (null: ``$HF_DATASETS_CACHE/summarization``)."""

    def __post_init__(self) -> None:
        """Range checks; a bad value raises ``ConfigError`` naming the key."""
        check_at_least("data", self, 8, "max_source_length", "max_target_length")
        check_at_least("data", self, 1, "max_train_samples", "max_val_samples")

    def file_for(self, split: Literal["train", "val", "test"]) -> Path:
        """The file of a split: the configured one, or the shipped sample's."""
        configured = getattr(self, f"{split}_file")  # train_file, val_file, test_file
        if configured is not None:
            return Path(configured).expanduser()
        return SAMPLES[self.sample] / f"{'dev' if split == 'val' else split}.jsonl"


@dataclass
class ScratchConfig:
    """Architecture and sizes of a model built with random weights (``model.init=scratch``)."""

    architecture: Literal["bart", "mbart"] = "bart"
    """``bart``: BART's post-norm blocks. ``mbart``: pre-norm blocks and a final LayerNorm per
    stack (mBART's layout), which keeps the encoder's token representations apart when training
    from random weights at a high learning rate, where the post-norm encoder can collapse to one
    vector for every token (see the package README's from-scratch section)."""
    d_model: int = 128
    """Hidden size."""
    encoder_layers: int = 2
    """Encoder blocks."""
    decoder_layers: int = 2
    """Decoder blocks."""
    attention_heads: int = 4
    """Attention heads in every block (encoder and decoder)."""
    ffn_dim: int = 512
    """Inner size of the feed-forward layers."""
    dropout: float = 0.1
    """Dropout on hidden states."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    max_position_embeddings: int = 1024
    """Longest sequence the learned position table covers (must be >= data.max_source_length)."""

    def __post_init__(self) -> None:
        """Range checks; a bad value raises ``ConfigError`` naming the key."""
        if self.d_model % self.attention_heads:
            raise ConfigError(
                f"Config key 'model.scratch.d_model' ({self.d_model}) must be divisible by "
                f"'model.scratch.attention_heads' ({self.attention_heads})."
            )


@dataclass
class ModelConfig:
    """Which seq2seq model, and which parts of it train."""

    name: str = "facebook/bart-large-cnn"
    """Hub id or local folder (``save_pretrained`` output) of any ``AutoModelForSeq2SeqLM`` model.
    Ignored when ``model.init=scratch``."""
    init: Literal["pretrained", "scratch"] = "pretrained"
    """``pretrained``: load ``model.name``. ``scratch``: a new BART with random weights, sized by
    ``model.scratch.*``, with the byte-level BPE tokenizer shipped in the package (no download)."""
    tokenizer: str | None = None
    """Tokenizer (Hub id or folder). null: ``model.name``'s, or the shipped one for ``scratch``."""
    source_prefix: str = ""
    """Text put before every dialogue (``summarize: `` for T5)."""
    scratch: ScratchConfig = field(default_factory=ScratchConfig)
    """Sizes of the from-scratch BART."""
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = None
    """Attention kernel (null: the transformers default, ``sdpa``). On a CPU ``eager`` trains a
    small model faster: PyTorch's CPU flash-attention backward is slow for 64-wide heads (the
    ``small`` preset: 1.2x the steps/s)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (non-reentrant): less memory, ~30% slower."""
    freeze_embeddings: bool = False
    """Freeze the token embeddings (shared by encoder, decoder and, tied, the output layer) and the
    position embeddings."""
    freeze_encoder_layers: int | list[int] = 0
    """Encoder blocks to freeze: a number N, the first N; a list, those indices (0-based)."""
    freeze_decoder_layers: int | list[int] = 0
    """Decoder blocks to freeze: a number N, the first N; a list, those indices (0-based)."""
    freeze_encoder: bool = False
    """Freeze the whole encoder but the embeddings it shares (see ``freeze_embeddings``)."""
    encoder_mlm: float = 0.0
    """Auxiliary masked-language-model objective on the encoder, for training from scratch: this
    fraction of each training dialogue's tokens is replaced by the tokenizer's mask token, and the
    encoder's output at those positions predicts the original tokens through the (tied) output
    layer. The summary is generated from the same masked dialogue, so the encoder runs once.
    0 turns it off; validation, evaluation and prediction never mask. Needs a tokenizer with a mask
    token and a strategy other than FSDP."""
    encoder_mlm_weight: float = 1.0
    """Weight of the masked-LM loss (mean over masked tokens) added to the summary loss (mean)."""
    label_smoothing: float = 0.0
    """Label smoothing of the training summary loss, in [0, 1): each target token keeps ``1 - eps``
    and ``eps`` is spread over the vocabulary (``label_smoothing_factor`` of the Hugging Face
    Trainer). Validation loss is always the plain cross-entropy, comparable between runs."""

    def __post_init__(self) -> None:
        """Range checks; a bad value raises ``ConfigError`` naming the key."""
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(
                f"Config key 'model.label_smoothing' ({self.label_smoothing}) must be in [0, 1); "
                "0.1 is usual."
            )
        if not 0.0 <= self.encoder_mlm < 1.0 or self.encoder_mlm_weight < 0:
            raise ConfigError(
                f"Config key 'model.encoder_mlm' ({self.encoder_mlm}) must be in [0, 1) and "
                f"'model.encoder_mlm_weight' ({self.encoder_mlm_weight}) at least 0."
            )


@dataclass
class GenerationConfig:
    """How summaries are generated (validation, ``evaluate``, ``predict``)."""

    num_beams: int = 4
    """Beam width (1: greedy)."""
    max_new_tokens: int = 80
    """Longest summary in tokens."""
    min_new_tokens: int = 0
    """Shortest summary in tokens (replaces a model's ``min_length``, e.g. bart-large-cnn's 56)."""
    length_penalty: float = 1.0
    """Beam score exponent on length: > 1 favours longer summaries, < 1 shorter ones."""
    no_repeat_ngram_size: int = 3
    """Never repeat an n-gram of this size (0: off)."""
    early_stopping: bool = True
    """Stop beam search when ``num_beams`` finished candidates exist."""

    def __post_init__(self) -> None:
        """Range checks; a bad value raises ``ConfigError`` naming the key."""
        if (
            self.num_beams < 1
            or self.max_new_tokens < 1
            or self.min_new_tokens < 0
            or self.no_repeat_ngram_size < 0
        ):
            raise ConfigError(
                "Config keys 'generation.num_beams' and 'generation.max_new_tokens' must be at "
                "least 1, 'generation.min_new_tokens' and 'generation.no_repeat_ngram_size' at "
                "least 0."
            )
        if self.min_new_tokens > self.max_new_tokens:
            raise ConfigError(
                "Config key 'generation.min_new_tokens' must not exceed "
                "'generation.max_new_tokens'."
            )


@dataclass
class MetricConfig:
    """How ROUGE is computed."""

    tokenizer: Literal["auto", "default", "unicode"] = "auto"
    """ROUGE word tokenizer. ``default``: rouge_score's own (lower-cased ``[a-z0-9]+`` words; it
    deletes Hangul and every other non-ASCII letter, so Korean scores 0). ``unicode``: words of
    letters and digits of any script (keeps Hangul; identical to ``default`` on ASCII text).
    ``auto``: ``unicode`` when the texts contain non-ASCII letters, else ``default``."""
    use_stemmer: bool = True
    """Porter-stem English words longer than 3 letters (rouge_score's ``use_stemmer``)."""
    multi_reference: Literal["mean", "max"] = "mean"
    """Rows with several references (test: ``summary1..3``): ``mean`` averages each ROUGE F1 over
    the references; ``max`` takes the best reference per sample and ROUGE type
    (rouge_score's ``score_multi``)."""


@dataclass
class SummarizationConfig(TrainConfig):
    """Root config of the summarization task."""

    data: DataConfig = field(default_factory=DataConfig)
    """Data files or dataset, and token limits."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model, tokenizer and fine-tuning switches."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Generation settings for validation and evaluation."""
    metric: MetricConfig = field(default_factory=MetricConfig)
    """ROUGE settings."""
    checkpoint: CheckpointConfig = field(
        default_factory=lambda: CheckpointConfig(monitor="val/rougeL", mode="max")
    )
    """Checkpoint retention; the best model by validation ROUGE-L goes to ``final/`` by default."""

    def __post_init__(self) -> None:
        """Range checks; a bad value raises ``ConfigError`` naming the key."""
        refuse_t5_fp16(self)
        if self.model.init == "scratch" and self.model.scratch.max_position_embeddings < max(
            self.data.max_source_length, self.data.max_target_length
        ):
            raise ConfigError(
                "Config key 'model.scratch.max_position_embeddings' "
                f"({self.model.scratch.max_position_embeddings}) is smaller "
                f"than data.max_source_length ({self.data.max_source_length}); raise it or "
                "shorten the inputs."
            )


def model_type_of(name: str) -> str | None:
    """The ``model_type`` of a local model folder (its ``config.json``), else a guess from a Hub
    id's name (``t5`` for ``t5-small``, ``google/flan-t5-base``, ...); None if unknown."""
    folder = Path(name).expanduser()
    config = folder / "config.json"
    if config.is_file():
        try:
            return json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError):
            return None
    if re.search(r"(^|[/_-])(m|um|byt)?t5([_-]|$)", name.lower()):
        return "t5"
    return None


def refuse_t5_fp16(cfg: SummarizationConfig) -> None:
    """Refuse (``ConfigError``) ``trainer.precision`` ``16-mixed`` / ``16-true`` for T5-family
    models: their feed-forward activations exceed float16's 65504 and become inf/NaN."""
    if cfg.model.init != "pretrained" or not str(cfg.trainer.precision).startswith("16"):
        return
    kind = model_type_of(cfg.model.name)
    if kind is not None and "t5" in kind:
        raise ConfigError(
            f"trainer.precision={cfg.trainer.precision} with the T5-family model "
            f"'{cfg.model.name}' ({kind}): T5 overflows in float16 and its loss becomes NaN. Use "
            "trainer.precision=bf16-mixed on a GPU that supports bfloat16 (A100, H100, RTX 30xx "
            "and newer), or trainer.precision=32-true."
        )


if __name__ == "__main__":  # self-check: python -m summarization.config
    from core.config.loader import load_config
    from core.testing.checks import check_config, refused

    check_config(SummarizationConfig, PRESETS_DIR, DEFAULT_PRESET)
    cfg = load_config(SummarizationConfig, "tiny", ["model.freeze_encoder_layers=[0]"], PRESETS_DIR)
    assert cfg.model.freeze_encoder_layers == [0] and cfg.checkpoint.monitor == "val/rougeL"
    assert cfg.data.file_for("train").is_file() and model_type_of("google/flan-t5-base") == "t5"
    assert model_type_of("facebook/bart-base") is None
    t5_fp16 = ["trainer.precision=16-mixed"]
    refused(lambda: load_config(SummarizationConfig, "t5_small", t5_fp16, PRESETS_DIR), "T5")
    print("summarization.config: ok")
