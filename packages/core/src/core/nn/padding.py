"""Padding token rows into batches: the one padding loop every task's collator uses
(:func:`pad_rows`, :func:`length_mask`, and :func:`pad_fields` for several fields of dict items).

Masks come from the row *lengths*, never from comparing token ids with the pad id, so a pad id
that equals a real token (EOS used as padding) never hides that token.

Self-check: ``python -m core.nn.padding``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def pad_rows(
    rows: Sequence[Sequence[int] | torch.Tensor],
    value: int,
    width: int | None = None,
    left: bool = False,
) -> torch.Tensor:
    """Stack variable-length rows of ids into one padded tensor.

    Args:
        rows: ``B`` rows of token ids (lists or 1-D tensors).
        value: what padding positions hold (a pad id, or ``-100`` for labels).
        width: the padded length (default: the longest row).
        left: pad on the left (prompts for ``generate``, so every row ends where generation
            starts); default right.

    Returns:
        ``(B, width)`` int64.
    """
    width = max((len(r) for r in rows), default=0) if width is None else width
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        ids = torch.as_tensor(row, dtype=torch.long)
        if left:
            out[i, width - len(ids) :] = ids
        else:
            out[i, : len(ids)] = ids
    return out


def length_mask(
    lengths: Sequence[int], width: int | None = None, left: bool = False
) -> torch.Tensor:
    """The attention mask of rows padded by :func:`pad_rows`.

    Args:
        lengths: ``B`` real lengths.
        width: the padded length (default: the longest).
        left: the rows are left-padded.

    Returns:
        ``(B, width)`` int64: 1 on real tokens, 0 on padding.
    """
    width = max(lengths, default=0) if width is None else width
    positions = torch.arange(width).unsqueeze(0)  # (1, width)
    sizes = torch.as_tensor(list(lengths), dtype=torch.long).unsqueeze(1)  # (B, 1)
    mask = positions >= width - sizes if left else positions < sizes
    return mask.long()


def pad_fields(
    samples: Sequence[dict[str, Any]],
    pads: dict[str, int],
    extra: int = 0,
    left: bool = False,
    prefix: str = "",
) -> dict[str, torch.Tensor]:
    """Pad the named fields of a list of items to one width, with the attention mask.

    Args:
        samples: ``B`` items, each a dict whose fields in ``pads`` are rows of ids of one length.
        pads: field -> padding value, in output order; the first field's lengths make the mask.
        extra: padding positions added beyond the longest row (room for a placeholder).
        left: pad on the left (prompts for ``generate``).
        prefix: put before every output key (``gen_`` for a batch's prompt view).

    Returns:
        ``{prefix + field: (B, width)}`` for every field and ``prefix + "attention_mask"``
        ``(B, width)`` (1 on real tokens), right after the first field; int64.
    """
    first = next(iter(pads))
    lengths = [len(s[first]) for s in samples]
    width = max(lengths, default=0) + extra
    out = {}
    for i, (name, value) in enumerate(pads.items()):
        out[prefix + name] = pad_rows([s[name] for s in samples], value, width, left)
        if i == 0:
            out[prefix + "attention_mask"] = length_mask(lengths, width, left)
    return out


if __name__ == "__main__":  # self-check: python -m core.nn.padding
    rows = [[5, 6, 7], [8]]
    right, left = pad_rows(rows, 0), pad_rows(rows, 0, left=True)
    assert right.tolist() == [[5, 6, 7], [8, 0, 0]] and left.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert length_mask([3, 1]).tolist() == [[1, 1, 1], [1, 0, 0]]
    assert length_mask([3, 1], left=True).tolist() == [[1, 1, 1], [0, 0, 1]]
    items = [{"ids": [5, 6], "types": [1, 1]}, {"ids": [8], "types": [2]}]
    gen = pad_fields(items, {"ids": 0, "types": 0}, extra=1, left=True, prefix="gen_")
    assert list(gen) == ["gen_ids", "gen_attention_mask", "gen_types"]
    assert gen["gen_ids"].tolist() == [[0, 5, 6], [0, 0, 8]]
    assert gen["gen_attention_mask"].tolist() == [[0, 1, 1], [0, 0, 1]]
    print(right.tolist(), left.tolist())
    print("core.nn.padding: ok")
