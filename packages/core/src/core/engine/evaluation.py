"""Evaluation on every rank at once: the one path that training's validation and every task's
``evaluate`` command share.

:func:`evaluate` runs ``task.validation_step`` over a sharded, length-sorted loader on every rank,
gathers the per-sample records from all ranks (padded repeats dropped, dataset order restored) and
computes the task's metrics on rank 0. It returns the metrics *and* the records, so a command can
write predictions without the task keeping them.

Lockstep: every rank runs the same number of batches (the sampler pads with repeats), and under
sharded strategies (FSDP2, DeepSpeed stage 3) tasks generate with ``synced_gpus`` (see
``Task.ranks.sharded``), so a rank whose sequences finish early keeps joining the all-gathers of
the others.

:class:`Evaluator` sets a saved model up on the same Fabric as training (strategy, precision,
devices) for the ``evaluate`` commands.

Self-check: ``python -m core.engine.evaluation`` (the toy task, evaluated on 1 process).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.fabric import Fabric
from torch import nn

from core.config.schema import TrainConfig, TrainerConfig
from core.engine.sampler import ShardedBatchSampler, build_dataloader
from core.parallel.collectives import broadcast_object, gather_records
from core.task.base import Ranks, Task

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """What :func:`evaluate` returns (the same on every rank).

    Attributes:
        metrics: the task's metrics (no ``val/`` prefix).
        records: one record per evaluated sample, in dataset order.
    """

    metrics: dict[str, float]
    records: list[dict[str, Any]] = field(default_factory=list)


def eval_dataloader(fabric: Fabric, task: Task, dataset: Any, tc: TrainerConfig) -> Any:
    """A loader for evaluation on every rank: no shuffling, longest samples first when the task
    reports lengths (less padding, faster generation), padded so every rank runs the same number
    of batches.

    Args:
        fabric: the launched Fabric.
        task: gives ``collate`` and ``sample_lengths``.
        dataset: the samples.
        tc: the ``trainer`` group (batch size, workers, seed).
    """
    lengths = task.sample_lengths(dataset) if tc.sort_eval_by_length else None
    sampler = ShardedBatchSampler(
        len(dataset),
        tc.val_batch_size,
        rank=fabric.global_rank,
        world_size=fabric.world_size,
        shuffle=False,
        lengths=lengths,
        sort_by_length=lengths is not None,
    )
    return build_dataloader(
        dataset, sampler, task.collate, tc.num_workers, fabric.device.type == "cuda", tc.seed
    )


def evaluate(
    fabric: Fabric, task: Task, model: nn.Module, loader: Any, limit_batches: int | None = None
) -> EvalResult:
    """Run ``task.validation_step`` over ``loader`` on every rank and compute the metrics.

    Args:
        fabric: the launched Fabric.
        task: the task.
        model: the set-up model.
        loader: from :func:`eval_dataloader`.
        limit_batches: stop after this many batches per rank (the same on every rank).

    Returns:
        :class:`EvalResult`: equal to a single-process run on the same data.
    """
    was_training = model.training
    model.eval()
    records: list[dict[str, Any]] = []
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if limit_batches is not None and i >= limit_batches:
                break
            records.extend(task.validation_step(model, fabric.to_device(batch)))
    model.train(was_training)
    gathered = gather_records(records)
    metrics = task.compute_metrics(gathered) if fabric.global_rank == 0 else None
    return EvalResult(broadcast_object(metrics), gathered)


class Evaluator:
    """A saved model evaluated on the Fabric set-up of training (``trainer.*`` keys: devices,
    strategy, precision, ``eval_batch_size``).

    Usage (every rank runs it; ``fabric.launch`` starts the other processes)::

        evaluator = Evaluator(cfg, task)            # checks the machine, launches
        task.setup_...()                            # data and tokenizer, on every rank
        result = evaluator.run(build_model, dataset)
        if evaluator.is_global_zero: write(result.records)

    Args:
        cfg: the root config.
        task: the task (gets the process facts as ``task.ranks``).
    """

    def __init__(self, cfg: TrainConfig, task: Task) -> None:
        from core.parallel.strategy import build_fabric, is_sharded

        self.cfg = cfg
        self.task = task
        self.fabric = build_fabric(cfg, task.fsdp_wrap_classes, training=False)
        self.fabric.launch()
        task.ranks = Ranks(self.fabric, sharded=is_sharded(self.fabric))

    @property
    def is_global_zero(self) -> bool:
        """True on the process that writes files and prints."""
        return self.fabric.global_rank == 0

    def setup_model(self, module: nn.Module) -> nn.Module:
        """Wrap (and shard) a model for evaluation; ``generate`` goes through the wrapper."""
        model = self.fabric.setup_module(module)
        if hasattr(module, "generate"):
            model.mark_forward_method("generate")
        return model

    def run(self, model: nn.Module, dataset: Any) -> EvalResult:
        """Evaluate a set-up model on ``dataset`` (every rank)."""
        loader = eval_dataloader(self.fabric, self.task, dataset, self.cfg.trainer)
        return evaluate(self.fabric, self.task, model, loader, self.cfg.trainer.limit_val_batches)


if __name__ == "__main__":  # self-check: python -m core.engine.evaluation
    from core.config.loader import load_config
    from core.testing.toy import ToyConfig, ToyTask

    cfg = load_config(ToyConfig, overrides=["trainer.accelerator=cpu", "trainer.devices=1"])
    toy = ToyTask(cfg)
    evaluator = Evaluator(cfg, toy)
    toy.setup()
    with evaluator.fabric.init_module():
        net = toy.configure_model()
    result = evaluator.run(evaluator.setup_model(net), toy.val_dataset())
    assert len(result.records) == cfg.data.num_val and [r["index"] for r in result.records] == list(
        range(cfg.data.num_val)
    )
    print({k: round(v, 4) for k, v in result.metrics.items()})
    print("core.engine.evaluation: ok")
