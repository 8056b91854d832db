"""ROUGE-1/2/L/Lsum with ``rouge_score``, correct for Korean, with several references per sample.

**Tokenizer.** ``rouge_score``'s default tokenizer lower-cases the text and replaces everything
outside ``[a-z0-9]`` by spaces: Hangul (and every other non-ASCII letter) disappears, and a Korean
summary scores 0 against anything. :class:`UnicodeWordTokenizer` keeps words made of letters and
digits of any script instead; on ASCII text it gives exactly the default tokenizer's tokens.
``tokenizer="auto"`` picks it when any text holds a non-ASCII letter. The chosen tokenizer is
named in every score (and in the run manifest).

**Stemming.** Porter stemming (``use_stemmer``) of words longer than 3 letters, as
``rouge_score`` does, for ASCII words only: it is an English stemmer.

**Several references** (DialogSum test: ``summary1..3``). ``mean`` (default): each ROUGE F1 is
averaged over the sample's references. This is the model-averaging that ROUGE-1.5.5 does by
default (``-f A``) and does not reward a system for matching one annotator by luck. ``max``: per
sample and ROUGE type the best-matching reference counts (``rouge_score``'s ``score_multi``),
which gives higher numbers. The convention is named in the output.

**Aggregation.** Scores are per-sample F1 values averaged over samples (no bootstrap), reported
as fractions in [0, 1].

**ROUGE-Lsum** needs one sentence per line. Texts are split into sentences at ``. ! ?``
(and the CJK full stop) followed by whitespace, and at existing line breaks, for references and
predictions alike (NLTK's sentence splitter would need a download).

Self-check: ``python -m core.task.metrics``.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Sequence
from typing import Any, Literal

from rouge_score import rouge_scorer, tokenizers
from rouge_score.tokenize import tokenize as rouge_default_tokenize

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
TOKENIZER_NAMES = {
    "default": "rouge_score-default ([a-z0-9]+ words; drops non-ASCII letters)",
    "unicode": "unicode-words (letters and digits of any script, Hangul kept)",
}
CONVENTIONS = {
    "mean": "mean: each ROUGE F1 averaged over a sample's references (ROUGE-1.5.5 -f A), then "
    "over samples",
    "max": "max: per sample and ROUGE type the best reference's F1 (rouge_score score_multi), "
    "then mean over samples",
}
SENTENCE_END = re.compile(r"(?<=[.!?\u3002])\s+|\s*\n\s*")
NON_WORD = re.compile(r"[\W_]+")


class UnicodeWordTokenizer(tokenizers.Tokenizer):
    """ROUGE tokenizer that keeps letters and digits of every script (Hangul included).

    Lower-cases, splits on anything that is not a letter or digit, and Porter-stems ASCII words
    longer than 3 characters when ``use_stemmer`` is set. On ASCII text the tokens equal those of
    ``rouge_score``'s default tokenizer.

    Args:
        use_stemmer: stem English (ASCII) words.
    """

    def __init__(self, use_stemmer: bool = False) -> None:
        from nltk.stem import porter

        self._stemmer = porter.PorterStemmer() if use_stemmer else None

    def tokenize(self, text: str) -> list[str]:
        """Words of ``text`` (list of str, lower-cased, ASCII words stemmed if asked)."""
        words = [w for w in NON_WORD.split(text.lower()) if w]
        if self._stemmer is None:
            return words
        return [self._stemmer.stem(w) if len(w) > 3 and w.isascii() else w for w in words]


class DefaultTokenizer(tokenizers.Tokenizer):
    """``rouge_score``'s own tokenizer (kept as a class so both choices look alike)."""

    def __init__(self, use_stemmer: bool = False) -> None:
        from nltk.stem import porter

        self._stemmer = porter.PorterStemmer() if use_stemmer else None

    def tokenize(self, text: str) -> list[str]:
        """Lower-cased ``[a-z0-9]+`` words (everything else is dropped)."""
        return rouge_default_tokenize(text, self._stemmer)


def has_non_ascii_letters(texts: Sequence[str]) -> bool:
    """Whether any text holds a letter or digit outside ASCII (Hangul, accented letters, CJK...)."""
    return any(not ch.isascii() and ch.isalnum() for text in texts for ch in text)


def resolve_tokenizer(choice: str, texts: Sequence[str]) -> Literal["default", "unicode"]:
    """``auto`` -> ``unicode`` when ``texts`` hold non-ASCII letters, else ``default``; other
    choices are returned as they are. ``en`` / ``ko`` (the ``score --lang`` names) map to
    ``default`` / ``unicode``."""
    choice = {"en": "default", "ko": "unicode"}.get(choice, choice)
    if choice == "auto":
        return "unicode" if has_non_ascii_letters(texts) else "default"
    if choice not in TOKENIZER_NAMES:
        raise ValueError(f"unknown ROUGE tokenizer {choice!r}; use auto, default or unicode")
    return choice  # type: ignore[return-value]


def sentence_lines(text: str) -> str:
    """``text`` with one sentence per line (what ROUGE-Lsum expects)."""
    return "\n".join(s for s in SENTENCE_END.split(text.strip()) if s)


def rouge_version() -> str:
    """Installed ``rouge-score`` version."""
    return importlib.metadata.version("rouge-score")


def describe(tokenizer: str, use_stemmer: bool, multi_reference: str) -> dict[str, Any]:
    """The metric's identity for scores and the run manifest."""
    return {
        "implementation": "rouge_score.rouge_scorer.RougeScorer (F1), core.task.metrics",
        "package": "rouge-score",
        "version": rouge_version(),
        "rouge_types": list(ROUGE_TYPES),
        "tokenizer": TOKENIZER_NAMES[tokenizer],
        "stemmer": "porter (ASCII words longer than 3 letters)" if use_stemmer else "none",
        "multi_reference": CONVENTIONS[multi_reference],
        "rougeLsum_sentences": "split at . ! ? followed by whitespace, and at line breaks",
        "aggregation": "mean of per-sample F1 over samples",
    }


def sample_scores(
    scorer: rouge_scorer.RougeScorer,
    prediction: str,
    references: Sequence[str],
    multi_reference: str,
) -> dict[str, float]:
    """ROUGE F1 of one prediction against its references.

    Args:
        scorer: a ``RougeScorer`` over :data:`ROUGE_TYPES`.
        prediction: the generated summary.
        references: one or more reference summaries.
        multi_reference: ``mean`` or ``max`` (see the module docstring).

    Returns:
        ``{rouge type: F1}``.
    """
    pred = sentence_lines(prediction)
    per_ref = [scorer.score(sentence_lines(ref), pred) for ref in references]
    if multi_reference == "max":
        return {t: max(s[t].fmeasure for s in per_ref) for t in ROUGE_TYPES}
    return {t: sum(s[t].fmeasure for s in per_ref) / len(per_ref) for t in ROUGE_TYPES}


def rouge(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    tokenizer: str = "auto",
    use_stemmer: bool = True,
    multi_reference: str = "mean",
) -> dict[str, Any]:
    """Corpus ROUGE of predictions against their references.

    Args:
        predictions: one summary per sample.
        references: per sample, a list of one or more references.
        tokenizer: ``auto``, ``default`` or ``unicode`` (``en`` / ``ko`` accepted too).
        use_stemmer: Porter-stem ASCII words.
        multi_reference: ``mean`` or ``max``.

    Returns:
        ``rouge1``, ``rouge2``, ``rougeL``, ``rougeLsum`` (mean F1 in [0, 1]), ``samples``,
        ``references_per_sample`` (the most any sample has), and the tokenizer, stemmer and
        convention used (see :func:`describe`).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every sample needs at least one reference")
    if multi_reference not in CONVENTIONS:
        raise ValueError(f"unknown multi-reference convention {multi_reference!r}; use mean or max")
    chosen = resolve_tokenizer(tokenizer, [*predictions, *(r for refs in references for r in refs)])
    word_tokenizer = (
        UnicodeWordTokenizer(use_stemmer) if chosen == "unicode" else DefaultTokenizer(use_stemmer)
    )
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=word_tokenizer)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, refs in zip(predictions, references):
        for name, value in sample_scores(scorer, prediction, refs, multi_reference).items():
            totals[name] += value
    n = max(len(predictions), 1)
    return {
        **{name: totals[name] / n for name in ROUGE_TYPES},
        "samples": len(predictions),
        "references_per_sample": max((len(r) for r in references), default=0),
        **describe(chosen, use_stemmer, multi_reference),
    }


def answer_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Generated answers against one reference each: ROUGE-L F1 (tokenizer ``auto``, so Korean
    is scored, not dropped) and the exact-match rate (whitespace runs count as one space).

    Returns:
        ``{"rougeL", "exact_match"}``, both in [0, 1].
    """
    scores = rouge(
        predictions,
        [[t] for t in references],
        tokenizer=resolve_tokenizer("auto", references),
    )
    same = sum(" ".join(p.split()) == " ".join(t.split()) for p, t in zip(predictions, references))
    return {"rougeL": float(scores["rougeL"]), "exact_match": same / max(len(predictions), 1)}


if __name__ == "__main__":  # self-check: python -m core.task.metrics
    english = rouge(
        ["The cat sat on the mat."], [["A cat was sitting on the mat."]], tokenizer="auto"
    )
    print(f"English rouge1={english['rouge1']:.3f} with {english['tokenizer']}")
    ko_pred, ko_ref = (
        "두 사람은 토요일에 영화를 보기로 한다.",
        "두 사람은 토요일 저녁에 영화를 보기로 한다.",
    )
    plain = rouge([ko_pred], [[ko_ref]], tokenizer="default")
    korean = rouge([ko_pred], [[ko_ref]], tokenizer="auto")
    print(
        f"Korean rouge1: default tokenizer {plain['rouge1']:.3f}, auto -> {korean['tokenizer']}: "
        f"{korean['rouge1']:.3f}"
    )
    assert plain["rouge1"] == 0.0 and korean["rouge1"] > 0.5
    text = "#Person1# asks #Person2#'s help: they'll meet at 3:30, don't worry!"
    assert UnicodeWordTokenizer(True).tokenize(text) == DefaultTokenizer(True).tokenize(text)
    refs = [["the cat sat", "a dog ran far away"]]
    mean, best = (
        rouge(["the cat sat"], refs, multi_reference="mean"),
        rouge(["the cat sat"], refs, multi_reference="max"),
    )
    assert best["rouge1"] == 1.0 and mean["rouge1"] == 0.5, (mean["rouge1"], best["rouge1"])
    print(f"two references: mean {mean['rouge1']:.2f}, max {best['rouge1']:.2f}")
    answers = answer_scores(["the  cat sat", "a dog"], ["the cat sat", "the dog ran"])
    assert answers["exact_match"] == 0.5 and 0.5 < answers["rougeL"] < 1.0, answers
    print("core.task.metrics: ok")
