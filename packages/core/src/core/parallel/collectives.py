"""Collecting Python objects from every rank.

``fabric.all_gather`` gathers tensors of equal shape; per-rank results of evaluation (generated
strings, per-sample losses) have different lengths, and gloo crashes on uneven tensors. These
helpers pickle Python objects instead (``torch.distributed.all_gather_object``), which works on
gloo (CPU) and NCCL alike.

Self-check: ``python -m core.parallel.collectives``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch.distributed as dist


def is_distributed() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_objects(obj: Any) -> list[Any]:
    """Gather one picklable object from every rank, on every rank.

    Args:
        obj: this rank's object.

    Returns:
        ``[object of rank 0, object of rank 1, ...]`` (just ``[obj]`` without a process group).
    """
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s object, on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_records(
    records: Iterable[Mapping[str, Any]], key: str = "index"
) -> list[dict[str, Any]]:
    """Gather per-sample records from all ranks and drop the repeats a padded sampler added.

    Args:
        records: this rank's records; each has a unique sample id under ``key``.
        key: the id field.

    Returns:
        One record per distinct id over all ranks, sorted by id, on every rank — the same list a
        single process would produce.
    """
    merged: dict[Any, dict[str, Any]] = {}
    for part in gather_objects([dict(r) for r in records]):
        for record in part:
            merged.setdefault(record[key], record)  # a padded repeat is identical; keep the first
    return [merged[k] for k in sorted(merged)]


if __name__ == "__main__":  # self-check: python -m core.parallel.collectives
    rows = [{"index": 2, "text": "b"}, {"index": 0, "text": "a"}, {"index": 2, "text": "b"}]
    assert gather_records(rows) == [{"index": 0, "text": "a"}, {"index": 2, "text": "b"}]
    print("without a process group: gather_records sorts and de-duplicates")
    print("core.parallel.collectives: ok")
