"""Inputs longer than a model takes: one limit, cut to it, and one note saying what was cut.

A 200,000-character dialogue or a 50,000-word instruction is a valid input; fed whole, it
allocates tens of GB or runs for minutes, and cut silently it gives an answer to a text the user
never sees. Every task's infer / evaluate / predict path and its training tokenization go
through here:

- :func:`model_limit`: the longest input a model can take (positions of its config, the
  tokenizer's ``model_max_length``), less room reserved for the answer.
- :func:`input_limit`: ``--max-input-tokens N`` if given, else the configured limit, never above
  the model's.
- :func:`length_stats`: percentiles of the lengths of a data set, for its report.
- :class:`Truncation`: counts inputs against the limit (or cuts token lists itself) and gives
  one note: "2 of 50 inputs were longer than 1,024 tokens and were cut (longest: 229,114
  tokens)".

Self-check: ``python -m core.task.truncation``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from core.errors import UserError

POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
"""Model-config attributes that hold the number of positions (the first one present counts)."""

_UNSET_MODEL_MAX = 10**9  # transformers' "no limit" for tokenizer.model_max_length is ~1e30


def model_limit(config: Any = None, tokenizer: Any = None, reserve: int = 0) -> int | None:
    """The longest input, in tokens, a model can take, or None when nothing says.

    Args:
        config: a transformers config (its text part is read for multimodal models).
        tokenizer: a tokenizer (``model_max_length`` counts when set to a real value).
        reserve: tokens kept free for generation (decoder-only models put the answer in the
            same positions as the prompt).

    Returns:
        ``min(positions, model_max_length) - reserve`` (at least 1), or None.
    """
    limits = []
    for cfg in (config, getattr(config, "text_config", None)):
        for key in POSITION_KEYS:
            value = getattr(cfg, key, None) if cfg is not None else None
            if isinstance(value, int) and value > 0:
                limits.append(value)
                break
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < _UNSET_MODEL_MAX:
        limits.append(model_max)
    if not limits:
        return None
    return max(1, min(limits) - reserve)


def input_limit(
    option: int | None,
    configured: int | None,
    hard: int | None,
    configured_key: str = "",
    option_name: str = "--max-input-tokens",
) -> tuple[int | None, str]:
    """The limit to cut inputs to, and where it comes from (for the note).

    Args:
        option: ``--max-input-tokens`` (None: not given).
        configured: the task's configured input length (e.g. ``data.max_source_length``).
        hard: :func:`model_limit` (None: unknown).
        configured_key: the config key of ``configured``, named in the note.
        option_name: the option's name in messages.

    Returns:
        ``(limit or None, origin)``.

    Raises:
        UserError: an option below 1 or above what the model can take.
    """
    if option is not None:
        if option < 1:
            raise UserError(f"{option_name} {option}: give at least 1 token.")
        if hard is not None and option > hard:
            raise UserError(
                f"{option_name} {option} is more than this model takes ({hard:,} tokens, from "
                f"its position count less the tokens to generate); use at most {hard}."
            )
        return option, option_name
    candidates = [(v, k) for v, k in ((configured, configured_key), (hard, "the model's limit"))]
    candidates = [(v, k) for v, k in candidates if v is not None]
    if not candidates:
        return None, ""
    return min(candidates, key=lambda c: c[0])


def add_option(parser: argparse.ArgumentParser, default_help: str) -> None:
    """Add ``--max-input-tokens N`` to a command.

    Args:
        parser: the command's parser.
        default_help: what the limit is when the option is not given.
    """
    parser.add_argument(
        "--max-input-tokens",
        type=int,
        default=None,
        metavar="N",
        help=f"cut each longer input to N tokens (default: {default_help}); "
        "how many were cut is noted once",
    )


def cut_ids(ids: Sequence[Any], limit: int, keep_end: int = 0) -> list[Any]:
    """``ids`` cut to ``limit`` items: the start, and the last ``keep_end`` (at most half).

    Args:
        ids: token ids (or indices of them).
        limit: items kept.
        keep_end: items kept from the end (a prompt template's closing part).
    """
    if len(ids) <= limit:
        return list(ids)
    tail = min(keep_end, limit // 2)
    return list(ids[: limit - tail]) + (list(ids[len(ids) - tail :]) if tail else [])


def length_stats(values: Sequence[int]) -> dict[str, float]:
    """Mean, p50 / p90 / p99 and max of a list of lengths (``{}`` for none), for data reports."""
    import numpy as np

    if not values:
        return {}
    arr = np.asarray(values)
    return {
        "mean": round(float(arr.mean()), 1),
        "p50": float(np.percentile(arr, 50)),
        "p90": float(np.percentile(arr, 90)),
        "p99": float(np.percentile(arr, 99)),
        "max": int(arr.max()),
    }


class Truncation:
    """Counts inputs against a limit and says once how many were cut and by how much.

    Args:
        limit: tokens kept per input (None: no limit; nothing is cut).
        origin: where the limit comes from (``--max-input-tokens``, ``data.max_length``, ...).
        what: the inputs' name in the note (``inputs``, ``dialogues``, ``prompts``, ...).
    """

    def __init__(self, limit: int | None, origin: str = "", what: str = "inputs") -> None:
        self.limit = limit
        self.origin = origin
        self.what = what
        self.total = 0
        self.cut = 0
        self.longest = 0
        self.tokens_cut = 0

    @classmethod
    def of(
        cls, lengths: Sequence[int], limit: int | None, origin: str = "", what: str = "inputs"
    ) -> Truncation:
        """A count of the inputs of ``lengths`` (tokens before cutting); arguments as above."""
        cut = cls(limit, origin, what)
        for length in lengths:
            cut.count(length)
        return cut

    def count(self, length: int) -> int:
        """Count one input of ``length`` tokens.

        Returns:
            The length it keeps (``min(length, limit)``).
        """
        self.total += 1
        if self.limit is not None and length > self.limit:
            self.cut += 1
            self.tokens_cut += length - self.limit
            self.longest = max(self.longest, length)
            return self.limit
        return length

    def apply(self, ids: Sequence[int], keep_end: int = 0) -> list[int]:
        """Count one input and cut it to the limit.

        Args:
            ids: the input's token ids.
            keep_end: tokens kept from the end (a prompt template's closing part, such as the
                "### Response:" header or a chat generation prompt); the rest comes from the start.

        Returns:
            The ids the model sees.
        """
        return cut_ids(ids, self.count(len(ids)), keep_end)

    def note(self) -> str | None:
        """The one-line note, or None when nothing was cut."""
        if not self.cut:
            return None
        origin = f" ({self.origin})" if self.origin else ""
        return (
            f"{self.cut:,} of {self.total:,} {self.what} were longer than {self.limit:,} "
            f"tokens{origin} and were cut to it (longest: {self.longest:,} tokens; "
            f"{self.tokens_cut:,} tokens dropped in all)."
        )

    def report(self, logger: logging.Logger | None = None, enabled: bool = True) -> str | None:
        """Say the note once: on stderr, or as a warning of ``logger``.

        Args:
            logger: a logger (training logs); None: stderr (commands).
            enabled: False on ranks other than 0.

        Returns:
            The note (None when nothing was cut).
        """
        text = self.note()
        if text and enabled:
            if logger is not None:
                logger.warning(text)
            else:
                print(f"Note: {text}", file=sys.stderr)
        return text


if __name__ == "__main__":  # self-check: python -m core.task.truncation
    from types import SimpleNamespace

    bart = SimpleNamespace(max_position_embeddings=1024)
    assert model_limit(bart) == 1024
    assert model_limit(SimpleNamespace(text_config=bart), reserve=24) == 1000
    assert model_limit(None, SimpleNamespace(model_max_length=int(1e30))) is None
    assert input_limit(None, 320, 1024, "data.max_source_length") == (
        320,
        "data.max_source_length",
    )
    assert input_limit(64, 320, 1024) == (64, "--max-input-tokens")
    try:
        input_limit(5000, 320, 1024)
    except UserError as err:
        print("refused:", err)
    else:
        raise AssertionError("a limit above the model's must be refused")
    cut = Truncation.of([10] * 48 + [229_114, 2000], 1024, "the model's limit")
    short = Truncation(4)
    assert short.apply(list(range(3)), keep_end=1) == [0, 1, 2]
    assert short.apply(list(range(10)), keep_end=1) == [0, 1, 2, 9]
    assert length_stats([1, 2, 3, 10])["p50"] == 2.5 and length_stats([]) == {}
    print(cut.note())
    assert cut.note().startswith("2 of 50 inputs were longer than 1,024 tokens")
    print("core.task.truncation: ok")
