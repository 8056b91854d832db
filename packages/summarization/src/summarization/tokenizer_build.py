"""Build the byte-level BPE tokenizer that the ``tiny`` and ``small`` presets ship with.

The from-scratch presets need a tokenizer without a download. This module trains one with the
``tokenizers`` library (byte-level BPE, the same scheme as BART / RoBERTa, so any UTF-8 text —
Korean included — encodes without unknown tokens) and saves it as a transformers fast tokenizer
(``tokenizer.json`` + ``tokenizer_config.json``), so that ``AutoTokenizer.from_pretrained(folder)``
loads it. Special tokens follow BART's ids: ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3,
``<mask>``=4, and ``<s> text </s>`` is added around every text as BART does.

One difference from BART's pre-tokenizer: DialogSum's speaker tags (``#Person1#``, ``#Person2#``,
...) are kept whole (:data:`SPEAKER_TAG`), so BPE learns each as one token (with and without its
leading space). GPT-2's pattern would cut ``#Person1#`` into ``#``, ``Person``, ``1``, ``#``:
four tokens for the most frequent word of both dialogues and summaries. Kept whole, the train
split's dialogues are 9% and its summaries 20% shorter in tokens (191 and 30 on average instead of
210 and 38), which the 30-minute ``small`` preset turns into more training steps.

The shipped tokenizer (``summarization/assets/tokenizer``) was built from the full DialogSum
train split plus the package's Korean sample::

    python -m summarization.tokenizer_build --out
    packages/summarization/src/summarization/assets/tokenizer \\
        --train-file ../shared/data/dialogsum/dialogsum.train.2021-05-26.jsonl

``BUILD.json`` next to it records the input files (sha256), vocabulary size and library
versions. Without ``--out`` the module runs a self-check: it builds a tokenizer from the shipped
samples into a temporary folder, loads it with ``AutoTokenizer`` and round-trips English and
Korean text (a few seconds).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).parent / "assets"
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
"""BART's special tokens in BART's id order (``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3,
``<mask>``=4)."""
DEFAULT_VOCAB_SIZE = 8192
SPEAKER_TAG = r" ?#[A-Za-z]+\d*#"
"""A DialogSum speaker or placeholder tag (``#Person1#``, ``#Person2#``, ``#PersonN#``) with an
optional leading space."""
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
"""The word-splitting pattern of GPT-2's (and BART's) byte-level pre-tokenizer."""


def corpus_texts(files: Sequence[Path], repeats: Sequence[int] | None = None) -> Iterator[str]:
    """Every dialogue and summary text of DialogSum-style JSONL files.

    Args:
        files: JSONL files with ``dialogue`` and ``summary`` / ``summary1..N`` fields.
        repeats: how many times to yield each file's texts (default once each). Repeating the
            small Korean sample lets BPE learn merges for its common syllables instead of
            leaving every Hangul syllable as three byte tokens.

    Yields:
        One text per field value (dialogues keep their newlines).
    """
    for path, times in zip(files, repeats or [1] * len(files)):
        with Path(path).open(encoding="utf-8") as handle:
            texts = []
            for line in handle:
                if not line.strip():
                    continue
                row = json.loads(line)
                texts += [
                    v
                    for k, v in row.items()
                    if isinstance(v, str) and (k == "dialogue" or k.startswith("summary"))
                ]
        for _ in range(times):
            yield from texts


def sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build_tokenizer(
    files: Sequence[Path],
    out_dir: Path,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    max_length: int = 1024,
    repeats: Sequence[int] | None = None,
) -> Path:
    """Train a byte-level BPE on ``files`` and save it as a transformers tokenizer.

    Args:
        files: JSONL corpora (DialogSum format).
        repeats: per file, how often its texts enter training (see :func:`corpus_texts`).
        out_dir: folder to write (created); gets ``tokenizer.json``, ``tokenizer_config.json``
            and ``BUILD.json``.
        vocab_size: BPE vocabulary size, special tokens included.
        max_length: ``model_max_length`` written into the tokenizer config.

    Returns:
        ``out_dir``.
    """
    from transformers import PreTrainedTokenizerFast

    bpe = train_bpe(files, vocab_size, repeats)
    vocab = bpe.get_vocab()
    assert [vocab[t] for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4], (
        "special tokens must keep BART's ids"
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        cls_token="<s>",
        sep_token="</s>",
        model_max_length=max_length,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    record = build_record(files, repeats, len(vocab))
    (out_dir / "BUILD.json").write_text(
        json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return out_dir


def train_bpe(files: Sequence[Path], vocab_size: int, repeats: Sequence[int] | None) -> Any:
    """A ``tokenizers.Tokenizer`` (byte-level BPE, BART's special tokens) trained on ``files``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    bpe = Tokenizer(models.BPE())
    # Speaker tags first, then GPT-2's word pattern; the byte-level step only maps bytes to
    # printable characters (its own regex would split the tags again).
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(f"{SPEAKER_TAG}|{GPT2_PATTERN}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.RobertaProcessing(
        ("</s>", 2), ("<s>", 0), add_prefix_space=False
    )
    # min_frequency=2: a merge seen once is noise; the byte alphabet still covers every input.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(corpus_texts(files, repeats), trainer=trainer)
    return bpe


def build_record(
    files: Sequence[Path], repeats: Sequence[int] | None, vocab_size: int
) -> dict[str, Any]:
    """What ``BUILD.json`` records: settings, source files with their sha256, library versions."""
    import tokenizers
    import transformers

    return {
        "what": "byte-level BPE for the from-scratch presets (tiny, small) of the summarization "
        "package",
        "built_by": "python -m summarization.tokenizer_build",
        "vocab_size": vocab_size,
        "min_frequency": 2,
        "special_tokens": SPECIAL_TOKENS,
        "pre_tokenizer": f"{SPEAKER_TAG}|{GPT2_PATTERN}, then byte-level",
        "sources": [
            {
                "file": f"{Path(f).parent.name}/{Path(f).name}",
                "sha256": sha256(Path(f)),
                "repeats": r,
            }
            for f, r in zip(files, repeats or [1] * len(files))
        ],
        "tokenizers": tokenizers.__version__,
        "transformers": transformers.__version__,
    }


KOREAN_REPEATS = 50
"""How often the Korean sample enters BPE training (it is ~10 KB next to ~12 MB of English)."""


def default_sources(train_file: Path | None) -> tuple[list[Path], list[int]]:
    """The corpus of the shipped tokenizer and each file's repeat count: a DialogSum train file
    (default: the shipped sample) once, plus the Korean sample's train and dev files
    :data:`KOREAN_REPEATS` times."""
    english = Path(train_file) if train_file else ASSETS / "dialogsum_sample" / "train.jsonl"
    korean = [ASSETS / "korean_sample" / "train.jsonl", ASSETS / "korean_sample" / "dev.jsonl"]
    return [english, *korean], [1, KOREAN_REPEATS, KOREAN_REPEATS]


def main(argv: Sequence[str] | None = None) -> int:
    """Build into ``--out``, or (no ``--out``) run the self-check in a temporary folder."""
    parser = argparse.ArgumentParser(
        prog="python -m summarization.tokenizer_build", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder to write; omit for a self-check in a temp folder",
    )
    parser.add_argument(
        "--train-file",
        type=Path,
        default=None,
        help="DialogSum train JSONL (default: the shipped sample)",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=DEFAULT_VOCAB_SIZE,
        help=f"BPE vocabulary size (default {DEFAULT_VOCAB_SIZE})",
    )
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        files, repeats = default_sources(args.train_file)
        out = build_tokenizer(
            files, args.out or Path(tmp) / "tok", args.vocab_size, repeats=repeats
        )
        tok = AutoTokenizer.from_pretrained(out)
        for text in (
            "#Person1#: Hello, how are you doing today?",
            "#Person2#: 며칠 전부터 목이 아프고 열이 나요.",
        ):
            ids = tok(text)["input_ids"]
            assert ids[0] == tok.bos_token_id == 0 and ids[-1] == tok.eos_token_id == 2, ids
            assert tok.decode(ids, skip_special_tokens=True) == text
            assert tok.convert_ids_to_tokens(ids)[1] == text[:9], "a speaker tag is one token"
            print(f"{len(ids):3d} tokens: {tok.convert_ids_to_tokens(ids)[:8]} ...")
        print(f"{type(tok).__name__} with {len(tok)} tokens written to {out}")
    print("summarization.tokenizer_build: ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
