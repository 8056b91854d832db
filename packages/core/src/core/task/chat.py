"""Conversation records: turns in either common layout, and labels on the assistant answers only.

Layouts (:class:`ChatReader`):

- **messages** (OpenAI / Qwen / ShareGPT-with-roles): ``{"messages": [{"role": "user",
  "content": [{"type": "image", "image": "img.png"}, {"type": "text", "text": "How many?"}]},
  {"role": "assistant", "content": "3"}]}``; ``content`` is a string or a list of parts.
- **LLaVA**: ``{"image": "img.png" (or "images": [...]), "conversations": [{"from": "human",
  "value": "<image>\\nHow many?"}, {"from": "gpt", "value": "3"}]}``; each ``<image>``
  placeholder takes the next image.

Both become messages ``[{"role": "system"|"user"|"assistant", "content": [part, ...]}]`` with
text parts ``{"type": "text", "text": str}`` and image parts made by the caller (it resolves the
reference). :func:`up_to_last_answer` checks what training needs (one system turn at most and
first, an assistant turn, every answer non-empty text).

Labels: :func:`assistant_spans` / :func:`build_labels` find the answers in the token ids by the
assistant header's token *sequence*, through the end-of-turn token, which is trained;
:func:`template_pieces` marks them in the text instead, rendering the chat template turn by turn.

Self-check: ``python -m core.task.chat``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from core.errors import UserError
from core.task.base import IGNORE_INDEX

ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
}
"""Accepted role names (``role`` or LLaVA ``from``) and what they mean."""
LLAVA_IMAGE = "<image>"
"""The LLaVA image placeholder."""


def record_name(rid: str, where: str, has_id: bool) -> str:
    """How messages name a record: ``record 'ID' (file:line)``, or ``record at file:line``."""
    return f"record {rid!r} ({where})" if has_id else f"record at {where}"


@dataclass
class ChatReader:
    """Reads the turns of one record into messages (see the module docstring).

    Attributes:
        name: the record, for messages (:func:`record_name`).
        add_image: registers an image reference and returns its image part.
        forbidden: tokens no text may spell out (a model's vision tokens: their count would no
            longer match the record's images).
    """

    name: str
    add_image: Callable[[Any], dict[str, Any]]
    forbidden: Sequence[str] = ()

    def check_text(self, text: str, turn: int) -> str:
        """``text``, refused when it holds a forbidden token."""
        for token in self.forbidden:
            if token in text:
                raise UserError(
                    f"{self.name}: turn {turn} contains the vision token {token} in its text, so "
                    "its image-token count "
                    "would not match the record's images. Put images in image parts (or LLaVA "
                    "<image> placeholders) instead."
                )
        return text

    def value(self, content: Any, turn: int) -> str:
        """The text of a LLaVA ``value`` (it must be a string)."""
        if not isinstance(content, str):
            raise UserError(
                f"{self.name}: turn {turn} must have a string 'value', got "
                f"{type(content).__name__}."
            )
        return content

    def role(self, turn: Any, t: int, keys: tuple[str, str], fields: str) -> str:
        """The normalised role of turn ``t``, read from the first of ``keys`` present.

        Raises:
            UserError: the turn is not an object, or its role is unknown.
        """
        if not isinstance(turn, dict):
            raise UserError(f"{self.name}: turn {t} must be an object with {fields}.")
        key = keys[0] if keys[0] in turn else keys[1]
        given = turn.get(key)
        role = ROLES.get(str(given if given is not None else "").lower())
        if role is None:
            raise UserError(
                f"{self.name}: turn {t} has role {given!r} (its '{key}'); use one of "
                f"{sorted(set(ROLES))}."
            )
        return role

    def parts(self, content: Any, t: int) -> list[dict[str, Any]]:
        """Content parts of a ``messages`` turn: a string, or a list of text / image parts.

        Raises:
            UserError: videos, image parts without a path, unknown part types, forbidden tokens.
        """
        name = self.name
        if isinstance(content, str):
            return [{"type": "text", "text": self.check_text(content, t)}]
        if not isinstance(content, list):
            raise UserError(f"{name}: turn {t} needs 'content' as a string or a list of parts.")
        parts: list[dict[str, Any]] = []
        for part in content:
            part = {"type": "text", "text": part} if isinstance(part, str) else part
            if not isinstance(part, dict):
                raise UserError(
                    f"{name}: turn {t} has a content part that is neither text nor an object: "
                    f"{part!r}."
                )
            kind = part.get("type")
            if kind == "video" or "video" in part:
                raise UserError(
                    f"{name}: turn {t} has a video; this package trains on images and text only."
                )
            if kind in ("image", "image_url") or "image" in part or "image_url" in part:
                if "image" not in part and "image_url" not in part:
                    raise UserError(f"{name}: turn {t} has an image part without an 'image' path.")
                parts.append(self.add_image(part.get("image", part.get("image_url"))))
            elif "text" in part:
                if not isinstance(part["text"], str):
                    raise UserError(
                        f"{name}: turn {t} has a text part whose 'text' is not a string."
                    )
                parts.append({"type": "text", "text": self.check_text(part["text"], t)})
            else:
                raise UserError(
                    f"{name}: turn {t} has a content part of unknown type {kind!r} (use text or "
                    "image)."
                )
        return parts

    def messages(self, raw: dict[str, Any]) -> list[dict[str, Any]]:
        """Messages of a ``messages`` record.

        Raises:
            UserError: not a non-empty list, a bad turn, or ``image(s)`` next to ``messages``.
        """
        turns = raw["messages"]
        if not isinstance(turns, list) or not turns:
            raise UserError(f"{self.name}: 'messages' must be a non-empty list of turns.")
        messages = []
        for t, turn in enumerate(turns):
            role = self.role(turn, t, ("role", "from"), "'role' and 'content'")
            content = self.parts(turn.get("content", turn.get("value")), t)
            messages.append({"role": role, "content": content})
        unused = [k for k in ("image", "images") if k in raw]
        if unused:
            raise UserError(
                f"{self.name}: has both 'messages' and '{unused[0]}'; put images into the messages "
                "as image parts."
            )
        return messages

    def llava(self, raw: dict[str, Any]) -> list[dict[str, Any]]:
        """Messages of a LLaVA record: each ``<image>`` placeholder takes the next image.

        Raises:
            UserError: not a non-empty list, a bad turn, placeholders that do not match the images.
        """
        turns = raw["conversations"]
        if not isinstance(turns, list) or not turns:
            raise UserError(f"{self.name}: 'conversations' must be a non-empty list of turns.")
        refs = raw.get("images", raw.get("image", []))
        refs = [refs] if isinstance(refs, str) else list(refs or [])
        placeholders = sum(
            self.value(turn.get("value"), t).count(LLAVA_IMAGE)
            for t, turn in enumerate(turns)
            if isinstance(turn, dict)
        )
        if placeholders != len(refs):
            raise UserError(
                f"{self.name}: {placeholders} {LLAVA_IMAGE} placeholder(s) in the text but "
                f"{len(refs)} image(s); "
                f"every image needs exactly one {LLAVA_IMAGE} where it belongs."
            )
        pending = iter(refs)
        messages = []
        for t, turn in enumerate(turns):
            role = self.role(turn, t, ("from", "role"), "'from' and 'value'")
            parts = []
            for k, piece in enumerate(
                self.check_text(self.value(turn.get("value"), t), t).split(LLAVA_IMAGE)
            ):
                if k > 0:
                    parts.append(self.add_image(next(pending)))
                # LLaVA puts "<image>\n" before the question: the newline belongs to the image
                piece = piece[1:] if k > 0 and piece.startswith("\n") else piece
                if piece:
                    parts.append({"type": "text", "text": piece})
            messages.append({"role": role, "content": parts})
        return messages

    def read(self, raw: dict[str, Any]) -> list[dict[str, Any]]:
        """Messages of a record in either layout.

        Raises:
            UserError: neither ``messages`` nor ``conversations``, or a bad turn.
        """
        if "messages" in raw:
            return self.messages(raw)
        if "conversations" in raw:
            return self.llava(raw)
        raise UserError(
            f"{self.name}: needs 'messages' (role/content turns) or 'conversations' (LLaVA "
            "from/value turns)."
        )


def up_to_last_answer(
    messages: list[dict[str, Any]], images: list[Any], name: str
) -> tuple[list[dict[str, Any]], list[Any]]:
    """The turns through the last assistant turn (and their images), checked: one system turn
    at most and first, at least one assistant turn, every assistant turn text without images.

    Raises:
        UserError: a misplaced system turn, no assistant turn, an empty answer or one with an image.
    """
    for t, message in enumerate(messages):
        if message["role"] == "system" and t > 0:
            raise UserError(f"{name}: turn {t} is a system turn; only the first turn may be one.")
    last = max((t for t, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise UserError(
            f"{name}: has no assistant turn, so there is nothing to train on; add the expected "
            "answer as an assistant turn."
        )
    dropped = messages[last + 1 :]
    messages = messages[: last + 1]
    used = {p["image"] for m in messages for p in m["content"] if p["type"] == "image"}
    if dropped and len(used) != len(images):
        images = images[: len(used)]  # images of dropped trailing turns
    for t, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if any(p["type"] == "image" for p in message["content"]):
            raise UserError(
                f"{name}: assistant turn {t} contains an image; images belong in user (or system) "
                "turns."
            )
        if not "".join(p["text"] for p in message["content"]).strip():
            raise UserError(
                f"{name}: assistant turn {t} is empty; every assistant turn is trained and needs "
                "text."
            )
    return messages, images


def map_images(
    messages: list[dict[str, Any]], image: Callable[[dict[str, Any]], dict[str, Any]]
) -> list[dict[str, Any]]:
    """A copy of ``messages`` (content as lists of parts) with every image part replaced by
    ``image(part)`` (a decoded image, or a bare ``{"type": "image"}`` for the chat template)."""
    return [
        {
            "role": m["role"],
            "content": [image(p) if p["type"] == "image" else p for p in m["content"]],
        }
        for m in messages
    ]


def template_pieces(
    render: Callable[[list[dict[str, Any]], bool], str], messages: list[dict[str, Any]]
) -> list[tuple[str, bool]] | None:
    """A conversation's text through a chat template, as ``(text, trained)`` pieces.

    Every assistant turn is one trained piece: the text the template adds for that turn after
    the generation prompt (the answer and the template's end-of-turn marker); the rest is
    untrained. A conversation that does not end with an answer (a prompt) ends with the
    generation prompt.

    Args:
        render: ``render(messages, generation_prompt)`` -> the template's text.
        messages: ``[{"role", "content"}, ...]``.

    Returns:
        The pieces, or None when the template does not render the conversation turn by turn
        (each shorter conversation's text a prefix of the longer one's).
    """
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:i], True)
        full = render(messages[: i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            return None
        pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    if messages[-1]["role"] != "assistant":  # a prompt: end with the generation prompt
        pieces.append((render(messages, True)[len(done) :], False))
    return pieces


def find_sequence(ids: Sequence[int], pattern: Sequence[int], start: int = 0) -> int:
    """Index of the first occurrence of ``pattern`` in ``ids`` at or after ``start``; -1 if none."""
    n = len(pattern)
    first = pattern[0]
    for i in range(start, len(ids) - n + 1):
        if ids[i] == first and list(ids[i : i + n]) == list(pattern):
            return i
    return -1


def assistant_spans(
    ids: Sequence[int], header: Sequence[int], end_id: int
) -> list[tuple[int, int]]:
    """Token ranges of the assistant answers: after each assistant header, through the next
    end-of-turn.

    Args:
        ids: token ids of a whole conversation, length ``L``.
        header: token ids of the assistant header (Qwen: ``<|im_start|>assistant\\n``; a
            sequence: ``<|im_start|>`` alone also opens user turns, and ``assistant`` can appear
            in any text).
        end_id: id of the end-of-turn token (Qwen: ``<|im_end|>``).

    Returns:
        ``[(start, stop), ...]``: ``ids[start:stop]`` is an answer *including* its end-of-turn
        (``stop`` is ``L`` for an unterminated last answer).
    """
    spans = []
    pos = find_sequence(ids, header)
    while pos >= 0:
        start = pos + len(header)
        stop = start
        while stop < len(ids) and ids[stop] != end_id:
            stop += 1
        stop = min(stop + 1, len(ids))  # include the end-of-turn token
        spans.append((start, stop))
        pos = find_sequence(ids, header, stop)
    return spans


def build_labels(
    ids: Sequence[int], spans: Sequence[tuple[int, int]], untrained: set[int]
) -> list[int]:
    """Labels for one conversation: token ids inside the assistant spans, ``IGNORE_INDEX``
    elsewhere.

    Args:
        ids: token ids, length ``L``.
        spans: from :func:`assistant_spans`.
        untrained: ids masked even inside a span (vision tokens).

    Returns:
        ``L`` labels (not shifted: the loss shifts them, as for any causal LM).
    """
    labels = [IGNORE_INDEX] * len(ids)
    for start, stop in spans:
        for i in range(start, stop):
            if ids[i] not in untrained:
                labels[i] = ids[i]
    return labels


if __name__ == "__main__":  # self-check: python -m core.task.chat
    images: list[str] = []

    def add(ref: Any) -> dict[str, Any]:
        images.append(ref)
        return {"type": "image", "image": len(images) - 1}

    reader = ChatReader("record 'r' (d.jsonl:1)", add, forbidden=("<|image_pad|>",))
    llava = reader.read(
        {
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nHow many?"},
                {"from": "gpt", "value": "3"},
                {"from": "human", "value": "Thanks"},
            ],
        }
    )
    messages, kept = up_to_last_answer(llava, images, reader.name)
    assert [m["role"] for m in messages] == ["user", "assistant"] and kept == ["a.png"]
    assert messages[0]["content"][0] == {"type": "image", "image": 0}
    assert map_images(messages, lambda part: {"type": "image"})[0]["content"][0] == {
        "type": "image"
    }
    ids = [1, 7, 5, 9, 2, 1, 7, 6, 2]  # 1 7 = header, 2 = end of turn
    spans = assistant_spans(ids, [1, 7], 2)
    assert spans == [(2, 5), (7, 9)]
    assert build_labels(ids, spans, {9}) == [-100, -100, 5, -100, 2, -100, -100, 6, 2]
    for turns in (
        [{"role": "bot", "content": "x"}],
        [{"role": "user", "content": "<|image_pad|>"}],
    ):
        try:
            reader.read({"messages": turns})
        except UserError as err:
            print("refused:", err)
        else:
            raise AssertionError(f"{turns} must be refused")

    def render(turns: list[dict[str, Any]], generation_prompt: bool) -> str:
        text = "".join(f"<{m['role']}>{m['content']}</>" for m in turns)
        return text + ("<assistant>" if generation_prompt else "")

    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert template_pieces(render, chat) == [("<user>Hi</><assistant>", False), ("Hello</>", True)]
    assert template_pieces(render, chat[:1]) == [("<user>Hi</><assistant>", False)]
    print("core.task.chat: ok")
