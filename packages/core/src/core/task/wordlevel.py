"""A word-level tokenizer built from a task's own texts: the offline ``tiny`` model of a task
package needs one, and no Hub tokenizer can be downloaded in tests or on a cluster node.

Every word (NFKC, lower case; punctuation marks are words of their own) of the given texts gets
an id after the special tokens; an unseen word becomes the unknown token. The result is a
``transformers.PreTrainedTokenizerFast`` that ``save_pretrained`` / ``AutoTokenizer
.from_pretrained`` round-trip like any Hub tokenizer, and whose ``decode`` joins words with
spaces.

Self-check: ``python -m core.task.wordlevel``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def word_tokenizer(texts: Iterable[str], specials: dict[str, str], template: str = "$A") -> Any:
    """A lower-casing word-level ``PreTrainedTokenizerFast`` over the words of ``texts``.

    Args:
        texts: the texts whose words make the vocabulary.
        specials: role -> token, in id order from 0 (e.g. ``{"pad_token": "<pad>",
            "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}``); must hold
            ``pad_token`` and ``unk_token``. Roles are those of ``PreTrainedTokenizerFast``.
        template: how one text is encoded, with ``$A`` for its words and special tokens around
            it (``"[CLS] $A [SEP]"``, ``"<s> $A </s>"``; default: the words alone).

    Returns:
        The tokenizer; ``len(tokenizer)`` is the vocabulary size.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from tokenizers.trainers import WordLevelTrainer
    from transformers import PreTrainedTokenizerFast

    missing = {"pad_token", "unk_token"} - set(specials)
    if missing:
        raise ValueError(f"specials needs {sorted(missing)}; got {sorted(specials)}")
    tokens = list(specials.values())
    tok = Tokenizer(WordLevel(unk_token=specials["unk_token"]))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(list(texts), WordLevelTrainer(special_tokens=tokens))
    used = [t for t in template.split() if t in tokens]
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, tokens.index(t)) for t in dict.fromkeys(used)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


if __name__ == "__main__":  # self-check: python -m core.task.wordlevel
    import tempfile

    from transformers import AutoTokenizer

    roles = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
    made = word_tokenizer(["wake me up at 6", "play jazz, please"], roles, "<s> $A </s>")
    ids = made("Play JAZZ loudly")["input_ids"]
    assert ids[0] == 2 and ids[-1] == 3 and ids[3] == made.unk_token_id, ids
    assert made.decode(made("play jazz ,")["input_ids"], skip_special_tokens=True) == "play jazz ,"
    with tempfile.TemporaryDirectory() as tmp:
        made.save_pretrained(tmp)
        again = AutoTokenizer.from_pretrained(tmp)
        assert again("play jazz")["input_ids"] == made("play jazz")["input_ids"]
        assert again.pad_token_id == 0 and len(again) == len(made)
    print("core.task.wordlevel: ok")
