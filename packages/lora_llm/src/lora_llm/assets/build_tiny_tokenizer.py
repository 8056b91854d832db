"""Rebuild the tokenizer of the ``tiny`` preset (``assets/tiny_tokenizer/``), offline and
reproducibly.

A byte-level BPE (any text, Korean included, round-trips exactly: no unknown tokens) with 2,048
tokens, trained with the ``tokenizers`` library on the shipped samples rendered with the package's
prompt templates (English and Korean Alpaca prompts and the built-in chat headers). Special
tokens: ``<unk>`` 0, ``<s>`` 1 (BOS, added in front of every encoded text like Llama does),
``</s>`` 2 (EOS), ``<pad>`` 3. No chat template: the ``tiny`` model gets the package's built-in
one when chat data needs it.

Usage (from the repository root)::

    python packages/lora_llm/src/lora_llm/assets/build_tiny_tokenizer.py            # rebuild in
    place
    python packages/lora_llm/src/lora_llm/assets/build_tiny_tokenizer.py --check    # compare only

``--check`` builds into a temporary folder and fails if ``tokenizer.json`` differs from the
shipped one (the build is deterministic).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
VOCAB_SIZE = 2048
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def training_texts() -> list[str]:
    """Every shipped record rendered with the templates (prompt + response), in file order."""
    sys.path.insert(0, str(HERE.parent.parent))  # the package's src folder, to import lora_llm.data
    from lora_llm.data import PROMPTS

    texts = []
    english = json.loads((HERE / "alpaca_en_sample.json").read_text(encoding="utf-8"))
    korean = [
        json.loads(line)
        for line in (HERE / "ko_instructions.jsonl").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
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


def build(out_dir: Path) -> None:
    """Train the BPE and save it with ``save_pretrained`` into ``out_dir``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_texts(), trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=1024,
        padding_side="right",
    )
    wrapped.save_pretrained(out_dir)


def main() -> int:
    """Build in place, or ``--check`` against the shipped files."""
    parser = argparse.ArgumentParser(description="Rebuild the tiny preset's tokenizer.")
    parser.add_argument(
        "--check",
        action="store_true",
        help="build into a temporary folder and compare with the shipped tokenizer.json",
    )
    args = parser.parse_args()
    target = HERE / "tiny_tokenizer"
    if not args.check:
        build(target)
        print(f"wrote {target}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp))
        same = filecmp.cmp(Path(tmp) / "tokenizer.json", target / "tokenizer.json", shallow=False)
    print("tokenizer.json is reproducible" if same else "tokenizer.json DIFFERS from a fresh build")
    return 0 if same else 1


if __name__ == "__main__":  # self-check: python -m lora_llm.assets.build_tiny_tokenizer --check
    sys.exit(main())
