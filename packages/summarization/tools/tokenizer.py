"""Build the byte-level BPE tokenizer that the ``tiny`` and ``small`` presets ship with
(``summarization/assets/tokenizer``; a maintainer tool: nothing at run time calls it).

BART's scheme (byte-level BPE, ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3, ``<mask>``=4,
``<s> text </s>`` around every text), trained by :mod:`core.task.tiny_tokenizer`, with one
difference: DialogSum's speaker tags (``#Person1#``, ...) are kept whole (:data:`SPEAKER_TAG`).
GPT-2's pattern cuts ``#Person1#`` into four tokens; kept whole, the train split's dialogues are
9% and its summaries 20% shorter in tokens (191 and 30 on average instead of 210 and 38): more
training steps for the 30-minute ``small`` preset. The shipped ``assets/tokenizer`` was built
from the full DialogSum train split plus the Korean sample (``BUILD.json`` records the files and
their sha256); ``--write`` / ``--out DIR`` build, ``--check`` compares byte for byte (from the
repository root)::

    python packages/summarization/tools/tokenizer.py --check \\
        --train-file ../shared/data/dialogsum/dialogsum.train.2021-05-26.jsonl

Without flags (the self-check) it builds from the shipped samples into a temporary folder and
round-trips English and Korean text.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

from core.task.tiny_tokenizer import (
    GPT2_PATTERN,
    BpeRecipe,
    main,
    save_fast,
    train_bpe,
    write_record,
)
from summarization.config import SHIPPED_TOKENIZER

ASSETS = SHIPPED_TOKENIZER.parent
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
SPEAKER_TAG = r" ?#[A-Za-z]+\d*#"
"""A DialogSum speaker or placeholder tag (``#Person1#``) with an optional leading space."""
KOREAN_REPEATS = 50
"""How often the Korean sample enters training (~10 KB next to ~12 MB of English), so that BPE
learns merges for its common syllables instead of leaving each Hangul syllable as three bytes."""


def corpus_texts(files: list[Path], repeats: list[int]) -> Iterator[str]:
    """Every ``dialogue`` and ``summary*`` value of DialogSum-style JSONL ``files`` (in file
    order), each file's texts ``repeats[i]`` times."""
    for path, times in zip(files, repeats):
        rows = [json.loads(s) for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]
        texts = [
            v
            for row in rows
            for k, v in row.items()
            if isinstance(v, str) and (k == "dialogue" or k.startswith("summary"))
        ]
        for _ in range(times):
            yield from texts


def build(out_dir: Path, args: argparse.Namespace) -> Path:
    """Train on ``--train-file`` (default: the shipped sample) and the Korean sample; write the
    tokenizer and ``BUILD.json`` into ``out_dir``."""
    from tokenizers import processors

    english = Path(args.train_file or ASSETS / "dialogsum_sample" / "train.jsonl")
    files = [english] + [ASSETS / "korean_sample" / f"{s}.jsonl" for s in ("train", "dev")]
    repeats, split = [1, KOREAN_REPEATS, KOREAN_REPEATS], f"{SPEAKER_TAG}|{GPT2_PATTERN}"
    recipe = BpeRecipe(SPECIAL_TOKENS, args.vocab_size, min_frequency=2, split=split)
    bpe = train_bpe(corpus_texts(files, repeats), recipe)
    assert [bpe.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4], "BART's ids"
    bpe.post_processor = processors.RobertaProcessing(
        ("</s>", 2), ("<s>", 0), add_prefix_space=False
    )
    names = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    names |= {"mask_token": "<mask>", "cls_token": "<s>", "sep_token": "</s>"}
    save_fast(bpe, out_dir, **names, model_max_length=1024)
    what = "byte-level BPE for the from-scratch presets (tiny, small) of the summarization package"
    about = {"what": what, "built_by": "python packages/summarization/tools/tokenizer.py"}
    write_record(out_dir, bpe, recipe, list(zip(files, repeats)), **about)
    return out_dir


def try_it(folder: Path) -> None:
    """Load ``folder`` with ``AutoTokenizer`` and round-trip English and Korean dialogue lines."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    for text in (
        "#Person1#: Hello, how are you doing today?",
        "#Person2#: 며칠 전부터 목이 아파요.",
    ):
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id == 0 and ids[-1] == tok.eos_token_id == 2, ids
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.convert_ids_to_tokens(ids)[1] == text[:9], "a speaker tag is one token"
        print(f"{len(ids):3d} tokens: {tok.convert_ids_to_tokens(ids)[:8]} ...")


def options(parser: argparse.ArgumentParser) -> None:
    """``--train-file`` and ``--vocab-size``."""
    parser.add_argument("--train-file", type=Path, help="DialogSum train JSONL (default: sample)")
    parser.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary (8192)")


if __name__ == "__main__":  # self-check: python packages/summarization/tools/tokenizer.py
    doc, shipped = __doc__.splitlines()[0], SHIPPED_TOKENIZER
    code = main(
        None,
        prog="tokenizer.py",
        description=doc,
        shipped=shipped,
        build=build,
        try_it=try_it,
        add_arguments=options,
    )
    raise SystemExit(code)
