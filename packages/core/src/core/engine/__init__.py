"""The training engine: the Fabric loop (``trainer``) and its collaborators, the sharded sampler,
signal handling and evaluation.
"""

from core import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "evaluation": "Evaluator",
        "sampler": "GROUP_CHUNK_BATCHES ShardedBatchSampler",
        "signals": "REPEAT_WINDOW",
        "trainer": "FitResult MAX_SKIPS_IN_A_ROW Trainer build_fabric eval_dataloader evaluate",
    },
)
