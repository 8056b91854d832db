"""Instruction and chat records -> token sequences whose loss covers only the response.

Reading (:func:`read_records`): instruction, chat or pre-tokenized records (the forms of
``data.train_files``). Encoding (:class:`Encoder`): the prompt (Alpaca template, in English or
Korean, or the chat template) and the response as pieces for core's
:mod:`core.task.response_encoder` (labels, truncation, the ``EncodeStats`` report); batching is
core's :mod:`core.task.batching`.

Self-check: ``python -m lora_llm.data``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from core.errors import UserError
from core.task.base import IGNORE_INDEX
from core.task.batching import TokenDataset
from core.task.chat import template_pieces
from core.task.response_encoder import PROMPT_TAIL, ResponseEncoder, encode_records
from core.task.truncation import cut_ids
from lora_llm.config import DataConfig

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
SAMPLES = {"en": ASSETS / "alpaca_en_sample.json", "ko": ASSETS / "ko_instructions.jsonl"}
"""Shipped data, named ``sample:<key>`` in ``data.train_files``."""

PROMPTS = {
    "alpaca": {
        "input": (
            "Below is an instruction that describes a task, paired with an input that provides "
            "further context. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        ),
        "no_input": (
            "Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Response:\n"
        ),
    },
    "alpaca_ko": {
        "input": (
            "아래는 작업을 설명하는 지시문과 추가 맥락을 제공하는 입력이 짝을 이룬 예시입니다. "
            "요청을 적절히 완료하는 응답을 작성하세요.\n\n"
            "### 지시문:\n{instruction}\n\n### 입력:\n{input}\n\n### 응답:\n"
        ),
        "no_input": (
            "아래는 작업을 설명하는 지시문입니다. 요청을 적절히 완료하는 응답을 작성하세요.\n\n"
            "### 지시문:\n{instruction}\n\n### 응답:\n"
        ),
    },
}
"""The Stanford Alpaca prompt (with and without an input) and the same prompt in Korean."""

BUILTIN_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{{ '### ' + message['role'] | capitalize + ':\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\n### Assistant:\\n' }}{% endif %}"
)
"""Chat template for tokenizers without one (GPT-2, Phi-2, the tiny model): plain ``### Role:``
headers, each assistant turn ends with EOS. It is saved with the adapter's tokenizer."""

ROLES = ("system", "user", "assistant")
_HANGUL = re.compile(r"[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")
_LETTER = re.compile(r"[^\W\d_]")


@dataclass
class Record:
    """One record, normalised: ``source`` (``file:line``), an instruction record's fields
    (``output`` empty for inference prompts), a chat record's ``messages`` or a pre-tokenized
    record's ``input_ids`` / ``labels``."""

    source: str
    instruction: str = ""
    input: str = ""
    output: str = ""
    messages: list[dict[str, str]] | None = None
    input_ids: list[int] | None = None
    labels: list[int] | None = None

    @property
    def kind(self) -> str:
        """``instruction``, ``chat`` or ``tokenized``."""
        if self.input_ids is not None:
            return "tokenized"
        return "chat" if self.messages is not None else "instruction"


class BadRecord(ValueError):
    """A record that cannot be used (the message says what is wrong and where)."""


def is_korean(text: str) -> bool:
    """True when at least 30% of the letters of ``text`` are Hangul."""
    letters = _LETTER.findall(text)
    return bool(letters) and len(_HANGUL.findall(text)) >= 0.3 * len(letters)


def parse_record(obj: Any, source: str, for_inference: bool = False) -> Record:
    """The :class:`Record` of one decoded JSON value (or dataset row) from ``source``;
    ``for_inference``: no response needed. Raises ``BadRecord`` (wrong type, missing or non-text
    fields, empty output, bad roles)."""
    if not isinstance(obj, dict):
        raise BadRecord(f"{source}: a record must be a JSON object, got {type(obj).__name__}.")
    if "input_ids" in obj:
        return _parse_tokenized(obj, source)
    if "messages" in obj:
        return _parse_chat(obj, source, for_inference)
    required = ("instruction",) if for_inference else ("instruction", "output")
    missing = [k for k in required if k not in obj]
    if missing:
        raise BadRecord(
            f"{source}: the record has no {' / '.join(repr(m) for m in missing)} field (its keys: "
            f"{', '.join(map(str, obj)) or 'none'}). "
            "Instruction records need 'instruction' and 'output' (optionally 'input'); chat "
            "records need 'messages'."
        )
    fields = {}
    for key in ("instruction", "input", "output"):
        value = "" if obj.get(key) is None else obj[key]
        if not isinstance(value, str):
            raise BadRecord(
                f"{source}: '{key}' must be text, got {type(value).__name__} ({str(value)[:40]!r})."
            )
        fields[key] = value
    if not fields["instruction"].strip():
        raise BadRecord(f"{source}: 'instruction' is empty.")
    if not for_inference and not fields["output"].strip():
        raise BadRecord(f"{source}: 'output' is empty, so there is no response to train on.")
    return Record(source=source, **fields)


def _parse_chat(obj: dict[str, Any], source: str, for_inference: bool) -> Record:
    """Check a chat record's ``messages`` (see :func:`parse_record`)."""
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise BadRecord(
            f"{source}: 'messages' must be a non-empty list of {{'role', 'content'}} objects."
        )
    clean = []
    for i, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("content"), str)
            or message.get("role") not in ROLES
        ):
            raise BadRecord(
                f"{source}: message {i} must be an object with 'role' (one of {', '.join(ROLES)}) "
                f"and text 'content', got {str(message)[:60]!r}."
            )
        clean.append({"role": message["role"], "content": message["content"]})
    if for_inference:
        if clean[-1]["role"] == "assistant":
            raise BadRecord(
                f"{source}: the last message is the assistant's; for generation it must be a user "
                "message."
            )
        return Record(source=source, messages=clean)
    if clean[-1]["role"] != "assistant":
        raise BadRecord(
            f"{source}: the last message must be the assistant's answer (the part that is "
            f"trained), got '{clean[-1]['role']}'."
        )
    empty = [
        i for i, m in enumerate(clean) if m["role"] == "assistant" and not m["content"].strip()
    ]
    if empty:
        raise BadRecord(
            f"{source}: assistant message {empty[0]} is empty, so there is nothing to train on."
        )
    return Record(source=source, messages=clean)


def _parse_tokenized(obj: dict[str, Any], source: str) -> Record:
    """Check a pre-tokenized record (see :func:`parse_record`)."""
    ids, labels = obj.get("input_ids"), obj.get("labels")
    if (
        not isinstance(ids, list)
        or not isinstance(labels, list)
        or len(ids) != len(labels)
        or not ids
    ):
        raise BadRecord(
            f"{source}: a pre-tokenized record needs 'input_ids' and 'labels' lists of the same, "
            "non-zero length."
        )
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids + labels):
        raise BadRecord(f"{source}: 'input_ids' and 'labels' must hold integers only.")
    if all(t == IGNORE_INDEX for t in labels):
        raise BadRecord(
            f"{source}: every label is {IGNORE_INDEX}, so there is nothing to train on."
        )
    return Record(source=source, input_ids=ids, labels=labels)


def resolve_spec(spec: str) -> Path | str:
    """``sample:<name>`` -> the shipped file; an existing path -> Path; anything else stays a
    dataset id. ``UserError``: an unknown sample, or what looks like a missing local file."""
    if spec.startswith("sample:"):
        key = spec.split(":", 1)[1]
        if key not in SAMPLES:
            raise UserError(
                f"Unknown shipped sample '{spec}'; the package ships "
                f"{', '.join('sample:' + k for k in SAMPLES)}."
            )
        return SAMPLES[key]
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if (
        path.suffix.lower() in (".json", ".jsonl")
        or spec.startswith((".", "/", "~"))
        or "\\" in spec
    ):
        raise UserError(
            f"Data file '{spec}' (data.train_files / data.val_files) does not exist. Give an "
            "existing .jsonl / .json file."
        )
    return spec


def read_records(
    spec: str, cfg: DataConfig, for_inference: bool = False, key: str = "data.train_files"
) -> tuple[list[Record], list[str]]:
    """``(records, problems)`` of one source ``spec`` (named by ``key``): the good records, and
    one message per bad one skipped (``UserError`` instead under ``data.on_bad_record=error``)."""
    from core.task.records import BadJSON, iter_source

    records, problems = [], []
    # Malformed lines come back as BadJSON, so they get the same hint (or skip) as bad records.
    for raw in iter_source(
        resolve_spec(spec), key, split=cfg.hf_split, subset=cfg.hf_subset, on_bad="keep"
    ):
        try:
            if isinstance(raw.value, BadJSON):
                raise BadRecord(raw.value.message)
            records.append(parse_record(raw.value, raw.where, for_inference))
        except BadRecord as err:
            if cfg.on_bad_record == "error" or for_inference:
                raise UserError(
                    f"Bad record in {err} Fix the record, or set data.on_bad_record=skip to leave "
                    "such records out (they are counted)."
                ) from None
            problems.append(str(err))
    return records, problems


def reference_text(record: Record) -> str:
    """The response a record trains: ``output``, or its last assistant message's content."""
    if record.messages is not None:
        return next(
            (m["content"] for m in reversed(record.messages) if m.get("role") == "assistant"), ""
        )
    return record.output


def without_answer(record: Record) -> Record:
    """The record as a prompt: a chat record without its last assistant message."""
    if record.messages and record.messages[-1].get("role") == "assistant":
        return Record(source=record.source, messages=record.messages[:-1])
    return record


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer brings its own chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


class Encoder(ResponseEncoder):
    """Records -> ``input_ids`` / ``labels`` (:class:`core.task.response_encoder.ResponseEncoder`,
    whose arguments it takes, with a tokenizer whose pad token is set) and prompts -> ids for
    generation. ``template``: ``data.template``. ``chat_source``: where the chat template comes
    from, ``tokenizer`` or ``builtin`` (None: ``tokenizer`` when it has one); inference passes
    what training used (an adapter's tokenizer has the built-in template, but ``auto`` must still
    pick its Alpaca prompt)."""

    no_response = BadRecord

    def __init__(
        self,
        tokenizer: Any,
        template: str = "auto",
        max_length: int = 512,
        min_response_tokens: int = 8,
        train_on_prompt: bool = False,
        chat_source: str | None = None,
    ) -> None:
        super().__init__(tokenizer, max_length, min_response_tokens, train_on_prompt)
        self.template = template
        self.chat_source = chat_source or (
            "tokenizer" if has_chat_template(tokenizer) else "builtin"
        )

    def style(self, record: Record) -> str:
        """The template a record uses: ``alpaca``, ``alpaca_ko`` or ``chat``."""
        if record.kind == "chat" or self.template == "chat":
            return "chat"
        if self.template == "auto":
            if self.chat_source == "tokenizer":
                return "chat"
            return "alpaca_ko" if is_korean(record.instruction + " " + record.input) else "alpaca"
        return self.template

    def render_chat(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        """The chat template's text for ``messages`` (the built-in one when the tokenizer has
        none: it is installed on the tokenizer)."""
        if not has_chat_template(self.tokenizer):
            self.tokenizer.chat_template = BUILTIN_CHAT_TEMPLATE
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def messages_of(self, record: Record) -> list[dict[str, str]]:
        """Chat turns of a record (an instruction record becomes one user turn + the answer)."""
        if record.messages is not None:
            return record.messages
        user = record.instruction + (f"\n\n{record.input}" if record.input.strip() else "")
        turns = [{"role": "user", "content": user}]
        if record.output:
            turns.append({"role": "assistant", "content": record.output})
        return turns

    def segments(self, record: Record) -> list[tuple[str, bool]]:
        """The record's text as ``(text, trained)`` pieces (chat: every assistant turn trained);
        ``BadRecord`` for a chat template that does not render turn by turn."""
        style = self.style(record)
        if style != "chat":
            prompt = PROMPTS[style]["input" if record.input.strip() else "no_input"].format(
                instruction=record.instruction, input=record.input
            )
            return [(prompt, False)] + ([(record.output, True)] if record.output else [])
        pieces = template_pieces(self.render_chat, self.messages_of(record))
        if pieces is None:
            raise BadRecord(
                f"{record.source}: the chat template does not render this conversation turn "
                "by turn; use data.template=alpaca."
            )
        return pieces

    def prompt_ids(self, record: Record, cut: bool = True) -> list[int]:
        """Token ids of the prompt to generate from (a record without output / final answer),
        cut to ``prompt_limit`` when it is set (and ``cut``)."""
        ids, _ = self.tokens(replace(record, output=""))
        if cut and self.prompt_limit is not None:
            ids = cut_ids(ids, self.prompt_limit, PROMPT_TAIL)
        return ids


class SFTDataset(TokenDataset):
    """Encoded examples (dicts from :meth:`Encoder.encode`, kept as ``examples`` for ``prepare``).
    Item: ``{"index": int, "input_ids": list[int], "labels": list[int]}``."""

    def __init__(self, examples: list[dict[str, Any]]) -> None:
        super().__init__([e["input_ids"] for e in examples], [e["labels"] for e in examples])
        self.examples = examples


if __name__ == "__main__":  # self-check: python -m lora_llm.data
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSETS / "tiny_tokenizer")
    en, ko = (read_records(f"sample:{k}", DataConfig())[0] for k in ("en", "ko"))
    encoder = Encoder(tok, max_length=128)
    examples, stats = encode_records(en[:40] + ko[:10], encoder, long_prompts="skip")
    print(stats.describe("sample"))
    first = examples[-1]
    prompt, trained = first["prompt_tokens"], [t for t in first["labels"] if t != IGNORE_INDEX]
    print("ko prompt:", repr(tok.decode(first["input_ids"][:prompt])[-40:]))
    print("ko trained:", repr(tok.decode(trained)))
    assert trained[-1] == tok.eos_token_id and first["labels"][:prompt] == [IGNORE_INDEX] * prompt
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    ids, flags = encoder.tokens(Record(source="demo", messages=turns))
    answer = tok.decode([t for t, f in zip(ids, flags) if f])
    assert answer == "Hello!" + tok.eos_token, answer
    print("lora_llm.data: ok")
