"""Image + text samples for Qwen2-VL-style models (Qwen2-VL, Qwen2.5-VL): one image's patches and
its placeholder tokens, batches of such samples, greedy answers.

A sample's text starts with the image: ``<|vision_start|>``, one ``<|image_pad|>`` per merged
patch (the model puts the image's features there), ``<|vision_end|>``, then the prompt's tokens.
The image processor (``Qwen2VLImageProcessor``) turns the image into ``pixel_values``
``(patches, channels x temporal x patch x patch)`` and ``image_grid_thw`` ``(1, 3)``; a batch
concatenates the patches of its images in order.

- :func:`image_prompt`: one sample's prompt ids, patches and grid.
- :func:`pad_image_batch`: samples -> a right-padded batch (the collator).
- :func:`answers`: the greedy continuation of each sample's prompt in a batch.

Self-check: ``python -m core.task.imagetext``.
"""

from __future__ import annotations

from typing import Any

import torch

from core.task.textbatch import continuations, pad_batch

VISION_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
"""Start, placeholder and end of an image in the text (Qwen2-VL's vocabulary)."""


def image_prompt(tokenizer: Any, image_processor: Any, image: Any, text: str) -> dict[str, Any]:
    """One sample's prompt: the image's tokens then ``text``'s.

    Args:
        tokenizer: has the :data:`VISION_TOKENS`.
        image_processor: a Qwen2-VL image processor (``merge_size``: merged patches per side).
        image: a ``PIL.Image`` (RGB).
        text: the prompt after the image.

    Returns:
        ``input_ids`` (a list), ``pixel_values`` ``(patches, features)`` and ``image_grid_thw``
        ``(1, 3)``.
    """
    out = image_processor(images=[image], return_tensors="pt")
    grid = out["image_grid_thw"]
    start, pad, end = tokenizer.convert_tokens_to_ids(list(VISION_TOKENS))
    count = int(grid[0].prod()) // image_processor.merge_size**2
    ids = [start, *[pad] * count, end]
    ids += tokenizer(text, add_special_tokens=False)["input_ids"]
    return {"input_ids": ids, "pixel_values": out["pixel_values"], "image_grid_thw": grid}


def pad_image_batch(samples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack samples ``{"index", "input_ids", "labels", "prompt_length", "pixel_values",
    "image_grid_thw"}`` (one image each) into a batch.

    Returns:
        :func:`core.task.textbatch.pad_batch`'s ``input_ids`` / ``attention_mask`` / ``labels``
        ``(batch, longest)`` and ``index``, plus ``prompt_length`` ``(batch,)``, ``pixel_values``
        ``(all patches, features)`` and ``image_grid_thw`` ``(batch, 3)``.
    """
    batch = pad_batch(samples, pad_id)
    batch["prompt_length"] = torch.tensor([s["prompt_length"] for s in samples])
    batch["pixel_values"] = torch.cat([s["pixel_values"] for s in samples])
    batch["image_grid_thw"] = torch.cat([s["image_grid_thw"] for s in samples])
    return batch


def answers(
    model: Any, tokenizer: Any, batch: dict[str, torch.Tensor], max_new_tokens: int, **kw: Any
) -> list[str]:
    """The greedy continuation of each sample's prompt (its first ``prompt_length`` tokens) with
    its image (:func:`core.task.textbatch.continuations`); ``kw`` goes to ``generate``
    (``synced_gpus`` under FSDP)."""
    prompts = [ids[:n].tolist() for ids, n in zip(batch["input_ids"], batch["prompt_length"])]
    images = {k: batch[k] for k in ("pixel_values", "image_grid_thw")}
    return continuations(model, tokenizer, prompts, max_new_tokens, **images, **kw)


if __name__ == "__main__":  # self-check: python -m core.task.imagetext
    import random

    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessor,
    )

    from core.task.shapes import draw
    from core.task.wordlevel import word_tokenizer

    tok = word_tokenizer(["what colour red"], {"pad_token": "<pad>", "unk_token": "<unk>"})
    tok.add_special_tokens({"eos_token": "</s>", "additional_special_tokens": list(VISION_TOKENS)})
    processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56)
    rng = random.Random(0)
    samples = []
    for i, size in enumerate((56, 112)):
        sample = image_prompt(tok, processor, draw("circle", "red", size, rng), "what colour")
        answer, n = tok("red")["input_ids"], len(sample["input_ids"])
        sample.update(index=i, input_ids=sample["input_ids"] + answer, prompt_length=n)
        samples.append({**sample, "labels": [-100] * n + answer})
    batch = pad_image_batch(samples, tok.pad_token_id)
    assert batch["input_ids"].shape == (2, 9), batch["input_ids"].shape
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] * 2
    assert batch["pixel_values"].shape == (32, 3 * 2 * 14 * 14), batch["pixel_values"].shape
    start, pad, end = tok.convert_tokens_to_ids(list(VISION_TOKENS))
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]},
                         bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=0),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                           out_hidden_size=32, fullatt_block_indexes=[0]),
        image_token_id=pad, vision_start_token_id=start, vision_end_token_id=end,
    )  # fmt: skip
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    texts = answers(model, tok, batch, max_new_tokens=2)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts), texts
    print("core.task.imagetext: ok")
