"""Small byte-level BPE tokenizers that task packages ship for their offline ``tiny`` presets.

A task's tiny preset needs a tokenizer without a download. Each package trains one with the
``tokenizers`` library from text it ships (byte-level BPE: every byte is in the vocabulary, so
any UTF-8 text, Korean included, encodes without unknown tokens), saves it in transformers' format
and ships the folder. The builder is a maintainer tool: nothing at run time calls it. Its
``--check`` rebuilds the folder in a temporary place and compares it byte for byte with the
shipped one (training is deterministic), so the shipped files are shown to be what the recipe
makes.

- :class:`BpeRecipe` / :func:`train_bpe`: the training settings and the training itself (special
  tokens first, in the given order, so their ids are 0, 1, ...; an optional split pattern applied
  before the byte-level step keeps chosen strings whole).
- :func:`save_fast`: the trained tokenizer as a ``PreTrainedTokenizerFast`` folder.
- :func:`differing_files`: names of files that differ between two folders.
- :func:`main`: the builder's command line (``--check`` / ``--write`` / ``--out DIR``).

Self-check: ``python -m core.task.tiny_tokenizer`` (trains a 300-token BPE on a few lines).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
"""The word-splitting pattern of GPT-2's (and BART's) byte-level pre-tokenizer."""

RECORD = "BUILD.json"
"""A build record (sources, versions) a builder may write; not part of the byte comparison."""


@dataclass(frozen=True)
class BpeRecipe:
    """How to train a byte-level BPE."""

    special_tokens: tuple[str, ...]
    """Special tokens; they get ids 0, 1, ... in this order."""
    vocab_size: int
    """Largest vocabulary, special tokens included (a small corpus may stop earlier)."""
    min_frequency: int = 2
    """A pair merges only when seen this often (0: any pair)."""
    split: str | None = None
    """A regex that cuts words before the byte-level step (``behavior="isolated"``); None: the
    byte-level step's own GPT-2 pattern."""
    unk_token: str | None = None
    """The BPE model's unknown token (a byte-level vocabulary never needs it)."""
    nfc: bool = False
    """Normalise text to Unicode NFC first."""


def train_bpe(texts: Iterable[str], recipe: BpeRecipe) -> Any:
    """A ``tokenizers.Tokenizer`` (byte-level BPE, byte-level decoder) trained on ``texts``.

    Args:
        texts: training text, one string per document or line.
        recipe: the settings.

    Returns:
        The tokenizer; the caller adds a post-processor and wraps it for transformers.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token=recipe.unk_token))
    if recipe.nfc:
        bpe.normalizer = normalizers.NFC()
    if recipe.split is None:
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:  # the byte-level step then only maps bytes (its own regex would cut the words again)
        bpe.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(recipe.split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size,
        min_frequency=recipe.min_frequency,
        special_tokens=list(recipe.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return bpe


def save_fast(bpe: Any, out_dir: Path, **special: Any) -> Path:
    """Save ``bpe`` as a transformers fast tokenizer (``tokenizer.json``,
    ``tokenizer_config.json``) that ``AutoTokenizer.from_pretrained(out_dir)`` loads.

    Args:
        bpe: a trained ``tokenizers.Tokenizer``.
        out_dir: the folder (created).
        special: ``PreTrainedTokenizerFast`` arguments (``bos_token``, ``model_max_length``, ...).
    """
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=bpe, **special).save_pretrained(out_dir)
    return out_dir


def write_record(
    out_dir: Path, bpe: Any, recipe: BpeRecipe, sources: Sequence[tuple[Path, int]], **about: str
) -> None:
    """Write :data:`RECORD` into ``out_dir``: ``about`` (what, built by), the recipe, each source
    file with its sha256 and repeat count, and the library versions.

    Args:
        out_dir: the tokenizer's folder.
        bpe: the trained tokenizer (its vocabulary size is recorded).
        recipe: its recipe.
        sources: ``(file, how often its text entered training)``.
        about: leading entries (``what=``, ``built_by=``).
    """
    import tokenizers
    import transformers

    files = [
        {
            "file": f"{f.parent.name}/{f.name}",
            "sha256": sha256(f.read_bytes()).hexdigest(),
            "repeats": n,
        }
        for f, n in sources
    ]
    split = recipe.split or "byte-level (GPT-2 pattern)"
    record = {
        **about,
        "vocab_size": bpe.get_vocab_size(),
        "min_frequency": recipe.min_frequency,
        "special_tokens": list(recipe.special_tokens),
        "pre_tokenizer": f"{split}, then byte-level" if recipe.split else split,
        "sources": files,
        "tokenizers": tokenizers.__version__,
        "transformers": transformers.__version__,
    }
    text = json.dumps(record, indent=1, ensure_ascii=False) + "\n"
    (Path(out_dir) / RECORD).write_text(text, encoding="utf-8")


def differing_files(a: Path, b: Path) -> list[str]:
    """Names of the files that differ between folders ``a`` and ``b`` (a file on one side only
    counts; :data:`RECORD` is left out)."""
    names = ({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()}) - {RECORD}
    same = [n for n in names if (a / n).is_file() and (b / n).is_file()]
    return sorted(set(names) - {n for n in same if (a / n).read_bytes() == (b / n).read_bytes()})


def main(
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    shipped: Path,
    build: Callable[[Path, argparse.Namespace], Path],
    try_it: Callable[[Path], None] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """A tokenizer builder's command line.

    ``--check`` builds into a temporary folder and compares it with ``shipped`` (exit code 1 when
    a file differs); ``--write`` replaces ``shipped`` with a fresh build; ``--out DIR`` builds into
    ``DIR``; with none of them it builds into a temporary folder only. ``try_it`` (loading and
    round-trip asserts) runs on every fresh build.

    Args:
        argv: the arguments (None: ``sys.argv``).
        prog / description: for the help text.
        shipped: the folder the package ships.
        build: ``(out_dir, args) -> out_dir``: writes the tokenizer folder.
        try_it: checks a built folder (raises on failure).
        add_arguments: adds the builder's own flags to the parser.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help=f"compare a fresh build with {shipped}")
    mode.add_argument("--write", action="store_true", help=f"replace {shipped} by a fresh build")
    mode.add_argument("--out", type=Path, default=None, help="build into this folder")
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = build(args.out or Path(tmp) / "fresh", args)
        print(f"built {sorted(p.name for p in fresh.iterdir())}")
        if try_it:
            try_it(fresh)
        if args.write:
            shutil.rmtree(shipped, ignore_errors=True)
            shutil.copytree(fresh, shipped)
            print(f"wrote {shipped}")
        if args.check:
            diff = differing_files(fresh, shipped)
            if diff:
                print(f"{diff} DIFFER from the shipped files in {shipped}", file=sys.stderr)
                return 1
            print(f"the shipped files in {shipped} are reproduced byte for byte")
    return 0


if __name__ == "__main__":  # self-check: python -m core.task.tiny_tokenizer
    from transformers import AutoTokenizer

    lines = ["#Person1#: Hello, how are you?", "#Person2#: 안녕하세요, 잘 지내요."] * 20
    recipe = BpeRecipe(("<s>", "<pad>", "</s>"), 300, split=rf" ?#\w+#|{GPT2_PATTERN}")
    with tempfile.TemporaryDirectory() as tmp:
        kwargs = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
        one = save_fast(train_bpe(lines, recipe), Path(tmp) / "a", **kwargs)
        two = save_fast(train_bpe(lines, recipe), Path(tmp) / "b", **kwargs)
        assert differing_files(one, two) == [], "training must be deterministic"
        (two / "tokenizer.json").write_text("{}", encoding="utf-8")
        assert differing_files(one, two) == ["tokenizer.json"]
        tok = AutoTokenizer.from_pretrained(one)
        ids = tok(lines[1])["input_ids"]
        assert tok.convert_ids_to_tokens(ids)[0] == "#Person2#" and tok.decode(ids) == lines[1]
        assert [tok.convert_tokens_to_ids(t) for t in ("<s>", "<pad>", "</s>")] == [0, 1, 2]
        print(f"{len(tok)} tokens; {lines[1]!r} -> {len(ids)} ids")
    print("core.task.tiny_tokenizer: ok")
