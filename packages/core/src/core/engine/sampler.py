"""Deterministic, resumable, sharded batching.

:class:`ShardedBatchSampler` decides, for every epoch, the *global* batches (``batch_size x
world_size`` samples each) from the seed and the epoch number alone, and gives each rank its
contiguous slice of every global batch. Consequences the engine relies on:

- **Exact resume**: the data position is just ``(epoch, batch)``; resuming skips batches by
  index without loading them.
- **1 vs N processes**: N ranks with batch ``b`` see, step by step, the same samples as one
  process with batch ``N*b``.
- **Equal batch counts on every rank** (DDP / FSDP collectives never wait on a rank that ran out):
  the index list is padded with repeats to a multiple of the world size, like
  ``DistributedSampler``. Evaluation drops those repeats again by sample index
  (:func:`core.parallel.collectives.gather_records`).
- **Less padding**: ``group_by_length`` sorts samples by length inside large seeded chunks, and
  ``sort_by_length`` sorts the whole set (evaluation / generation).

Self-check: ``python -m core.engine.sampler``.
"""

from __future__ import annotations

import random
import signal
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

# Default chunk size of length grouping, in global batches (``trainer.group_chunk_batches``): big
# enough to group well, small enough to keep the order random.
GROUP_CHUNK_BATCHES = 64


class ShardedBatchSampler(Sampler[list[int]]):
    """Yields this rank's batches (lists of dataset indices) for one epoch.

    Args:
        num_samples: dataset size.
        batch_size: samples per rank per batch.
        rank: this process's global rank.
        world_size: number of processes.
        shuffle: seeded random order per epoch.
        seed: base seed; epoch ``e`` uses ``seed + e``.
        lengths: per-sample lengths, needed by ``group_by_length`` / ``sort_by_length``.
        group_by_length: group similar lengths within chunks (training).
        sort_by_length: longest first over the whole set (evaluation).
        limit_samples: use only the first N samples (``debug.overfit_batches``).
        group_chunk_batches: with ``group_by_length``, global batches per sorted chunk (at least
            1; 1 keeps the random batches of ``shuffle``, only their order changes).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        lengths: Sequence[int] | None = None,
        group_by_length: bool = False,
        sort_by_length: bool = False,
        limit_samples: int | None = None,
        group_chunk_batches: int = GROUP_CHUNK_BATCHES,
    ) -> None:
        if (group_by_length or sort_by_length) and lengths is None:
            raise ValueError("group_by_length / sort_by_length need per-sample lengths")
        if group_chunk_batches < 1:
            raise ValueError(f"group_chunk_batches must be at least 1, got {group_chunk_batches}")
        if lengths is not None and len(lengths) != num_samples:
            raise ValueError(f"got {len(lengths)} lengths for {num_samples} samples")
        self.num_samples = min(num_samples, limit_samples) if limit_samples else num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.lengths = np.asarray(lengths[: self.num_samples]) if lengths is not None else None
        self.group_by_length = group_by_length
        self.group_chunk_batches = group_chunk_batches
        self.sort_by_length = sort_by_length
        self.epoch = 0
        self.start_batch = 0

    # -- order -------------------------------------------------------------------------------

    def global_batches(self, epoch: int) -> list[list[int]]:
        """All global batches of an epoch (each ``<= batch_size * world_size`` indices).

        Returns:
            A list of index lists; the last one is padded so its size divides by ``world_size``.
        """
        n = self.num_samples
        if n == 0:
            return []
        rng = np.random.default_rng(self.seed + epoch)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        global_size = self.batch_size * self.world_size
        if self.sort_by_length:
            # Stable sort, longest first: generation time is set by the longest sample of a batch.
            order = np.array(sorted(order.tolist(), key=lambda i: -int(self.lengths[i])))
        elif self.group_by_length:
            chunk = global_size * self.group_chunk_batches
            pieces = [order[i : i + chunk] for i in range(0, n, chunk)]
            order = np.concatenate([p[np.argsort(-self.lengths[p], kind="stable")] for p in pieces])
        # Pad with repeats so every rank gets the same number of samples.
        remainder = len(order) % self.world_size
        if remainder:
            pad = self.world_size - remainder
            order = np.concatenate([order, np.resize(order, pad)])
        batches = [order[i : i + global_size].tolist() for i in range(0, len(order), global_size)]
        if self.group_by_length and self.shuffle and len(batches) > 1:
            # Shuffle whole global batches so long ones do not all come first; the last (short,
            # padded) batch stays last so every rank's share is never empty.
            head = batches[:-1] if len(batches[-1]) < global_size else batches
            tail = batches[len(head) :]
            perm = rng.permutation(len(head))
            batches = [head[i] for i in perm] + tail
        return batches

    def rank_batch(self, global_batch: list[int]) -> list[int]:
        """This rank's contiguous share of a global batch."""
        per_rank = len(global_batch) // self.world_size
        return global_batch[self.rank * per_rank : (self.rank + 1) * per_rank]

    def num_batches(self, epoch: int | None = None) -> int:
        """Number of batches per rank in an epoch."""
        total = self.num_samples + (-self.num_samples) % self.world_size
        global_size = self.batch_size * self.world_size
        return (total + global_size - 1) // global_size

    # -- Sampler protocol ----------------------------------------------------------------------

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch to iterate and the batch to start at (to resume mid-epoch)."""
        self.epoch = epoch
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches(self.epoch)[self.start_batch :]:
            yield self.rank_batch(batch)

    def __len__(self) -> int:
        return max(0, self.num_batches() - self.start_batch)


def worker_init(worker_id: int) -> None:
    """Data-loader worker set-up: seed Python and NumPy from torch's per-worker seed and ignore
    SIGTERM / SIGUSR1 so that a preemption signal reaches only the trainer, which checkpoints and
    stops the workers itself."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    for sig in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)):
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)


def build_dataloader(
    dataset: Dataset,
    sampler: ShardedBatchSampler,
    collate_fn: Callable[[list[Any]], Any],
    num_workers: int = 0,
    pin_memory: bool = False,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader over ``dataset`` with a batch sampler, seeded without touching the global RNG.

    The explicit ``generator`` matters for exact resume: without it, every new iterator draws its
    worker base seed from torch's *global* RNG, so a resumed run (which builds its iterator at a
    different moment) would get different dropout masks than an uninterrupted one.

    Returns:
        The DataLoader (batches are not moved to a device here).
    """
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=worker_init if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )


if __name__ == "__main__":  # self-check: python -m core.engine.sampler
    lengths = [random.Random(i).randint(1, 100) for i in range(103)]
    one = ShardedBatchSampler(103, 8, shuffle=True, seed=3, lengths=lengths, group_by_length=True)
    two = [
        ShardedBatchSampler(
            103,
            4,
            rank=r,
            world_size=2,
            shuffle=True,
            seed=3,
            lengths=lengths,
            group_by_length=True,
        )
        for r in range(2)
    ]
    # Same global batches for 1 x 8 and 2 x 4 (before padding); every rank gets equally many
    # batches.
    assert [sorted(b) for b in one] != []
    assert len(list(two[0])) == len(list(two[1])) == two[0].num_batches()
    seen = sorted(i for s in two for b in s for i in b)
    assert set(seen) == set(range(103)) and len(seen) == 104, "one repeat pads 103 to 104"
    # Resume mid-epoch: start_batch skips exactly the consumed batches.
    full = list(one)
    one.set_epoch(0, start_batch=5)
    assert list(one) == full[5:]
    print(f"{one.num_batches()} batches/epoch; 2-rank shards equal; resume skips by index")
    print("core.engine.sampler: ok")
