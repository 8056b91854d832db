"""Token data sets and their batches, for every task whose items are ``input_ids`` / ``labels``.

- :class:`TokenDataset`: tokenised examples with ``lengths()`` (the engine's length-grouped
  sampler and padding share read them).
- :func:`collate_causal`: right-padded decoder-only batches; the attention mask and the label
  mask come from the item *lengths*, never from token ids, so an EOS equal to the pad token is
  still attended and trained.
- :func:`pack` / :class:`PackedDataset`: several examples per row, positions restarting at 0 for
  each, no attention mask and no KV cache: transformers then derives a block-diagonal causal mask
  from the position ids (``masking_utils.find_packed_sequence_indices``) for eager, SDPA and
  flash attention alike, so no example sees another's tokens; the first label of every packed
  example is masked, as it would be predicted from the previous example.
- :func:`flatten_batch`: one row without padding (flash-attention's variable-length path).
- :class:`Seq2SeqCollator`: encoder-decoder batches with decoder inputs shifted from the labels.

Self-check: ``python -m core.task.batching``.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from core.nn.padding import length_mask, pad_fields, pad_rows
from core.task.base import IGNORE_INDEX


class TokenDataset(Dataset):
    """Tokenised examples. Item: ``{"index": int, "input_ids": list[int], "labels": list[int]}``.

    Args:
        input_ids: token ids per example.
        labels: labels per example (``-100`` where no loss is taken).
    """

    def __init__(self, input_ids: list[list[int]], labels: list[list[int]]) -> None:
        self.input_ids = input_ids
        self.labels = labels

    def __len__(self) -> int:
        """Number of examples."""
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Example ``i``: its index, ``input_ids`` and ``labels``."""
        return {"index": i, "input_ids": self.input_ids[i], "labels": self.labels[i]}

    def lengths(self) -> list[int]:
        """Input tokens per item (what the collator pads to)."""
        return [len(ids) for ids in self.input_ids]


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing of sample lengths into rows of ``capacity`` tokens.

    Deterministic: longest samples first (ties by index), each into the fullest row it still fits.

    Args:
        lengths: tokens per sample (each ``<= capacity``).
        capacity: row length (``data.max_length``).

    Returns:
        Rows as lists of sample indices (ascending within a row).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row id), sorted
    for i in order:
        need = lengths[i]
        if need > capacity:
            raise ValueError(f"sample {i} has {need} tokens, more than the row capacity {capacity}")
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        if room - need > 0:
            bisect.insort(free, (room - need, row))
    return [sorted(r) for r in rows]


class PackedDataset(Dataset):
    """Rows of several examples each. Item: ``{"index", "input_ids", "labels", "position_ids"}``.

    ``position_ids`` restart at 0 for every sample; ``labels`` of each sample's first token are
    ``-100`` (it would be predicted from the previous sample's last token).

    Args:
        examples: dicts with ``input_ids`` and ``labels`` (lists of equal length).
        max_length: row capacity.
    """

    def __init__(self, examples: list[dict[str, Any]], max_length: int) -> None:
        """Pack ``examples`` into rows of at most ``max_length`` tokens (see :func:`pack`)."""
        self.examples = examples
        self.rows = pack([len(e["input_ids"]) for e in examples], max_length)

    def __len__(self) -> int:
        """Number of packed rows."""
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Row ``i``: its samples concatenated; lists of length ``row tokens``."""
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for j in self.rows[i]:
            example = self.examples[j]
            ids += example["input_ids"]
            labels += [IGNORE_INDEX] + example["labels"][1:]
            positions += list(range(len(example["input_ids"])))
        return {"index": i, "input_ids": ids, "labels": labels, "position_ids": positions}

    def lengths(self) -> list[int]:
        """Tokens per row."""
        return [sum(len(self.examples[j]["input_ids"]) for j in row) for row in self.rows]


def collate_causal(samples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of items into a batch.

    The masks come from the item lengths, not from token ids: a pad id equal to EOS never hides
    the trained EOS.

    Args:
        samples: items of :class:`TokenDataset` or :class:`PackedDataset`.
        pad_id: token id written into padding positions.

    Returns:
        ``input_ids``, ``attention_mask`` (1 on real tokens) and ``labels`` (``-100`` on padding),
        all ``(batch, width)``; ``position_ids`` ``(batch, width)`` for packed rows (padding
        positions count from 0 again, a segment of their own); ``index`` ``(batch,)``.
    """
    lengths = [len(s["input_ids"]) for s in samples]
    width = max(lengths)
    out = pad_fields(samples, {"input_ids": pad_id, "labels": IGNORE_INDEX})
    out["index"] = torch.tensor([s["index"] for s in samples])
    if "position_ids" in samples[0]:  # packed rows: the padding tail counts from 0 again
        out["position_ids"] = pad_rows(
            [s["position_ids"] + list(range(width - n)) for s, n in zip(samples, lengths)], 0, width
        )
    return out


def flatten_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One row without padding from a batch of :func:`collate_causal` (padding-free training).

    The real tokens of every row are concatenated; ``position_ids`` restart at 0 for each sample
    (a packed row keeps its own restarts), which is all flash-attention's variable-length path
    needs to keep the samples apart (and what transformers builds the block-diagonal mask from
    under sdpa / eager). The first label of every row is masked: in the flat row it would be
    predicted from the previous row's last token (the padded batch never trains it either, so
    the loss-token count is unchanged).

    Args:
        batch: ``input_ids``, ``attention_mask``, ``labels`` and optionally ``position_ids``, all
            ``(batch, width)``, and ``index`` ``(batch,)``.

    Returns:
        ``input_ids``, ``labels``, ``position_ids`` and ``attention_mask`` ``(1, tokens)``
        (tokens = the batch's non-padding tokens) and ``index`` unchanged.
    """
    mask = batch["attention_mask"].bool()  # (batch, width)
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    labels = batch["labels"].clone()
    labels[:, 0] = IGNORE_INDEX
    return {
        "input_ids": batch["input_ids"][mask][None],
        "labels": labels[mask][None],
        "position_ids": positions[mask][None],
        "attention_mask": batch["attention_mask"][mask][None],
        "index": batch["index"],
    }


class Seq2SeqCollator:
    """Pads a list of items into an encoder-decoder batch.

    Args:
        pad_token_id: id used to pad inputs and decoder inputs.
        decoder_start_token_id: first decoder input (BART: ``</s>``; T5: ``<pad>``).
    """

    def __init__(self, pad_token_id: int, decoder_start_token_id: int) -> None:
        self.pad_token_id = pad_token_id
        self.decoder_start_token_id = decoder_start_token_id

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Batch items of a :class:`TokenDataset`.

        Returns:
            ``input_ids`` / ``attention_mask``: ``(batch, max_source_len)`` right-padded;
            ``labels``: ``(batch, max_target_len)`` with ``-100`` on padding;
            ``decoder_input_ids``: ``(batch, max_target_len)``, the labels shifted right by one
            with the decoder start token first (what the model would build from ``labels``);
            ``index``: ``(batch,)`` dataset indices.
        """
        sources = [s["input_ids"] for s in samples]
        labels = pad_rows([s["labels"] for s in samples], IGNORE_INDEX)
        decoder_input_ids = torch.full_like(labels, self.pad_token_id)
        decoder_input_ids[:, 0] = self.decoder_start_token_id
        decoder_input_ids[:, 1:] = labels[:, :-1].masked_fill(
            labels[:, :-1] == IGNORE_INDEX, self.pad_token_id
        )
        return {
            "input_ids": pad_rows(sources, self.pad_token_id),
            "attention_mask": length_mask([len(s) for s in sources]),
            "decoder_input_ids": decoder_input_ids,
            "labels": labels,
            "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
        }


if __name__ == "__main__":  # self-check: python -m core.task.batching
    data = TokenDataset([[5, 6, 7], [8], [9, 9]], [[-100, 6, 7], [8], [-100, 9]])
    packed = PackedDataset([data[i] for i in range(3)], max_length=4)
    assert packed.rows == [[0, 1], [2]] and packed.lengths() == [4, 2]
    batch = collate_causal([packed[0], packed[1]], pad_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [-100, 9, -100, -100]]
    flat = flatten_batch(collate_causal([data[0], data[1]], pad_id=0))
    assert flat["input_ids"].tolist() == [[5, 6, 7, 8]] and flat["labels"].tolist()[0][3] == -100
    seq2seq = Seq2SeqCollator(pad_token_id=1, decoder_start_token_id=2)([data[0], data[1]])
    assert seq2seq["decoder_input_ids"].tolist() == [[2, 1, 6], [2, 8, 1]]
    print({k: tuple(v.shape) for k, v in batch.items()})
    print("core.task.batching: ok")
