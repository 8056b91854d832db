"""Builds the offline processor of the ``tiny`` preset (shipped in
``qwen_vl/assets/tiny_processor``).

The real Qwen2.5-VL processor (a 151k-token tokenizer) lives on the Hub, which tests and offline
machines cannot reach. The tiny preset needs a processor that behaves the same way, only small:

- a byte-level BPE tokenizer (the ``Qwen2Tokenizer`` class and its pre-tokenizer) trained here
  on a few kilobytes of English and counting questions, so any text still encodes (every byte is
  in the vocabulary); plus Qwen2.5-VL's special tokens in Qwen's order: ``<|endoftext|>``,
  ``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``, ``<|vision_end|>``, ``<|image_pad|>``,
  ``<|video_pad|>`` and the rest;
- a chat template written for this package that renders conversations in Qwen2.5-VL's format
  (``<|im_start|>role\\n...<|im_end|>\\n``, a default system turn, images as
  ``<|vision_start|><|image_pad|><|vision_end|>``);
- Qwen2.5-VL's image and video processors (patch 14, merge 2, temporal patch 2, CLIP mean/std).

``AutoProcessor.from_pretrained(folder)`` loads the result offline. Training the tokenizer is
deterministic (:mod:`core.task.tiny_tokenizer`), so the shipped files can be rebuilt and
compared; a maintainer tool, nothing at run time calls it. From the repository root::

    python packages/qwen_vl/tools/tiny_processor.py --check   # compare byte for byte
    python packages/qwen_vl/tools/tiny_processor.py --write   # overwrite the shipped files
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from core.task.tiny_tokenizer import BpeRecipe, main, train_bpe
from qwen_vl.model import TINY_PROCESSOR_DIR

VOCAB_SIZE = 1024
"""Largest BPE vocabulary before the special tokens (the small corpus stops earlier, at about
630)."""

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
"""Qwen2.5-VL's special tokens, in the order of the real tokenizer (ids follow the BPE
vocabulary)."""

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in part -%}"
    "{{ part['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- endif -%}"
)
"""Qwen2.5-VL's conversation format (written for this package)."""

GENERAL_TEXT = """
You are a helpful assistant. The picture shows a busy street with many people, cars and
bicycles. There are a few trees near the station and a small market on the left. Count the
people in the crowd and answer with a number. The answer is the number of objects you can
see. Please describe the image in one sentence. What colour is the largest object? The red
circle is next to the blue square, and the green triangle is below them. How many windows
does the house have? There is nothing in the image. I cannot see any objects. Yes. No.
Thank you! The quick brown fox jumps over the lazy dog. A festival at the stadium drew a
large crowd; the airport and the bridge were busy too. Answer the question about the image.
"""
"""General English for the tokenizer besides the counting questions."""


def corpus() -> list[str]:
    """Training text of the tiny tokenizer: counting questions and answers, numbers, general
    English.

    Returns:
        Lines of text.
    """
    from qwen_vl.synth import FOLLOW_UPS, NUMBER_WORDS, QUESTIONS, SHAPES, TEXT_QUESTIONS, WORDS

    lines = [line.strip() for line in GENERAL_TEXT.strip().splitlines()]
    for shape in SHAPES:
        for template in QUESTIONS:
            lines.append(template.format(shape=shape))
        for template in FOLLOW_UPS:
            lines.extend(template.format(k=k, shape=shape) for k in range(1, 4))
    for word in WORDS:
        lines.extend(template.format(word=word) for template in TEXT_QUESTIONS)
    lines.extend(str(n) for n in range(101))
    lines.extend(NUMBER_WORDS)
    lines.extend(
        [
            "system",
            "user",
            "assistant",
            "system\nYou are a helpful assistant.",
            "user\n",
            "assistant\n",
        ]
    )
    return lines * 3


def train_tokenizer() -> object:
    """A ``Qwen2Tokenizer`` with a BPE vocabulary trained on :func:`corpus`, the special tokens and
    the chat template.

    Returns:
        The tokenizer (``transformers`` object).
    """
    from transformers import AddedToken
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    # The same normaliser and pre-tokeniser as Qwen2Tokenizer, so the trained merges fit it.
    recipe = BpeRecipe((), VOCAB_SIZE, min_frequency=0, split=PRETOKENIZE_REGEX, nfc=True)
    bpe = train_bpe(corpus(), recipe)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    vocab = dict(model["vocab"])
    # Special tokens get the ids right after the BPE vocabulary, in Qwen's order (not in the order
    # in which the tokenizer happens to register its eos / pad tokens).
    vocab.update({token: len(model["vocab"]) + i for i, token in enumerate(SPECIAL_TOKENS)})
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS], special_tokens=True
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build(out_dir: Path, args: argparse.Namespace | None = None) -> Path:
    """Write the tiny processor (tokenizer, chat template, image and video processors) to
    ``out_dir``.

    Args:
        out_dir: target folder (created).

    Returns:
        ``out_dir``.
    """
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tokenizer = train_tokenizer()
    # Small defaults (16 vision tokens at most); the config's data.min_pixels / max_pixels override
    # them.
    image_processor = Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12544)
    video_processor = Qwen2VLVideoProcessor(min_pixels=3136, max_pixels=12544)
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(out_dir)
    return out_dir


def try_it(folder: Path) -> None:
    """Load ``folder`` with ``AutoProcessor`` and render a conversation with an image."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    tok = processor.tokenizer
    ids = {
        t: tok.convert_tokens_to_ids(t)
        for t in ("<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|endoftext|>")
    }
    print(f"{type(processor).__name__}, vocabulary {len(tok)}, special ids {ids}")
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "How many circles?"}],
        }
    ]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|vision_start|><|image_pad|><|vision_end|>How many circles?" in text, text
    print(repr(text))


if __name__ == "__main__":  # self-check: python packages/qwen_vl/tools/tiny_processor.py --check
    code = main(
        None,
        prog="tiny_processor.py",
        description=__doc__.split("\n\n")[0],
        shipped=TINY_PROCESSOR_DIR,
        build=build,
        try_it=try_it,
    )
    sys.exit(code)
