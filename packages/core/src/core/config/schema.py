"""The engine's config groups: ``run``, ``trainer``, ``optim``, ``checkpoint``, ``fsdp``,
``logger``, ``debug``.

A task package defines its root config by subclassing :class:`TrainConfig` and adding its own
groups (``data``, ``model``, ...). Every field has a docstring; ``train --help`` prints them.
Range checks live in ``__post_init__`` so a bad value fails when the config is built, with the
key in the message.

Self-check: ``python -m core.config.schema``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

from core.errors import ConfigError

Precision = Literal[
    "auto", "32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true"
]


def check_at_least(group: str, settings: Any, minimum: float, *names: str) -> None:
    """A range check for a config group's ``__post_init__``: each field in ``names`` is at least
    ``minimum`` (or null, where its type allows None).

    Raises:
        ConfigError: ``Config key '<group>.<name>' must be at least <minimum>[ or null], got <v>.``
    """
    _check(group, settings, names, lambda v: v >= minimum, f"at least {minimum}")


def check_positive(group: str, settings: Any, *names: str) -> None:
    """Like :func:`check_at_least`: each field in ``names`` is above 0 (or null, where its type
    allows None); the message says ``must be positive[ or null]``."""
    _check(group, settings, names, lambda v: v > 0, "positive")


def _check(group: str, settings: Any, names: tuple[str, ...], ok: Any, rule: str) -> None:
    nullable = {f.name: "None" in str(f.type) for f in fields(settings)}
    for name in names:
        value = getattr(settings, name)
        if value is not None and not ok(value):
            rule += " or null" if nullable[name] else ""
            raise ConfigError(f"Config key '{group}.{name}' must be {rule}, got {value}.")


@dataclass
class RunConfig:
    """Where the run folder goes and what it is called."""

    root: Path = Path("runs")
    """Folder holding every run folder; each run gets ``NNN_YYYYMMDD_HHMMSS[_name]`` inside it."""
    name: str = ""
    """Optional suffix of the run folder name (letters, digits, ``-``, ``_``, ``.``)."""
    dir: Path | None = None
    """Use this run folder instead of a new one (created if missing). ``latest`` picks the newest
    run folder under ``run.root`` (with ``run.name`` if set). With ``trainer.resume=auto`` the run
    continues from that folder's newest checkpoint."""

    def __post_init__(self) -> None:
        bad = [c for c in self.name if not (c.isalnum() or c in "-_.")]
        if bad:
            raise ConfigError(
                f"Config key 'run.name' = {self.name!r} contains {''.join(sorted(set(bad)))!r}; "
                "use letters, digits, '-', '_' or '.' only (it becomes part of a folder name)."
            )


@dataclass
class TrainerConfig:
    """Hardware, precision, loop length, accumulation, validation and checkpoint cadence."""

    accelerator: Literal["auto", "cpu", "cuda", "gpu", "mps"] = "auto"
    """Device type; ``auto`` picks CUDA when available, else the CPU."""
    devices: int | str = "auto"
    """Devices per node: a number, ``auto`` (all visible GPUs, or 1 CPU process), or a list like
    ``0,1``."""
    num_nodes: int = 1
    """Number of nodes (under SLURM: ``$SLURM_NNODES``)."""
    strategy: str = "auto"
    """``auto`` (DDP on several devices), ``ddp``, ``fsdp`` (PyTorch FSDP2, see the ``fsdp``
    group), or a DeepSpeed stage such as ``deepspeed_stage_2`` / ``deepspeed_stage_3`` (CUDA only;
    needs ``core[deepspeed]``)."""
    precision: Precision = "auto"
    """``auto`` = ``bf16-mixed`` on GPUs that support bfloat16, else ``32-true``. Also
    ``bf16-true``,
    ``16-mixed`` (GPU only), ``32-true``."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (null: no step limit)."""
    max_epochs: int | None = None
    """Stop after this many passes over the training data (null: no epoch limit when
    ``max_steps`` is set, else 1 epoch)."""
    max_time: str | None = None
    """Stop after this much training time, ``[DD:]HH:MM:SS`` (counted over resumed sessions too),
    then finish normally: last validation, checkpoint, ``final/``. The learning-rate schedule
    still spans ``max_steps`` / ``max_epochs``."""
    batch_size: int = 8
    """Micro-batch size per device (samples per forward pass)."""
    eval_batch_size: int | None = None
    """Batch size per device for validation and evaluation (null: same as ``batch_size``)."""
    accumulate_grad_batches: int = 1
    """Micro-batches per optimizer step; gradient sync is skipped on all but the last one."""
    loss_normalization: Literal["token", "mean"] = "token"
    """``token``: the loss of an optimizer step is the sum of token losses divided by the number of
    loss tokens in the whole step, over all micro-batches and ranks (accumulation-invariant).
    ``mean``: the average of per-micro-batch mean losses (the classic, length-biased way)."""
    gradient_clip_val: float | None = 1.0
    """Clip the global gradient norm to this value (null: no clipping)."""
    log_every_n_steps: int = 10
    """Write training loss, learning rate and throughput every N optimizer steps."""
    val_every_n_steps: int | None = None
    """Validate every N optimizer steps (null: only at the end)."""
    val_at_start: bool = False
    """Validate before the first step of a fresh run (the untrained model's metrics at step 0)."""
    val_at_end: bool = True
    """Validate once more when training ends."""
    limit_val_batches: int | None = None
    """Use at most this many validation batches per rank (null: all; handy for smoke tests)."""
    ckpt_every_n_steps: int | None = None
    """Save a checkpoint every N optimizer steps (null: at each validation, or only at the end)."""
    seed: int = 42
    """Seed for Python, NumPy, torch (all devices), data order and data-loader workers."""
    deterministic: bool | Literal["warn"] = False
    """Use deterministic algorithms (and the cuDNN / cuBLAS settings they need); ``warn`` only
    warns about non-deterministic ops instead of failing."""
    resume: str | None = "auto"
    """``auto``: continue from the newest complete checkpoint of the run folder if it has one
    (a new run folder has none; a requeued SLURM job or ``run.dir`` reuses one). A path: start
    from that checkpoint. null: never resume (fails if the run folder already has checkpoints)."""
    resume_changed_data: bool = False
    """Resume although a data file changed since the checkpoint was written (its sha256 differs
    from the one the checkpoint recorded). Off: such a resume is refused, naming the file and
    both hashes; a run meant for the new data is better started anew."""
    num_workers: int = 0
    """Data-loader worker processes per rank (0: load in the training process)."""
    group_by_length: bool = False
    """Batch samples of similar length together (less padding); order stays seeded."""
    group_chunk_batches: int = 64
    """With ``group_by_length``: size of the mega-batch that is sorted by length, in global
    batches. Each epoch is cut into seeded random chunks of this many batches; each chunk is sorted
    and cut into batches, whose order is then shuffled. Larger: less padding (DialogSum, batch 16:
    64 -> 1%, 8 -> 7.5%, 1 -> 41%); 1 keeps the random batches. Measured in bench/batching.py."""
    sort_eval_by_length: bool = True
    """Evaluate longest samples first, so each batch holds similar lengths (less padding, faster
    generation); results are put back in dataset order either way."""
    find_unused_parameters: bool = False
    """DDP only: search for parameters without gradients each step (slow; only if really needed)."""
    matmul_precision: Literal["highest", "high", "medium"] = "high"
    """``torch.set_float32_matmul_precision``: ``high`` allows TF32 on Ampere+ GPUs."""
    compile: bool = False
    """``torch.compile`` each of the task's blocks (its transformer layers: the FSDP units) with
    dynamic shapes, before DDP / FSDP2 wraps the model. Only the block's own forward is compiled
    (checkpointing, FSDP2 hooks and the state dict stay as they are); the first batches pay the
    compilation (seconds to minutes), later lengths reuse the dynamic kernels. Needs a C++
    compiler on the CPU (Inductor)."""
    offload_activations: bool = False
    """Move the tensors that the forward pass saves for backward to pinned CPU memory (and back in
    backward), tensors of 1 MiB or more that are not parameters. With activation checkpointing
    (``model.gradient_checkpointing`` or ``fsdp.activation_checkpointing``) these are the inputs of
    the checkpointed blocks, so the activations left on the GPU are one block's. GPU only; pair it
    with ``loss.chunked`` (plain logits would be copied too)."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """What a NaN / inf training loss or gradient norm does, found at the step where it happens
    (every rank agrees). ``stop``: the run stops there before the optimizer touches the weights,
    with a message naming the step, the value and the last good checkpoint (resume from it with a
    lower ``optim.lr``); ``summary.json`` says ``failed`` and no ``final/`` is exported. ``skip``:
    the step's gradients are dropped and the optimizer does not step (the learning-rate schedule
    still advances, so it stays a function of the step number); skipped steps are counted as
    ``train/skipped_steps`` in the metrics and the summary. After 5 skipped steps in a row the run
    stops as with ``stop``: a run that skips every step is not training. Under ``16-mixed`` the
    gradient scaler's own overflow skips are left to it; only a non-finite loss counts there."""
    dist_timeout: float = 1800.0
    """Seconds a rank waits in a collective (all-reduce, barrier) for its peers before it gives up
    (the process-group timeout of ``ddp`` and ``fsdp``). A peer rank that died or hangs makes the
    others stop with a message naming the step within about this time (one that was killed is
    found at once: its connections close). It is also how long the ranks wait for each other to
    start. 1800 (PyTorch's own default) leaves room for a slow start, a slow checkpoint write or a
    long validation on one rank; lower it for small jobs that should fail fast."""

    def __post_init__(self) -> None:
        positive = {
            "trainer.num_nodes": self.num_nodes,
            "trainer.batch_size": self.batch_size,
            "trainer.accumulate_grad_batches": self.accumulate_grad_batches,
            "trainer.log_every_n_steps": self.log_every_n_steps,
            "trainer.group_chunk_batches": self.group_chunk_batches,
        }
        optional_positive = {
            "trainer.max_steps": self.max_steps,
            "trainer.max_epochs": self.max_epochs,
            "trainer.eval_batch_size": self.eval_batch_size,
            "trainer.val_every_n_steps": self.val_every_n_steps,
            "trainer.ckpt_every_n_steps": self.ckpt_every_n_steps,
            "trainer.limit_val_batches": self.limit_val_batches,
        }
        for key, value in {**positive, **optional_positive}.items():
            if value is not None and value < 1:
                raise ConfigError(f"Config key '{key}' must be at least 1, got {value}.")
        if self.gradient_clip_val is not None and self.gradient_clip_val <= 0:
            raise ConfigError(
                "Config key 'trainer.gradient_clip_val' must be positive or null, got "
                f"{self.gradient_clip_val}."
            )
        if self.max_time is not None:
            _ = self.max_seconds  # parses (and rejects) the value now
        if self.dist_timeout <= 0:
            raise ConfigError(
                f"Config key 'trainer.dist_timeout' must be positive (seconds), got "
                f"{self.dist_timeout}."
            )
        if self.num_workers < 0:
            raise ConfigError(
                f"Config key 'trainer.num_workers' must be 0 or more, got {self.num_workers}."
            )

    @property
    def max_seconds(self) -> float | None:
        """``max_time`` in seconds (None: no time limit)."""
        if self.max_time is None:
            return None
        parts = str(self.max_time).split(":")
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            numbers = []
        if not 2 <= len(numbers) <= 4 or any(n < 0 for n in numbers):
            raise ConfigError(
                f"Config key 'trainer.max_time' = {self.max_time!r} is not a duration; write "
                "[DD:]HH:MM:SS, e.g. 00:28:00."
            )
        scale = [1, 60, 3600, 86400]
        return sum(n * scale[i] for i, n in enumerate(reversed(numbers)))

    @property
    def epoch_limit(self) -> int | None:
        """Epochs to train: ``max_epochs``, or 1 when neither limit is set, or None (unlimited)
        when only ``max_steps`` is set."""
        if self.max_epochs is None and self.max_steps is None:
            return 1
        return self.max_epochs

    @property
    def val_batch_size(self) -> int:
        """Batch size used for validation and evaluation."""
        return self.eval_batch_size or self.batch_size


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: Literal[
        "adamw",
        "adamw_fused",
        "sgd",
        "adafactor",
        "adamw_8bit",
        "paged_adamw_8bit",
        "paged_adamw_32bit",
    ] = "adamw"
    """``adamw`` (torch), ``adamw_fused`` (CUDA), ``sgd``, ``adafactor`` (transformers, with a fixed
    learning rate), or a bitsandbytes optimizer: ``adamw_8bit``, ``paged_adamw_8bit``,
    ``paged_adamw_32bit``."""
    lr: float = 3e-4
    """Peak learning rate (reached after warmup)."""
    weight_decay: float = 0.01
    """Decoupled weight decay; never applied to biases and normalisation weights."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas (beta1, beta2)."""
    eps: float = 1e-8
    """Adam epsilon."""
    momentum: float = 0.0
    """SGD momentum."""
    scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    """Learning-rate shape after warmup: ``constant``, ``linear`` decay or ``cosine`` decay."""
    warmup_steps: int = 0
    """Linear warmup over this many optimizer steps (takes precedence over ``warmup_ratio``)."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction of the total optimizer steps (used when ``warmup_steps`` is 0)."""
    min_lr_ratio: float = 0.0
    """Final learning rate of ``linear`` / ``cosine`` decay as a fraction of ``lr``."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"Config key 'optim.lr' must be positive, got {self.lr}.")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(
                f"Config key 'optim.warmup_ratio' must be in [0, 1), got {self.warmup_ratio}."
            )
        if self.warmup_steps < 0:
            raise ConfigError(
                f"Config key 'optim.warmup_steps' must be 0 or more, got {self.warmup_steps}."
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(
                f"Config key 'optim.min_lr_ratio' must be in [0, 1], got {self.min_lr_ratio}."
            )
        if self.weight_decay < 0:
            raise ConfigError(
                f"Config key 'optim.weight_decay' must be 0 or more, got {self.weight_decay}."
            )


@dataclass
class CheckpointConfig:
    """Which checkpoints are kept and which model ends up in ``final/``."""

    keep_last: int = 2
    """Keep the newest N checkpoints (0: none beyond the best ones)."""
    keep_best: int = 1
    """Also keep the N best checkpoints by ``checkpoint.monitor``."""
    monitor: str | None = "val/loss"
    """Metric that ranks checkpoints (a key logged by validation, e.g. ``val/loss`` or
    ``val/rougeL``)."""
    mode: Literal["min", "max"] = "min"
    """Whether a lower (``min``) or higher (``max``) monitored value is better."""
    load_best_at_end: bool = True
    """Export the best checkpoint (not the last) to ``final/`` when a monitored metric exists."""
    trainable_only: bool = False
    """Store only parameters that require gradients (adapters); frozen weights are rebuilt from the
    base."""

    def __post_init__(self) -> None:
        if self.keep_last < 0 or self.keep_best < 0:
            raise ConfigError(
                "Config keys 'checkpoint.keep_last' and 'checkpoint.keep_best' must be 0 or more."
            )
        if self.keep_last == 0 and self.keep_best == 0:
            raise ConfigError(
                "With 'checkpoint.keep_last=0' and 'checkpoint.keep_best=0' no checkpoint would "
                "survive; "
                "keep at least one so the run can resume."
            )


@dataclass
class FSDPConfig:
    """Settings of ``trainer.strategy=fsdp``: PyTorch FSDP2 (``fully_shard``) through Fabric's
    ``ModelParallelStrategy`` (see ``core.parallel.fsdp``); ignored by other strategies."""

    RETIRED: ClassVar[dict[str, str]] = {
        "use_orig_params": "FSDP2 always keeps the original parameters (as DTensor shards), so "
        "frozen parts and "
        "per-part learning rates work without it; delete the key",
        "limit_all_gathers": "FSDP2 frees gathered parameters without the CPU rate limiter FSDP1 "
        "needed; delete the key "
        "(fsdp.prefetch_forward / fsdp.prefetch_backward set how far all-gathers run ahead)",
        "backward_prefetch": "FSDP2 prefetches the next block in backward by itself; "
        "fsdp.prefetch_backward=N sets how "
        "many blocks ahead (1 = the default, 0 = none)",
        "state_dict_type": "FSDP2 checkpoints are always sharded (torch.distributed.checkpoint, "
        "one file per rank) and "
        "final/ is always the gathered full model; delete the key",
    }
    """Keys of the FSDP1 era, with what replaced them (using one is a config error)."""

    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = (
        "FULL_SHARD"
    )
    """``FULL_SHARD``: parameters, gradients and optimizer state sharded over all ranks, each
    block's gathered parameters freed after its forward (``reshard_after_forward=True``).
    ``SHARD_GRAD_OP``: gathered parameters kept from forward to backward (faster, more memory).
    ``HYBRID_SHARD``: full shard inside groups of ``fsdp.shard_size`` ranks (a node), replicated
    across groups (a 2-D device mesh). ``NO_SHARD``: every rank keeps everything (like DDP)."""
    shard_size: int | None = None
    """``HYBRID_SHARD`` only: ranks per shard group (null: the devices of one node); must divide the
    world size."""
    auto_wrap: list[str] = field(default_factory=list)
    """Block classes that become FSDP units: dotted import paths or class names of the task's
    own blocks; empty: the task's choice (its transformer blocks)."""
    activation_checkpointing: bool = False
    """Non-reentrant activation checkpointing of every block, applied before sharding."""
    param_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype the parameters are gathered and computed in. ``auto``: bfloat16 / float16 with
    ``trainer.precision=bf16-mixed`` / ``16-mixed`` (the fp32 master shards stay fp32), else the
    parameters' own dtype."""
    reduce_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of the gradient reduce-scatter. ``auto``: float32 whenever compute runs in 16 bits,
    else the gradients' own dtype."""
    prefetch_forward: int = 0
    """Blocks whose all-gather is issued ahead in forward (0: FSDP2's implicit overlap only)."""
    prefetch_backward: int = 1
    """Blocks whose all-gather is issued ahead in backward (1: FSDP2's default, 0: none)."""
    cpu_offload: bool = False
    """Keep parameter, gradient and optimizer shards in CPU memory; the optimizer steps on the
    CPU (slow; only to fit; GPU only)."""
    sync_module_states: bool = True
    """Broadcast rank 0's weights into every rank's shards after sharding, so all ranks start from
    the same model even if they built it differently."""

    def __post_init__(self) -> None:
        if self.shard_size is not None and self.shard_size < 1:
            raise ConfigError(
                f"Config key 'fsdp.shard_size' must be at least 1 or null, got {self.shard_size}."
            )
        if self.shard_size is not None and self.sharding_strategy != "HYBRID_SHARD":
            raise ConfigError(
                "Config key 'fsdp.shard_size' only applies to fsdp.sharding_strategy=HYBRID_SHARD."
            )
        for key in ("prefetch_forward", "prefetch_backward"):
            if getattr(self, key) < 0:
                raise ConfigError(
                    f"Config key 'fsdp.{key}' must be 0 or more, got {getattr(self, key)}."
                )


@dataclass
class LoggerConfig:
    """Where metrics go besides ``metrics.jsonl`` (which is always written)."""

    wandb: bool = False
    """Log to Weights & Biases too. The API key is read from ``WANDB_API_KEY`` only."""
    wandb_project: str = "finetune"
    """W&B project name."""
    wandb_entity: str | None = None
    """W&B entity (team or user); null: your default."""
    wandb_mode: Literal["online", "offline"] = "online"
    """``offline`` writes to ``<run>/wandb`` without network; sync later with ``wandb sync``."""
    wandb_group: str | None = None
    """W&B group of the run (``wandb.init(group=...)``); ``sweep`` sets it to the sweep folder's
    name so that a sweep's points are grouped together. null: no group."""
    tensorboard: bool = False
    """Write TensorBoard event files to ``<run>/tensorboard`` (needs ``core[tensorboard]``)."""
    csv: bool = True
    """Also write ``metrics.csv`` (one column per key) when the run ends."""
    progress_bar: bool = True
    """A tqdm bar on rank 0; refreshes every 30 s when the output is not a terminal (SLURM logs)."""
    plot: bool = True
    """Write ``curves.png`` (losses and validation metrics over steps) when the run ends."""


@dataclass
class DebugConfig:
    """Switches for looking inside a run."""

    shapes: bool = False
    """Log every module's input and output tensor shapes for the first batch (forward hooks)."""
    overfit_batches: int = 0
    """Train on only the first N batches of data, repeated (0: off); a model that cannot overfit
    them is broken."""
    detect_anomaly: bool = False
    """``torch.autograd.set_detect_anomaly``: find the op that made a NaN (slow)."""

    def __post_init__(self) -> None:
        if self.overfit_batches < 0:
            raise ConfigError(
                f"Config key 'debug.overfit_batches' must be 0 or more, got {self.overfit_batches}."
            )


@dataclass
class LossConfig:
    """How a causal LM's token loss is computed over its vocabulary (the ``loss`` group of the
    tasks with a language-model head: lora_llm, qwen_vl)."""

    chunked: bool = True
    """Compute the cross-entropy inside the model's head call, from the last hidden states, in
    chunks of ``loss.chunk_tokens`` labelled tokens, with the gradients made chunk by chunk
    (``core.nn.loss``): the ``(batch, seq, vocab)`` float32 logits never exist, and unlabelled
    positions (prompt, padding, vision tokens) skip the head. The same loss as the plain path to
    float rounding. Measured at vocabulary 151,936, sequence 2,048, hidden 2,048 (bench 11): the
    loss step's peak memory is 0.14x the plain path's with a frozen head (LoRA) and 0.47x with a
    trained one (its weight gradient alone is 0.33x), at the plain path's step time. false: the
    plain logits (for models whose forward changes the logits after the head, e.g. Gemma-2's
    soft-capping)."""
    chunk_tokens: int = 256
    """Labelled tokens per chunk: the largest transient is ``chunk_tokens x vocab`` float32 values
    (about 3 of them), 156 MB each at 256 tokens and Qwen's 151,936 tokens."""

    def __post_init__(self) -> None:
        if self.chunk_tokens < 1:
            raise ConfigError(
                f"Config key 'loss.chunk_tokens' must be at least 1, got {self.chunk_tokens}."
            )


@dataclass
class LoraConfig:
    """LoRA adapters (peft ``LoraConfig``): the fields every task with adapters shares; a task
    subclasses it for its own defaults and switches (``KEY`` names the group in messages)."""

    KEY: ClassVar[str] = "lora"
    TARGETS_EXAMPLE: ClassVar[str] = "[q_proj, v_proj]"

    r: int = 8
    """Rank of the low-rank update."""
    alpha: float = 16.0
    """Scaling numerator: the update is multiplied by ``alpha / r`` (``alpha / sqrt(r)`` with
    rsLoRA)."""
    dropout: float = 0.05
    """Dropout on the adapter's input."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    """Module names (or name suffixes such as ``attn.c_attn``) that get adapters."""
    use_rslora: bool = False
    """Rank-stabilised scaling ``alpha / sqrt(r)`` (peft's rsLoRA) instead of ``alpha / r``."""
    use_dora: bool = False
    """DoRA (weight-decomposed LoRA, peft): each adapted weight is split into a trained magnitude
    per output feature and a direction that the low-rank update turns. Adds ``out_features``
    trainable values per adapted layer and one more matrix product per forward (the base weight's
    column norms, recomputed from the dequantized weight under QLoRA); merged like LoRA."""

    def __post_init__(self) -> None:
        """Range checks (``ConfigError`` names the key)."""
        check_at_least(self.KEY, self, 1, "r")
        check_positive(self.KEY, self, "alpha")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(
                f"Config key '{self.KEY}.dropout' must be in [0, 1), got {self.dropout}."
            )
        if not self.target_modules:
            raise ConfigError(
                f"Config key '{self.KEY}.target_modules' is empty: name the layers to adapt, "
                f"e.g. {self.TARGETS_EXAMPLE}."
            )


@dataclass
class TrainConfig:
    """The engine's part of every task's root config; task packages subclass it and add groups."""

    run: RunConfig = field(default_factory=RunConfig)
    """Run folder."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Training loop."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint retention."""
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    """FSDP settings."""
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    """Metric loggers."""
    debug: DebugConfig = field(default_factory=DebugConfig)
    """Debugging switches."""


if __name__ == "__main__":  # self-check: python -m core.config.schema
    from core.config.loader import describe_keys, field_docs, iter_keys, load_config

    missing = [key for key, _, doc in iter_keys(TrainConfig) if not doc]
    assert not missing, f"fields without a docstring: {missing}"
    cfg = load_config(TrainConfig, overrides=["trainer.max_steps=5", "optim.lr=1e-4"])
    assert cfg.trainer.max_steps == 5 and cfg.optim.lr == 1e-4
    print(describe_keys(TrainConfig).splitlines()[0])
    print(
        f"{sum(1 for _ in iter_keys(TrainConfig))} keys, all documented; "
        f"{len(field_docs(TrainerConfig))} trainer keys"
    )
    try:
        check_at_least("data", LoraConfig(), 9, "r")
        raise AssertionError("r=8 is below 9")
    except ConfigError as err:
        assert str(err) == "Config key 'data.r' must be at least 9, got 8.", err
    try:
        trainer = TrainerConfig()
        trainer.max_steps = 0  # past TrainerConfig's own check
        check_at_least("trainer", trainer, 1, "max_steps")
        raise AssertionError("max_steps=0 is below 1")
    except ConfigError as err:
        assert "'trainer.max_steps' must be at least 1 or null, got 0." in str(err), err
    print("core.config.schema: ok")
