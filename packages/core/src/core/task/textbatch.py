"""Batches of token ids for text tasks: samples right-padded for training (:func:`pad_batch`, a
collator), prompts left-padded for generation (:func:`continuations`).

Self-check: ``python -m core.task.textbatch``.
"""

from __future__ import annotations

from typing import Any

import torch

from core.nn.padding import length_mask, pad_rows
from core.task.base import IGNORE_INDEX


def pad_batch(samples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack samples ``{"index", "input_ids", "labels"}`` (lists of ids; ``labels`` of any
    length, e.g. a target's) into tensors, right-padded to the longest of the batch.

    Returns:
        ``input_ids`` (padded with ``pad_id``) / ``attention_mask`` ``(batch, longest input)``,
        ``labels`` ``(batch, longest labels)`` padded with ``IGNORE_INDEX`` (no loss there),
        ``index`` ``(batch,)``.
    """
    return {
        "input_ids": pad_rows([s["input_ids"] for s in samples], pad_id),
        "attention_mask": length_mask([len(s["input_ids"]) for s in samples]),
        "labels": pad_rows([s["labels"] for s in samples], IGNORE_INDEX),
        "index": torch.tensor([s["index"] for s in samples]),
    }


def continuations(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int | None = None,
    **settings: Any,
) -> list[str]:
    """The continuation of each prompt by a causal LM (greedy unless ``settings`` sample),
    decoded without special tokens.

    Args:
        model: a transformers (or peft) causal LM, in eval mode.
        tokenizer: its tokenizer (``pad_token_id``, ``eos_token_id``, ``batch_decode``).
        prompts: token ids of each prompt; they are left-padded into batches so that every row
            ends where generation starts.
        max_new_tokens: the most tokens generated per prompt (fewer at the end token).
        batch_size: prompts per ``generate`` call (None: all at once); the longest go together
            (less padding), the texts come back in the order of ``prompts``.
        settings: more ``generate`` arguments (``do_sample``, ``temperature``, ``top_p``,
            ``top_k``, ``repetition_penalty``, ``synced_gpus``, an image batch's
            ``pixel_values``); the sampling ones are dropped without ``do_sample`` (transformers
            warns about them). Inputs with one entry per prompt need ``batch_size=None``: then
            the rows keep their order.

    Returns:
        One stripped text per prompt.
    """
    settings = {"do_sample": False, **settings}
    if not settings["do_sample"]:
        settings = {k: v for k, v in settings.items() if k not in ("temperature", "top_p", "top_k")}
    device = model.get_input_embeddings().weight.device
    size = batch_size or max(len(prompts), 1)
    order = list(range(len(prompts)))
    if size < len(prompts):  # several calls: the longest go together (less padding)
        order.sort(key=lambda i: -len(prompts[i]))
    texts: dict[int, str] = {}
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        ids = pad_rows([prompts[i] for i in chunk], tokenizer.pad_token_id, left=True).to(device)
        mask = length_mask([len(prompts[i]) for i in chunk], left=True).to(device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **settings,
            )
        decoded = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        texts.update((i, text.strip()) for i, text in zip(chunk, decoded, strict=True))
    return [texts[i] for i in range(len(prompts))]


if __name__ == "__main__":  # self-check: python -m core.task.textbatch
    batch = pad_batch(
        [
            {"index": 3, "input_ids": [5, 6, 7], "labels": [8]},
            {"index": 4, "input_ids": [5], "labels": [8, 9]},
        ],
        pad_id=1,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[8, IGNORE_INDEX], [8, 9]]
    assert batch["index"].tolist() == [3, 4]
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = {"<pad>": 0, "</s>": 1, "a": 2, "b": 3}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(words, unk_token="a")),
        pad_token="<pad>",
        eos_token="</s>",
    )
    config = GPT2Config(
        vocab_size=4, n_embd=8, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=1, pad_token_id=0
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    texts = continuations(model, tokenizer, [[2, 3, 2], [3]], 3)
    assert len(texts) == 2 and all(set(t.split()) <= {"a", "b"} for t in texts), texts
    # one prompt a call, in another order inside: the same greedy texts, in the prompts' order
    assert continuations(model, tokenizer, [[2, 3, 2], [3]], 3, batch_size=1) == texts
    sampled = continuations(model, tokenizer, [[3], [2]], 3, 1, do_sample=True, temperature=0.7)
    assert len(sampled) == 2 and all(set(t.split()) <= {"a", "b"} for t in sampled), sampled
    print("core.task.textbatch: ok")
