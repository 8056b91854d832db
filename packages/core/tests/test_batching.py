"""Length grouping's mega-batch size (``trainer.group_chunk_batches``): config, sampler, trainer.

Which size to use is measured in ``bench/batching.py``, never asserted here.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from core.config.loader import load_config
from core.config.schema import TrainConfig
from core.engine.sampler import GROUP_CHUNK_BATCHES, ShardedBatchSampler
from core.engine.trainer import Trainer
from core.errors import ConfigError
from core.testing.toy import ToyConfig, ToyTask

LENGTHS = [random.Random(i).randint(1, 200) for i in range(1000)]


def padding_share(batches: list[list[int]]) -> float:
    """Share of padded positions when every batch is padded to its longest sample."""
    real = sum(LENGTHS[i] for b in batches for i in b)
    padded = sum(max(LENGTHS[i] for i in b) * len(b) for b in batches)
    return 1.0 - real / padded


def grouped(chunk: int, world_size: int = 1, rank: int = 0, batch: int = 8) -> ShardedBatchSampler:
    """A grouped sampler over ``LENGTHS`` with mega-batches of ``chunk`` global batches."""
    return ShardedBatchSampler(
        len(LENGTHS),
        batch,
        rank=rank,
        world_size=world_size,
        seed=5,
        lengths=LENGTHS,
        group_by_length=True,
        group_chunk_batches=chunk,
    )


def test_config_key_defaults_to_the_sampler_default_and_rejects_zero():
    assert load_config(TrainConfig).trainer.group_chunk_batches == GROUP_CHUNK_BATCHES == 64
    cfg = load_config(TrainConfig, overrides=["trainer.group_chunk_batches=8"])
    assert cfg.trainer.group_chunk_batches == 8
    with pytest.raises(ConfigError, match="trainer.group_chunk_batches"):
        load_config(TrainConfig, overrides=["trainer.group_chunk_batches=0"])
    with pytest.raises(ValueError, match="group_chunk_batches"):
        grouped(0)


def test_every_chunk_size_covers_the_epoch_once_and_larger_chunks_pad_less():
    shares = []
    for chunk in (1, 2, 8, 64, 1000):
        batches = grouped(chunk).global_batches(0)
        assert sorted(i for b in batches for i in b) == list(range(len(LENGTHS)))
        shares.append(padding_share(batches))
    assert shares == sorted(shares, reverse=True) and shares[0] > 2 * shares[-2]


def test_chunk_of_one_keeps_the_random_batches_only_their_order_changes():
    random_batches = ShardedBatchSampler(len(LENGTHS), 8, seed=5).global_batches(0)
    one = grouped(1).global_batches(0)
    assert {frozenset(b) for b in one} == {frozenset(b) for b in random_batches}


def test_two_ranks_see_the_global_batches_of_one_and_resume_by_index():
    one = grouped(4, batch=8)
    two = [grouped(4, world_size=2, rank=r, batch=4) for r in range(2)]
    for a, b, c in zip(one, *two, strict=True):
        assert a == b + c
    full = list(two[1])
    two[1].set_epoch(0, start_batch=7)
    assert list(two[1]) == full[7:]


@pytest.mark.trains
def test_trainer_passes_the_key_to_its_sampler(tmp_path: Path):
    cfg = load_config(
        ToyConfig,
        overrides=[
            f"run.root={tmp_path}",
            "trainer.accelerator=cpu",
            "logger.progress_bar=false",
            "trainer.max_steps=2",
            "trainer.group_by_length=true",
            "trainer.group_chunk_batches=2",
        ],
    )
    trainer = Trainer(cfg, ToyTask(cfg), argv=["pytest"])
    trainer.fit()
    assert trainer.train_sampler.group_by_length
    assert trainer.train_sampler.group_chunk_batches == 2
