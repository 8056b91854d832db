"""The contract between a task package and the engine.

A task (summarization, LoRA, Qwen-VL, or the tiny task of the tests) subclasses :class:`Task`
and fills in data, model, loss and metrics; the :class:`core.engine.trainer.Trainer` does everything
else (devices, precision, accumulation, validation scheduling, checkpoints, resume, logging).

Batches are dicts of tensors. Every sample of a *validation* batch carries its dataset index
under ``"index"`` (shape ``(batch,)``) so that results gathered from several ranks can be
de-duplicated and ordered exactly as on one process.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torch import nn
from torch.utils.data import Dataset

from core.config.schema import TrainConfig
from core.nn.optim import parameter_groups

ConfigT = TypeVar("ConfigT", bound=TrainConfig)
"""The root config class of a task (``Task[SummarizationConfig]`` types ``task.cfg``)."""

IGNORE_INDEX = -100
"""Label value that the loss ignores (padding, prompt tokens, vision tokens)."""


@dataclass
class StepOutput:
    """The loss of one micro-batch, as a *sum* so the engine can normalise it correctly.

    Attributes:
        loss_sum: scalar tensor, sum of the per-token (or per-sample) losses of the micro-batch.
        num_tokens: how many tokens (or samples) ``loss_sum`` adds up; scalar tensor or int.
    """

    loss_sum: torch.Tensor
    num_tokens: torch.Tensor | int


def token_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, shift: bool, label_smoothing: float = 0.0
) -> StepOutput:
    """Summed cross-entropy over the labelled tokens, computed in float32.

    Args:
        logits: ``(batch, seq, vocab)`` model outputs.
        labels: ``(batch, seq)`` target ids, ``IGNORE_INDEX`` where no loss is taken.
        shift: True for causal LMs (token ``t`` predicts label ``t+1``); False for seq2seq
            decoders, whose labels are already aligned with the logits.
        label_smoothing: ``eps`` in [0, 1): each token's target is ``1 - eps`` on the label plus
            ``eps`` spread evenly over the vocabulary (PyTorch's ``cross_entropy`` definition).

    Returns:
        :class:`StepOutput` with the loss sum and the number of labelled tokens.
    """
    if shift:
        logits = logits[:, :-1, :]
        labels = labels[:, 1:]
    labels = labels.to(logits.device)
    loss_sum = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
        label_smoothing=label_smoothing,
    )
    return StepOutput(loss_sum=loss_sum, num_tokens=(labels != IGNORE_INDEX).sum())


def per_sample_loss(
    logits: torch.Tensor, labels: torch.Tensor, shift: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample summed cross-entropy and label counts (for validation records).

    Args:
        logits: ``(batch, seq, vocab)``.
        labels: ``(batch, seq)`` with ``IGNORE_INDEX`` where no loss is taken.
        shift: as in :func:`token_loss_sum`.

    Returns:
        ``(loss_sums, counts)``, both ``(batch,)`` float32 / int64 tensors.
    """
    if shift:
        logits = logits[:, :-1, :]
        labels = labels[:, 1:]
    labels = labels.to(logits.device)
    losses = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2).float(), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )  # (batch, seq)
    return losses.sum(dim=1), (labels != IGNORE_INDEX).sum(dim=1)


def chunked_token_loss_sum(
    model: nn.Module,
    forward: Callable[[], Any],
    labels: torch.Tensor,
    shift: bool,
    chunk_tokens: int,
) -> StepOutput:
    """:func:`token_loss_sum` without the ``(batch, seq, vocab)`` logits: the model's own head
    computes the summed cross-entropy in chunks of ``chunk_tokens`` labelled tokens during the
    forward call (``core.nn.loss``; the config switch is ``loss.chunked``).

    Args:
        model: the (wrapped) causal LM whose output head is an ``nn.Linear`` or any module
            mapping ``(..., hidden)`` to ``(..., vocab)``.
        forward: runs the model once on the batch (e.g. ``lambda: model(input_ids=...)``); the
            head sees ``(batch, K, hidden)`` and ``labels`` must have shape ``(batch, K)``.
        labels: ``(batch, K)`` target ids, ``IGNORE_INDEX`` where no loss is taken.
        shift: True when position ``t`` predicts ``labels[:, t+1]`` (causal LM over the whole
            sequence); False when ``labels`` are already aligned with the head's positions.
        chunk_tokens: labelled tokens per chunk.

    Returns:
        :class:`StepOutput` with the float32 loss sum and the number of labelled tokens.
    """
    from core.nn.loss import head_loss, shift_targets

    targets = shift_targets(labels) if shift else labels
    with head_loss(model, targets, chunk_tokens, reduction="sum"):
        loss_sum = forward().logits  # the head returned the loss (a float32 scalar)
    return StepOutput(loss_sum=loss_sum, num_tokens=(targets != IGNORE_INDEX).sum())


def chunked_per_sample_loss(
    model: nn.Module,
    forward: Callable[[], Any],
    labels: torch.Tensor,
    shift: bool,
    chunk_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`per_sample_loss` without the full logits (see :func:`chunked_token_loss_sum`).

    Returns:
        ``(loss_sums, counts)``, both ``(batch,)`` float32 / int64 tensors.
    """
    from core.nn.loss import head_loss, shift_targets

    targets = shift_targets(labels) if shift else labels
    with head_loss(model, targets, chunk_tokens, reduction="none"):
        losses = forward().logits  # (batch, K) per-token losses, 0 where ignored
    return losses.sum(dim=1), (targets != IGNORE_INDEX).sum(dim=1)


class Ranks:
    """What a task may know and do about the processes it runs in, given by the engine (the
    Trainer or an ``Evaluator``) after launch; without one, a single process.

    Args:
        fabric: the launched Fabric, or None for a single process.
        sharded: parameters are sharded across ranks (FSDP2, DeepSpeed stage 3): ``generate``
            must run in lockstep on every rank (``synced_gpus=True``).
    """

    def __init__(self, fabric: Any = None, sharded: bool = False) -> None:
        self.fabric = fabric
        self.sharded = sharded

    @property
    def global_rank(self) -> int:
        """This process's rank over all nodes (0 without a Fabric)."""
        return self.fabric.global_rank if self.fabric is not None else 0

    @property
    def world_size(self) -> int:
        """Processes over all nodes."""
        return self.fabric.world_size if self.fabric is not None else 1

    @property
    def device(self) -> torch.device:
        """Where this rank computes (``cuda:N`` or ``cpu``); the models a task builds may start on
        the CPU (FSDP2 moves each rank's shards here)."""
        if self.fabric is not None:
            return self.fabric.device
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

    @property
    def is_global_zero(self) -> bool:
        """True on the one process that writes shared files."""
        return self.global_rank == 0

    def barrier(self) -> None:
        """Wait until every rank reaches this point."""
        if self.fabric is not None:
            self.fabric.barrier()

    @contextlib.contextmanager
    def rank_zero_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. writes a file), the others after it finished."""
        if self.fabric is None:
            yield
            return
        with self.fabric.rank_zero_first():
            yield


@dataclass
class EvaluationRun:
    """Facts of one ``evaluate`` run that its scores name (:meth:`Task.evaluation_scores`).

    Attributes:
        model: ``--model``.
        data: ``--data``, or None for a split of the config's data.
        split: the split (the default one when ``--data`` is given).
        world_size: processes that evaluated.
        records_path: where the records go, or None.
        samples: records evaluated.
    """

    model: Path
    data: Path | None
    split: str
    world_size: int
    records_path: Path | None
    samples: int


class Task(ABC, Generic[ConfigT]):
    """What a task package provides to the Trainer.

    Call order on every rank: ``setup`` -> ``train_dataset`` / ``val_dataset`` ->
    ``configure_model`` -> (``training_step`` per micro-batch, ``validation_step`` per batch,
    ``compute_metrics`` on rank 0) -> ``save_final`` on rank 0.

    The defaults below are what the task packages share: a package sets ``train_data`` /
    ``val_data`` / ``collator`` / ``files`` in :meth:`setup_data` and :meth:`setup_model_side`,
    computes its loss through :meth:`loss_sum` / :meth:`sample_loss_sums` (plain or chunked, as
    the config's ``loss`` group says) and adds generated text in :meth:`add_predictions`.

    Args:
        cfg: the task's root config (a :class:`core.config.schema.TrainConfig` subclass).
    """

    #: Short name used in logs and the manifest.
    name: str = "task"
    # : True for causal LMs: the loss of token ``t`` predicts label ``t+1``, so the first label
    # never counts.
    shift_labels: bool = False

    def __init__(self, cfg: ConfigT) -> None:
        self.cfg: ConfigT = cfg
        #: The run folder; set by the Trainer once it exists (before ``configure_model``).
        self.run_dir: Path | None = None
        #: Rank, world size, barrier and rank-zero-first; set by the engine after launch.
        self.ranks = Ranks()
        #: Local data files read, in order (:meth:`data_files`).
        self.files: list[Path] = []
        #: The training and validation samples (:meth:`train_dataset`, :meth:`val_dataset`).
        self.train_data: Dataset | None = None
        self.val_data: Dataset | None = None

    # -- data ----------------------------------------------------------------------------------

    def setup(self) -> None:
        """Read and validate the data, build the tokenizer. Raise ``UserError`` for bad input.

        Runs before the run folder exists, so bad input leaves no half-made run behind. Default:
        :meth:`setup_model_side`, then :meth:`setup_data`.
        """
        self.setup_model_side()
        self.setup_data()

    def setup_model_side(self, model_dir: Path | None = None) -> None:  # noqa: B027 (optional)
        """What turns samples into batches and outputs into text: tokenizer or processor, model
        config, collator. With ``model_dir`` (``evaluate``, ``predict``): the ones that trained
        model folder was saved with, not the config's. Default: nothing."""

    def setup_data(self) -> None:  # noqa: B027 (an optional hook: the base has nothing to do)
        """Read, check and encode the data into ``train_data`` / ``val_data`` (after
        :meth:`setup_model_side`). Default: nothing."""

    def data_files(self) -> list[Path]:
        """Every local data file the task read (their sha256 goes into the manifest); default:
        ``self.files`` without repeats."""
        return list(dict.fromkeys(self.files))

    def train_dataset(self) -> Dataset:
        """The training samples (``len`` and ``[i]``); default: ``self.train_data``."""
        assert self.train_data is not None, "setup() first"
        return self.train_data

    def val_dataset(self) -> Dataset | None:
        """The validation samples, or None for no validation; default: ``self.val_data``."""
        return self.val_data

    def sample_lengths(self, dataset: Dataset) -> Sequence[int] | None:
        """Per-sample lengths (tokens, as the collator pads them) for length grouping, sorted
        evaluation and the per-epoch padding share in the logs; None if unknown. Default: the
        dataset's ``lengths`` (a list, or a method returning one), if it has them."""
        lengths = getattr(dataset, "lengths", None)
        return lengths() if callable(lengths) else lengths

    def collate(self, samples: list[Any]) -> dict[str, torch.Tensor]:
        """Stack samples into a batch of tensors (dynamic padding here); default:
        ``self.collator(samples)``."""
        return self.collator(samples)

    # -- model ---------------------------------------------------------------------------------

    @abstractmethod
    def configure_model(self) -> nn.Module:
        """Build the model (on the current default device and dtype, set by the Trainer)."""

    def parameter_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Optimizer param groups; default: decay / no-decay split of the trainable parameters."""
        return parameter_groups(model, self.cfg.optim.weight_decay)

    def fsdp_wrap_classes(self) -> set[type[nn.Module]]:
        """Module classes FSDP wraps as units (transformer blocks). Empty: no auto-wrap."""
        return set()

    def flops_per_token(self, model: nn.Module) -> float | None:
        """Training FLOPs per input token (for MFU); default ``6 x parameters`` (forward +
        backward)."""
        return 6.0 * sum(p.numel() for p in model.parameters())

    # -- steps ---------------------------------------------------------------------------------

    def count_loss_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens of a batch that the loss counts (must match ``training_step``'s ``num_tokens``).

        Default: labels that are not ``IGNORE_INDEX``, without the first position when
        :attr:`shift_labels` is set.
        """
        labels = batch["labels"][:, 1:] if self.shift_labels else batch["labels"]
        return int((labels != IGNORE_INDEX).sum())

    def count_input_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Non-padding input tokens of a batch (throughput); default: ``attention_mask`` sum."""
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        return int(batch["input_ids"].numel()) if "input_ids" in batch else 0

    def batch_size_of(self, batch: dict[str, torch.Tensor]) -> int:
        """Samples in a batch."""
        first = next(v for v in batch.values() if isinstance(v, torch.Tensor))
        return int(first.shape[0])

    @abstractmethod
    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        """Forward one micro-batch; return the *summed* loss and its token count."""

    def validation_step(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> list[dict[str, Any]]:
        """Per-sample validation records; each needs ``"index"`` and, by default, ``loss_sum`` /
        ``tokens``.

        The default takes the losses from :meth:`sample_losses`, then lets
        :meth:`add_predictions` add generated text.
        """
        sums, counts = self.sample_losses(model, batch)
        records = [
            {"index": int(i), "loss_sum": float(s), "tokens": int(c)}
            for i, s, c in zip(batch["index"].tolist(), sums.tolist(), counts.tolist())
        ]
        self.add_predictions(model, batch, records)
        return records

    def add_predictions(  # noqa: B027 (an optional hook: the base has nothing to do)
        self, model: nn.Module, batch: dict[str, torch.Tensor], records: list[dict[str, Any]]
    ) -> None:
        """Add what the model generates for ``batch`` (and its references) to its ``records``,
        in place; every rank runs it (``self.ranks.sharded``: generate in lockstep). Default:
        nothing."""

    def loss_sum(
        self,
        model: nn.Module,
        forward: Callable[[], Any],
        labels: torch.Tensor,
        shift: bool,
        label_smoothing: float = 0.0,
    ) -> StepOutput:
        """The summed token loss of one forward: :func:`token_loss_sum` of ``forward()``'s
        logits, or :func:`chunked_token_loss_sum` when the config's ``loss.chunked`` is set.

        Args:
            model: the (wrapped) model that ``forward`` runs.
            forward: runs the model once on the batch and returns its output (``.logits``
                ``(batch, K, vocab)``).
            labels: ``(batch, K)`` targets; ``shift`` as in :func:`token_loss_sum`.
            label_smoothing: as in :func:`token_loss_sum` (plain logits only).
        """
        loss = getattr(self.cfg, "loss", None)
        if loss is not None and loss.chunked:
            return chunked_token_loss_sum(model, forward, labels, shift, loss.chunk_tokens)
        return token_loss_sum(forward().logits, labels, shift, label_smoothing)

    def sample_loss_sums(
        self, model: nn.Module, forward: Callable[[], Any], labels: torch.Tensor, shift: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`loss_sum` per sample: ``(loss_sums, counts)``, both ``(batch,)``."""
        loss = getattr(self.cfg, "loss", None)
        if loss is not None and loss.chunked:
            return chunked_per_sample_loss(model, forward, labels, shift, loss.chunk_tokens)
        return per_sample_loss(forward().logits, labels, shift)

    def check_loss_head(self, model: nn.Module) -> None:
        """With ``loss.chunked``: refuse a model whose output head cannot compute the loss in
        chunks (``core.nn.loss.check_plain_logits``).

        Raises:
            ConfigError: naming ``loss.chunked``.
        """
        loss = getattr(self.cfg, "loss", None)
        if loss is None or not loss.chunked:
            return
        from core.errors import ConfigError
        from core.nn.loss import check_plain_logits

        try:
            check_plain_logits(model.config)
        except ValueError as err:
            raise ConfigError(f"loss.chunked=true: {err}; set loss.chunked=false.") from None

    def sample_losses(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample loss sums and token counts, both ``(batch,)``. Override for validation
        loss."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement sample_losses() or validation_step()"
        )

    def compute_metrics(self, records: list[dict[str, Any]]) -> dict[str, float]:
        """Metrics over all validation records (gathered, de-duplicated, sorted by index).

        Default: ``loss`` = token-weighted mean loss.
        """
        tokens = sum(r["tokens"] for r in records)
        return {"loss": sum(r["loss_sum"] for r in records) / max(tokens, 1)}

    # -- output --------------------------------------------------------------------------------

    def save_final(
        self, model: nn.Module, state_dict: dict[str, torch.Tensor], out_dir: Path
    ) -> None:
        """Write the trained model to ``out_dir`` (rank 0 only), loadable by ``from_pretrained``;
        default: ``save_pretrained`` of the model and of ``self.tokenizer`` if there is one.

        Args:
            model: the unwrapped model.
            state_dict: its full (gathered) state dict on the CPU.
            out_dir: an empty folder.
        """
        if not hasattr(model, "save_pretrained"):
            torch.save(state_dict, out_dir / "model.pt")
            return
        model.save_pretrained(out_dir, state_dict=state_dict)
        if getattr(self, "tokenizer", None) is not None:
            self.tokenizer.save_pretrained(out_dir)

    def manifest_entries(self) -> dict[str, Any]:
        """Task facts for ``manifest.json``: metric implementation and version, tokenizer, model
        source."""
        return {}

    # -- evaluate: a trained model (core.commands.model_io.evaluate_command, in this order)
    # --------------

    def configure_for_model(self, model_dir: Path, overrides: Sequence[str]) -> None:  # noqa: B027
        """Adjust ``self.cfg`` to evaluate the trained model in ``model_dir`` (before Fabric
        starts, cheap: no weights). ``overrides`` are the command's ``key=value``, which win over
        anything the model folder says. Default: nothing."""

    def evaluation_inputs(self, data: Path | None, split: str) -> list[tuple[Path, str]]:
        """``(path, option)`` of the files the evaluation reads besides ``--data`` (no output
        may replace them); raise ``UserError`` when there is nothing to evaluate. Default: none.
        """
        return []

    def load_trained(self, model_dir: Path, options: Any, fabric: Any) -> nn.Module:
        """Load what the trained model in ``model_dir`` was trained with (tokenizer or processor)
        and the model itself, on every rank, not yet set up by Fabric.

        Args:
            model_dir: ``--model``, checked.
            options: the command's parsed arguments (the task's own flags).
            fabric: the launched Fabric (its device, ``init_module``).
        """
        raise NotImplementedError(f"{type(self).__name__} has no evaluate (load_trained)")

    def evaluation_set(self, data: Path | None, split: str, options: Any, report: bool) -> Dataset:
        """The samples to evaluate: the file ``data``, else the config's ``split``.

        Args:
            data: ``--data`` or None.
            split: a split name the task's :class:`core.commands.spec.EvaluateSpec` accepts.
            options: the command's parsed arguments.
            report: whether this rank prints the note on cut inputs.
        """
        raise NotImplementedError(f"{type(self).__name__} has no evaluate (evaluation_set)")

    def evaluation_row(self, record: dict[str, Any]) -> dict[str, Any]:
        """The row ``evaluate`` writes for one record of :meth:`validation_step`. Default: the
        record without its ``index``."""
        return {k: v for k, v in record.items() if k != "index"}

    def evaluation_scores(self, metrics: dict[str, float], run: EvaluationRun) -> dict[str, Any]:
        """The scores ``evaluate`` prints and writes: the metrics and what was evaluated."""
        return {
            **metrics,
            "model": str(run.model),
            "data": str(run.data) if run.data is not None else run.split,
            "world_size": run.world_size,
        }


if __name__ == "__main__":  # self-check: python -m core.task.base
    from types import SimpleNamespace

    class Bigram(Task):
        """The defaults of :class:`Task` on a bigram LM (embedding -> output layer)."""

        shift_labels = True

        def configure_model(self) -> nn.Module:
            return nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 11))

        def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
            forward = lambda: SimpleNamespace(logits=model(batch["input_ids"]))  # noqa: E731
            return self.loss_sum(model, forward, batch["labels"], shift=True)

        def sample_losses(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
            forward = lambda: SimpleNamespace(logits=model(batch["input_ids"]))  # noqa: E731
            return self.sample_loss_sums(model, forward, batch["labels"], shift=True)

    torch.manual_seed(0)
    task = Bigram(TrainConfig())
    model = task.configure_model()
    ids = torch.randint(0, 11, (3, 6))
    batch = {"input_ids": ids, "labels": ids.clone(), "index": torch.arange(3)}
    batch["labels"][:, :2] = IGNORE_INDEX  # a two-token prompt: 4 of 5 shifted labels count
    with torch.no_grad():
        step, records = task.training_step(model, batch), task.validation_step(model, batch)
    assert int(step.num_tokens) == task.count_loss_tokens(batch) == 12
    assert [(r["index"], r["tokens"]) for r in records] == [(0, 4), (1, 4), (2, 4)]
    loss = task.compute_metrics(records)["loss"]
    assert abs(loss - step.loss_sum.item() / 12) < 1e-5, loss
    task.check_loss_head(model)  # no ``loss`` group in TrainConfig: nothing to check
    print(f"loss {loss:.4f} over {len(records)} records; data files {task.data_files()}")
    print("core.task.base: ok")
