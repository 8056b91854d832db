"""The report of an encoded data set: how many records were read, skipped and cut, and the
length percentiles of what is left (:class:`EncodeStats`).

A task that encodes records into token samples counts each sample here; ``describe`` gives the
log line, ``log`` that line and warnings on what was cut or skipped, ``summary`` the plain data
for ``<run>/data_stats.json`` and the manifest, and ``truncation`` the one note on samples cut to
the length limit (:class:`core.task.truncation.Truncation`).

Self-check: ``python -m core.task.encode_report``.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from core.task.truncation import Truncation, length_stats


@dataclass
class EncodeStats:
    """Counts and length distributions of an encoded data set (logged, written as JSON).

    Fields: records read, the ones skipped (bad, or a prompt too long), samples whose response was
    cut and the response tokens it cost, the templates used, and per sample the prompt, response
    and total token counts kept and the length before cutting; ``problems``: one message per
    skipped record.
    """

    records: int = 0
    bad_records_skipped: int = 0
    long_prompts_skipped: int = 0
    truncated_samples: int = 0
    response_tokens_cut: int = 0
    styles: Counter = field(default_factory=Counter)
    prompt_lengths: list[int] = field(default_factory=list)
    response_lengths: list[int] = field(default_factory=list)
    total_lengths: list[int] = field(default_factory=list)
    full_lengths: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def add(self, example: dict[str, Any]) -> None:
        """Count one encoded example: a dict with ``input_ids``, ``style``, ``prompt_tokens``,
        ``response_tokens``, ``cut_tokens`` and optionally ``full_tokens`` (as
        :meth:`core.task.response_encoder.ResponseEncoder.encode` returns)."""
        self.styles[example["style"]] += 1
        self.prompt_lengths.append(example["prompt_tokens"])
        self.response_lengths.append(example["response_tokens"])
        self.total_lengths.append(len(example["input_ids"]))
        self.full_lengths.append(example.get("full_tokens", len(example["input_ids"])))
        if example["cut_tokens"]:
            self.truncated_samples += 1
            self.response_tokens_cut += example["cut_tokens"]

    def summary(self, max_length: int) -> dict[str, Any]:
        """Plain-data report: counts, templates, truncation and length percentiles."""
        kept = len(self.total_lengths)
        return {
            "records_read": self.records,
            "samples": kept,
            "bad_records_skipped": self.bad_records_skipped,
            "long_prompts_skipped": self.long_prompts_skipped,
            "truncated_samples": self.truncated_samples,
            "truncated_share": self.truncated_samples / max(kept, 1),
            "response_tokens_cut": self.response_tokens_cut,
            "trained_tokens": int(sum(self.response_lengths)),
            "max_length": max_length,
            "templates": dict(self.styles),
            "lengths": {
                k: length_stats(getattr(self, f"{k}_lengths"))
                for k in ("prompt", "response", "total")
            },
            "problems": self.problems[:20],
        }

    def truncation(self, max_length: int, what: str) -> Truncation:
        """The samples longer than ``max_length`` (``data.max_length``), counted."""
        return Truncation.of(self.full_lengths, max_length, "data.max_length", what)

    def describe(self, name: str) -> str:
        """One log line: samples, skips, truncation, length percentiles."""
        total = self.summary(0)["lengths"]["total"]
        return (
            f"{name}: {len(self.total_lengths)} samples from {self.records} records "
            f"({dict(self.styles)}); skipped {self.bad_records_skipped} bad, "
            f"{self.long_prompts_skipped} with too-long prompts; {self.truncated_samples} "
            f"responses truncated ({self.response_tokens_cut} response tokens cut); tokens p50 "
            f"{total.get('p50', 0):.0f}, p90 {total.get('p90', 0):.0f}, max {total.get('max', 0)}"
        )

    def log(self, split: str, max_length: int, logger: logging.Logger) -> None:
        """Log :meth:`describe`, a warning on cut responses and the first 5 skipped records."""
        logger.info("%s", self.describe(split))
        if self.truncated_samples:
            logger.warning(
                "%s: %d of %d responses were cut at data.max_length=%d (%d response tokens "
                "lost); raise data.max_length to keep them",
                split,
                self.truncated_samples,
                len(self.total_lengths),
                max_length,
                self.response_tokens_cut,
            )
        for problem in self.problems[:5]:
            logger.warning("%s: skipped: %s", split, problem)


if __name__ == "__main__":  # self-check: python -m core.task.encode_report
    stats = EncodeStats(records=4, bad_records_skipped=1, problems=["x:3: bad"])
    for prompt, response, cut in ((5, 3, 0), (6, 2, 4), (4, 9, 0)):
        ids = [0] * (prompt + response)
        example = {"input_ids": ids, "style": "alpaca", "prompt_tokens": prompt}
        stats.add(example | {"response_tokens": response, "cut_tokens": cut})
    report = stats.summary(10)
    assert report["samples"] == 3 and report["truncated_samples"] == 1, report
    assert report["trained_tokens"] == 14 and report["lengths"]["total"]["max"] == 13, report
    print(stats.describe("train"))
    assert stats.truncation(10, "samples").cut == 1
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    stats.log("train", 10, logging.getLogger("encode_report"))
    print("core.task.encode_report: ok")
