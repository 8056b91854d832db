"""Prompt + response -> ``input_ids`` / ``labels`` for decoder-only fine-tuning, loss on the
response only.

A task says how a record is written as text pieces, each trained or not (:meth:`segments`: an
instruction template and its answer, or a chat rendered turn by turn with
:func:`core.task.chat.template_pieces`); :class:`ResponseEncoder` tokenizes each piece apart (so
the boundary between masked and trained tokens is exact and inference sees the training prompt),
adds BOS the way the tokenizer itself would and EOS after the response (trained), and fits the
sample into ``max_length``: a prompt over ``prompt_limit`` is cut to its start and its last
``PROMPT_TAIL`` tokens, a too-long response loses its end (counted), and a prompt that leaves under
``min_response_tokens`` raises :class:`PromptTooLong`.

Self-check: ``python -m core.task.response_encoder``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from core.errors import UserError
from core.task.base import IGNORE_INDEX
from core.task.encode_report import EncodeStats
from core.task.truncation import cut_ids

PROMPT_TAIL = 32
"""Tokens a cut prompt keeps from its end: the template's closing part (``### Response:``, a chat
generation prompt) and the last words before it, so the model still answers."""


class PromptTooLong(ValueError):
    """A prompt that leaves no room for the response within ``max_length``."""


class ResponseEncoder:
    """Turns records into ``input_ids`` / ``labels``; a task subclasses it with :meth:`segments`
    (and :meth:`style` when it has several templates). A record has a ``source`` (``file:line``)
    and, when pre-tokenized, ``input_ids`` / ``labels`` (not None).

    Args:
        tokenizer: a Hugging Face tokenizer (pad token set).
        max_length: longest sequence (``data.max_length``).
        min_response_tokens: response room a prompt must leave (``data.min_response_tokens``).
        train_on_prompt: labels on the prompt tokens too.
    """

    no_response: type[Exception] = ValueError
    """The error raised for a record without response tokens (a task's bad-record class)."""

    def __init__(
        self,
        tokenizer: Any,
        max_length: int = 512,
        min_response_tokens: int = 8,
        train_on_prompt: bool = False,
    ) -> None:
        """See the class docstring; decides once whether the tokenizer adds BOS by itself."""
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.min_response_tokens = min_response_tokens
        self.train_on_prompt = train_on_prompt
        # Set by infer / evaluate: prompts are cut to this many tokens (start + PROMPT_TAIL)
        # instead of being refused; None: training's policy.
        self.prompt_limit: int | None = None
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise UserError(
                "The tokenizer has no EOS token; the model could never learn to stop. Choose a "
                "tokenizer with one (model.tokenizer)."
            )
        bos = tokenizer.bos_token_id
        # Does the tokenizer add BOS by itself (Llama) or not (GPT-2)? Prompts get it the same way.
        self.add_bos = (
            bos is not None
            and tokenizer.encode("a", add_special_tokens=True)[:1] == [bos]
            and tokenizer.encode("a", add_special_tokens=False)[:1] != [bos]
        )

    def segments(self, record: Any) -> list[tuple[str, bool]]:
        """The record's text as ``(text, trained)`` pieces; the task defines it."""
        raise NotImplementedError

    def style(self, record: Any) -> str:
        """The template's name, counted in the data report; ``chat``: the pieces bring their
        own special tokens (no BOS added)."""
        return "text"

    def tokens(self, record: Any) -> tuple[list[int], list[bool]]:
        """``(ids, trained)``: a record's token ids and whether each is trained (response +
        EOS), two lists of length ``seq``."""
        ids: list[int] = []
        trained: list[bool] = []
        if self.add_bos and self.style(record) != "chat":
            ids.append(self.tokenizer.bos_token_id)
            trained.append(False)
        pieces = self.segments(record)
        for text, is_trained in pieces:
            piece = self.tokenizer.encode(text, add_special_tokens=False)
            ids += piece
            trained += [is_trained] * len(piece)
        # EOS ends every response and is trained; a chat template's turn may already end with it.
        if pieces and pieces[-1][1] and ids[-1] != self.eos_id:
            ids.append(self.eos_id)
            trained.append(True)
        return ids, trained

    def labelled(self, record: Any) -> tuple[list[int], list[int], list[bool], str]:
        """``(ids, labels, trained, style)`` of the whole record: labels ``-100`` on untrained
        tokens (unless ``train_on_prompt``), ``trained`` marks the response tokens."""
        if getattr(record, "input_ids", None) is not None:
            labels = list(record.labels)
            return list(record.input_ids), labels, [t != IGNORE_INDEX for t in labels], "tokenized"
        ids, trained = self.tokens(record)
        labels = [
            t if (keep or self.train_on_prompt) else IGNORE_INDEX for t, keep in zip(ids, trained)
        ]
        return ids, labels, trained, self.style(record)

    def cut_prompt(
        self, ids: list[int], labels: list[int], trained: list[bool], prompt_tokens: int
    ) -> tuple[list[int], list[int], list[bool], int]:
        """``(ids, labels, trained, prompt_tokens)`` with a prompt over ``prompt_limit`` (or the
        response's room) cut to its start and its last ``PROMPT_TAIL`` tokens."""
        room = min(self.prompt_limit, self.max_length - self.min_response_tokens)
        if prompt_tokens <= room:
            return ids, labels, trained, prompt_tokens
        keep = cut_ids(range(prompt_tokens), room, PROMPT_TAIL)
        keep += range(prompt_tokens, len(ids))
        pick = [ids[i] for i in keep], [labels[i] for i in keep], [trained[i] for i in keep]
        return *pick, room

    def encode(self, record: Any) -> dict[str, Any]:
        """``input_ids`` / ``labels`` for training, truncated to ``max_length``.

        Returns:
            ``{"input_ids", "labels"}`` (lists of length ``seq <= max_length``; labels ``-100`` on
            untrained tokens), ``"source"``, ``"style"``, ``"prompt_tokens"`` (before the first
            trained token), ``"response_tokens"`` (trained tokens kept), ``"cut_tokens"``
            (trained tokens removed by truncation) and ``"full_tokens"`` (length before cutting).

        Raises:
            PromptTooLong: the prompt leaves fewer than ``min_response_tokens`` tokens.
            ValueError: the response has no tokens.
        """
        ids, labels, trained, style = self.labelled(record)
        if not any(trained):
            raise self.no_response(f"{record.source}: the response has no tokens.")
        prompt_tokens = trained.index(True)
        full_tokens = len(ids)
        cut = 0
        if self.prompt_limit is not None:
            ids, labels, trained, prompt_tokens = self.cut_prompt(
                ids, labels, trained, prompt_tokens
            )
        if len(ids) > self.max_length:
            if prompt_tokens > self.max_length - self.min_response_tokens:
                raise PromptTooLong(
                    f"{record.source}: the prompt has {prompt_tokens} tokens, which leaves fewer "
                    f"than data.min_response_tokens={self.min_response_tokens} of "
                    f"data.max_length={self.max_length} for the response."
                )
            cut = sum(trained[self.max_length :])
            ids, labels, trained = (x[: self.max_length] for x in (ids, labels, trained))
        return {
            "input_ids": ids,
            "labels": labels,
            "source": record.source,
            "style": style,
            "prompt_tokens": prompt_tokens,
            "response_tokens": sum(trained),
            "cut_tokens": cut,
            "full_tokens": full_tokens,
        }


def encode_records(
    records: Sequence[Any],
    encoder: ResponseEncoder,
    long_prompts: str = "error",
    problems: Sequence[str] = (),
) -> tuple[list[dict[str, Any]], EncodeStats]:
    """``(examples, stats)`` of ``records`` (``encoder.encode`` each) under the too-long-prompt
    policy ``long_prompts`` (``error``: ``UserError``; ``skip``: counted); ``problems`` (bad records
    skipped while reading) count in the stats. A record the encoder finds bad
    (``encoder.no_response``) is a ``UserError``."""
    stats = EncodeStats(
        records=len(records) + len(problems),
        bad_records_skipped=len(problems),
        problems=list(problems),
    )
    examples = []
    for record in records:
        try:
            example = encoder.encode(record)
        except PromptTooLong as err:
            if long_prompts == "error":
                raise UserError(
                    f"Prompt too long: {err} Raise data.max_length, shorten the record, or set "
                    "data.long_prompts=skip to leave such records out (they are counted)."
                ) from None
            stats.long_prompts_skipped += 1
            stats.problems.append(str(err))
            continue
        except encoder.no_response as err:
            raise UserError(f"Bad record: {err}") from None
        stats.add(example)
        examples.append(example)
    return examples, stats


if __name__ == "__main__":  # self-check: python -m core.task.response_encoder
    from types import SimpleNamespace

    from core.task.wordlevel import word_tokenizer

    class Pairs(ResponseEncoder):
        """Prompt ``Q <q> A`` then the answer."""

        def segments(self, record: Any) -> list[tuple[str, bool]]:
            return [(f"Q {record.q} A", False), (record.a, True)]

    words = ["Q A", "one two three four five six seven eight yes no"]
    tok = word_tokenizer(words, {"pad_token": "<pad>", "unk_token": "<unk>", "eos_token": "</s>"})
    enc = Pairs(tok, max_length=8, min_response_tokens=2)
    short = enc.encode(SimpleNamespace(source="x:1", q="one", a="yes"))
    assert short["labels"][: short["prompt_tokens"]] == [IGNORE_INDEX] * short["prompt_tokens"]
    assert short["labels"][-1] == tok.eos_token_id and short["cut_tokens"] == 0, short
    long = enc.encode(SimpleNamespace(source="x:2", q="one", a="yes no yes no yes no"))
    assert len(long["input_ids"]) == 8 and long["cut_tokens"] == long["full_tokens"] - 8, long
    try:
        enc.encode(SimpleNamespace(source="x:3", q="one two three four five six", a="yes"))
    except PromptTooLong as err:
        print("refused:", err)
    else:
        raise AssertionError("a prompt without room for the response must be refused")
    over = SimpleNamespace(source="x:5", q="one two three four five six", a="yes")
    examples, stats = encode_records(
        [over, SimpleNamespace(source="x:6", q="one", a="no")], enc, "skip"
    )
    assert len(examples) == 1 and stats.long_prompts_skipped == 1 and stats.records == 2
    print(stats.describe("demo"))
    enc.prompt_limit = 3
    cut = enc.encode(SimpleNamespace(source="x:4", q="one two three four five six", a="yes"))
    assert cut["prompt_tokens"] == 3 and cut["full_tokens"] > 8, cut
    print("core.task.response_encoder: ok")
