"""Rebuild the tokenizer of the ``tiny`` preset (``lora_llm/assets/tiny_tokenizer/``), offline and
reproducibly (a maintainer tool: nothing at run time calls it).

A byte-level BPE (:mod:`core.task.tiny_tokenizer`; any text, Korean included, round-trips
exactly) with 2,048 tokens, trained on the shipped samples rendered with the package's prompt
templates (English and Korean Alpaca prompts and the built-in chat headers). Special tokens:
``<unk>`` 0, ``<s>`` 1 (BOS, added in front of every encoded text like Llama does), ``</s>`` 2
(EOS), ``<pad>`` 3. No chat template: the ``tiny`` model gets the package's built-in one when chat
data needs it. From the repository root::

    python packages/lora_llm/tools/tiny_tokenizer.py --check   # compare byte for byte
    python packages/lora_llm/tools/tiny_tokenizer.py --write   # rebuild in place
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from core.task.tiny_tokenizer import BpeRecipe, main, save_fast, train_bpe
from lora_llm.data import ASSETS, PROMPTS

RECIPE = BpeRecipe(("<unk>", "<s>", "</s>", "<pad>"), 2048, min_frequency=2, unk_token="<unk>")


def training_texts() -> list[str]:
    """Every shipped record rendered with the templates (prompt + response), in file order."""
    english = json.loads((ASSETS / "alpaca_en_sample.json").read_text(encoding="utf-8"))
    lines = (ASSETS / "ko_instructions.jsonl").read_text(encoding="utf-8").splitlines()
    korean = [json.loads(line) for line in lines if line.strip()]
    texts = []
    for style, records in (("alpaca", english), ("alpaca_ko", korean)):
        for record in records:
            key = "input" if record["input"].strip() else "no_input"
            texts.append(PROMPTS[style][key].format(**record) + record["output"])
            texts.append(
                f"### User:\n{record['instruction']}\n\n### Assistant:\n{record['output']}"
            )
    # Korean is a small share of the samples: repeat it so common syllables get merges too.
    texts += [t for t in texts if "지시문" in t] * 3
    texts += ["### System:\n", "### User:\n", "### Assistant:\n"] * 20
    return texts


def build(out_dir: Path, args: argparse.Namespace) -> Path:
    """Train the BPE, add ``<s>`` in front of every text, save it into ``out_dir``."""
    from tokenizers import processors

    bpe = train_bpe(training_texts(), RECIPE)
    bos = bpe.token_to_id("<s>")
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    names = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    return save_fast(bpe, out_dir, **names, model_max_length=1024, padding_side="right")


def try_it(folder: Path) -> None:
    """Load ``folder`` and round-trip an English and a Korean prompt (BOS first)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    for text in ("### User:\nWhat is LoRA?\n\n### Assistant:\n", "다음 지시문에 답하세요."):
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id == 1 and tok.decode(ids[1:]) == text, ids
        print(f"{len(ids):3d} tokens: {tok.convert_ids_to_tokens(ids)[:8]} ...")


if __name__ == "__main__":  # self-check: python packages/lora_llm/tools/tiny_tokenizer.py --check
    code = main(
        None,
        prog="tiny_tokenizer.py",
        description="Rebuild the tiny preset's tokenizer.",
        shipped=ASSETS / "tiny_tokenizer",
        build=build,
        try_it=try_it,
    )
    sys.exit(code)
