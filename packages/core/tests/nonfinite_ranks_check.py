"""Run by ``test_faults_steps.py`` in 2 CPU processes (DDP): the loss is NaN on rank 1 only, at
step 3, with ``trainer.on_nonfinite=skip``; the NaN is added to the loss, so by itself it would
not reach any gradient. Both ranks must skip that step (not only the rank that saw it), train on
and end with the same finite weights. Rank 0 prints one
``RESULT {json}`` line.

    python nonfinite_ranks_check.py     # Fabric starts the second process itself
"""

from __future__ import annotations

import json
import math
import tempfile

import torch

from core.config.loader import load_config
from core.engine.trainer import Trainer
from core.task.base import StepOutput
from core.testing.toy import ToyConfig, ToyTask, final_weights


class NaNOnRank1(ToyTask):
    """The toy task whose loss is NaN on rank 1 at its third optimizer step."""

    def training_step(self, model, batch) -> StepOutput:
        self.calls = getattr(self, "calls", 0) + 1
        out = super().training_step(model, batch)
        if self.calls == 3 and self.ranks.global_rank == 1:
            # A NaN that does not reach this rank's gradients by itself (d(f + c)/dp = df/dp):
            # only the engine's own agreement can make rank 0 skip the step too.
            return StepOutput(out.loss_sum + math.nan, out.num_tokens)
        return out


def main() -> None:
    root = tempfile.mkdtemp(prefix="nonfinite_ranks_")
    cfg = load_config(
        ToyConfig,
        overrides=[
            f"run.root={root}",
            "logger.progress_bar=false",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.strategy=ddp",
            "trainer.batch_size=2",
            "trainer.max_steps=5",
            "trainer.log_every_n_steps=1",
            "trainer.on_nonfinite=skip",
        ],
    )
    trainer = Trainer(cfg, NaNOnRank1(cfg))
    result = trainer.fit()
    # Every rank reports how many steps it skipped; rank 0 reports for all.
    skipped = trainer.fabric.all_gather(torch.tensor(trainer.progress.skipped_steps)).tolist()
    if result.global_rank == 0:
        summary = json.loads((result.run_dir / "summary.json").read_text())
        weights = final_weights(result.run_dir)
        print(
            "RESULT "
            + json.dumps(
                {
                    "status": result.status,
                    "skipped_per_rank": skipped,
                    "replicas_equal": len(set(summary["rank_weight_sha256"])) == 1,
                    "finite": all(bool(torch.isfinite(t).all()) for t in weights.values()),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
