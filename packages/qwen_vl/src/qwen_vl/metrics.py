"""The counting metric: the first whole number of a generated text (digits such as ``1,024``, or
an English number word up to twenty) against the reference's.

Self-check: ``python -m qwen_vl.metrics``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from qwen_vl.synth import NUMBER_WORDS

METRIC_VERSION = "1"
"""Version of the parsing and scoring rules (recorded in every run's manifest)."""

_NUMBER = re.compile(r"(?<![\w.])-?\d{1,3}(?:,\d{3})+(?![\d])|(?<![\w.])-?\d+")
_WORDS = {word: n for n, word in enumerate(NUMBER_WORDS)}
_WORD = re.compile(r"\b(" + "|".join(NUMBER_WORDS) + r")\b", re.IGNORECASE)


def parse_count(text: str) -> int | None:
    """The first whole number in ``text`` (a generated answer or a reference), or None."""
    digit = _NUMBER.search(text)
    word = _WORD.search(text)
    if digit and (not word or digit.start() <= word.start()):
        return int(digit.group().replace(",", ""))
    return _WORDS[word.group(1).lower()] if word else None


def counting_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Over the ``references`` with a count: ``count_accuracy`` of ``predictions`` (no number is
    wrong), ``count_parsed`` (share with a number), ``count_samples``, and ``count_mae`` over the
    answers with a number (absent when none has one: no NaN in the logs); ``{}`` without counts."""
    pairs = [(parse_count(p), parse_count(r)) for p, r in zip(predictions, references, strict=True)]
    pairs = [(p, r) for p, r in pairs if r is not None]
    if not pairs:
        return {}
    parsed = [(p, r) for p, r in pairs if p is not None]
    metrics = {
        "count_accuracy": sum(p == r for p, r in parsed) / len(pairs),
        "count_parsed": len(parsed) / len(pairs),
        "count_samples": float(len(pairs)),
    }
    if parsed:
        metrics["count_mae"] = sum(abs(p - r) for p, r in parsed) / len(parsed)
    return metrics


if __name__ == "__main__":  # self-check: python -m qwen_vl.metrics
    texts = ("There are 12.", "three", "1,024", "none")
    assert [parse_count(t) for t in texts] == [12, 3, 1024, None]
    m = counting_metrics(["3", "There are five.", "no idea", "7"], ["3", "4", "2", "9"])
    print(m)
    assert m["count_accuracy"] == 0.25 and m["count_mae"] == 1.0 and m["count_parsed"] == 0.75
    print("qwen_vl.metrics: ok")
