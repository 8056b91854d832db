"""Conversation records with images -> token ids, assistant-only labels and pixel patches.

Records (one JSON object per line of a ``.jsonl`` file, or a list in a ``.json`` file) come in
either common layout:

- **messages** (OpenAI / Qwen / ShareGPT-with-roles): ``{"id": ..., "messages": [{"role": "user",
  "content": [{"type": "image", "image": "img.png"}, {"type": "text", "text": "How many?"}]},
  {"role": "assistant", "content": "3"}]}``; ``content`` is a string or a list of parts.
- **LLaVA**: ``{"id": ..., "image": "img.png" (or "images": [...]), "conversations": [{"from":
  "human", "value": "<image>\\nHow many?"}, {"from": "gpt", "value": "3"}]}``; each ``<image>``
  placeholder takes the next image.

Images are local paths (relative to the data file's folder, or absolute), ``file://`` URIs or
``data:image/...;base64,...`` URIs. Records without images (text-only) are fine, also mixed with
image records in one batch.

Pipeline of one record: :func:`parse_record` (structure, roles, images, placeholders) ->
:func:`load_image` (missing / corrupt / oversized files) -> ``qwen_vl_utils.process_vision_info``
and the processor, both with the same ``min_pixels`` / ``max_pixels``, so an image of ``h x w``
pixels always becomes ``(H/28) * (W/28)`` vision tokens where ``(H, W) = smart_resize(h, w)`` ->
:func:`assistant_spans` / :func:`build_labels`: only assistant turns (their text and closing
``<|im_end|>``) are trained; system and user turns and every vision token are ``-100``.

All checks run in :func:`load_conversations`, before training starts; a bad record raises a
``UserError`` naming its id, file and line.

Self-check: ``python -m qwen_vl.data``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

import torch
from PIL import Image
from torch.utils.data import Dataset

from core.errors import UserError
from core.nn.padding import pad_rows
from core.task.base import IGNORE_INDEX

log = logging.getLogger(__name__)

ASSISTANT_HEADER = "<|im_start|>assistant\n"
"""Text that opens an assistant turn; matched as a token *sequence*, never as one token id."""
END_OF_TURN = "<|im_end|>"
"""Token that closes every turn (trained at the end of assistant turns)."""
VISION_TOKENS = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
"""Tokens that belong to images or videos: never trained, never allowed in record text."""
LLAVA_IMAGE = "<image>"
"""The LLaVA image placeholder."""
ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
}
"""Accepted role names (``role`` or LLaVA ``from``) and what they mean."""
DUMMY_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
"""The masked placeholder a batch without images carries for its dummy image (see
:class:`Collator`)."""


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSource:
    """Where one image comes from: a file or inline bytes.

    Attributes:
        path: the image file (None for inline data).
        data: decoded bytes of a base64 data URI (None for files).
        label: how the record wrote it (for messages), shortened.
    """

    path: Path | None
    data: bytes | None
    label: str


@dataclass
class Conversation:
    """One validated record.

    Attributes:
        id: the record's ``id`` (or ``file:line``).
        where: ``file:line`` of the record.
        messages: Qwen-style messages; content is a list of parts, image parts are
            ``{"type": "image", "image": <index into images>}``.
        images: the images in order of appearance.
        n_assistant: assistant turns (all trained).
        reference: text of the last assistant turn (what generation is compared with).
    """

    id: str
    where: str
    messages: list[dict[str, Any]]
    images: list[ImageSource]
    n_assistant: int
    reference: str


def read_records(path: Path, key: str = "data file") -> list[tuple[str, dict[str, Any]]]:
    """Records of a ``.jsonl`` file (one per line) or a ``.json`` file (an array), through core's
    reader (UTF-8 with or without BOM; file, line and column in every message).

    Args:
        path: the data file.
        key: the config key or option that named it.

    Returns:
        ``[(where, record), ...]`` with ``where`` = ``file:line``.

    Raises:
        UserError: missing file, a folder, not UTF-8, invalid JSON, no records, or a record that is
            not an object.
    """
    from core.task.records import read_all

    records = [
        (r.where, r.value)
        for r in read_all(path, key, what="records (conversations)", allow_folders=False)
    ]
    for where, record in records:
        if not isinstance(record, dict):
            raise UserError(
                f"{where}: a record must be a JSON object with 'messages' or 'conversations', got "
                f"{type(record).__name__}."
            )
    return records


def resolve_image(ref: Any, base_dir: Path, where: str) -> ImageSource:
    """Turn an image reference of a record into an :class:`ImageSource` (the file is not opened
    yet).

    Args:
        ref: a path, ``file://`` URI or ``data:image/...;base64,`` URI (or ``{"url": ...}``).
        base_dir: folder that relative paths are relative to (the data file's folder).
        where: ``file:line`` of the record, for messages.

    Raises:
        UserError: not a string, a remote URL, or invalid base64.
    """
    if isinstance(ref, dict) and "url" in ref:
        ref = ref["url"]
    if not isinstance(ref, str) or not ref.strip():
        raise UserError(
            f"{where}: an image reference must be a non-empty string (path, file:// or data: "
            f"URI), got {ref!r}."
        )
    ref = ref.strip()
    label = ref if len(ref) < 80 else ref[:60] + "..."
    if ref.startswith("data:"):
        header, _, payload = ref.partition(",")
        if not header.startswith("data:image") or ";base64" not in header:
            raise UserError(
                f"{where}: a data URI image must look like data:image/png;base64,...; got "
                f"{label!r}."
            )
        try:
            return ImageSource(None, base64.b64decode(payload, validate=True), label)
        except (binascii.Error, ValueError):
            raise UserError(
                f"{where}: the base64 image data is not valid base64 ({label!r})."
            ) from None
    if ref.startswith(("http://", "https://")):
        raise UserError(
            f"{where}: image {label!r} is a web URL; training must not depend on the network. "
            "Download the images "
            "and refer to the local files (paths relative to the data file, or file:// URIs)."
        )
    if ref.startswith("file://"):
        path = Path(url2pathname(unquote(urlparse(ref).path)))
    else:
        path = Path(ref).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    return ImageSource(path, None, label)


def _text_of(content: Any, where: str, turn: int) -> str:
    """The text of a message content that must be plain text (LLaVA ``value``)."""
    if not isinstance(content, str):
        raise UserError(
            f"{where}: turn {turn} must have a string 'value', got {type(content).__name__}."
        )
    return content


def _check_no_vision_tokens(text: str, where: str, turn: int) -> None:
    """Refuse text that spells out vision tokens: their count would not match the images."""
    for token in VISION_TOKENS:
        if token in text:
            raise UserError(
                f"{where}: turn {turn} contains the vision token {token} in its text, so its "
                "image-token count "
                "would not match the record's images. Put images in image parts (or LLaVA <image> "
                "placeholders) instead."
            )


def _turn_role(turn: Any, t: int, name: str, keys: tuple[str, str], fields: str) -> str:
    """The normalised role of turn ``t`` (``user`` / ``assistant`` / ``system``), read from the
    first of ``keys`` present.

    Raises:
        UserError: the turn is not an object, or its role is unknown.
    """
    if not isinstance(turn, dict):
        raise UserError(f"{name}: turn {t} must be an object with {fields}.")
    key = keys[0] if keys[0] in turn else keys[1]
    given = turn.get(key)
    role = ROLES.get(str(given if given is not None else "").lower())
    if role is None:
        raise UserError(
            f"{name}: turn {t} has role {given!r} (its '{key}'); use one of {sorted(set(ROLES))}."
        )
    return role


def _content_parts(content: Any, t: int, name: str, add_image: Any) -> list[dict[str, Any]]:
    """Qwen content parts of a ``messages`` turn: a string, or a list of text / image parts.

    Args:
        content: the turn's ``content``.
        t: turn index (for messages).
        name: the record's name (for messages).
        add_image: registers an image reference and returns its ``{"type": "image", ...}`` part.

    Raises:
        UserError: videos, image parts without a path, unknown part types, vision tokens in text.
    """
    if isinstance(content, str):
        _check_no_vision_tokens(content, name, t)
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise UserError(f"{name}: turn {t} needs 'content' as a string or a list of parts.")
    parts: list[dict[str, Any]] = []
    for part in content:
        if isinstance(part, str):
            part = {"type": "text", "text": part}
        if not isinstance(part, dict):
            raise UserError(
                f"{name}: turn {t} has a content part that is neither text nor an object: {part!r}."
            )
        kind = part.get("type")
        if kind == "video" or "video" in part:
            raise UserError(
                f"{name}: turn {t} has a video; this package trains on images and text only."
            )
        if kind in ("image", "image_url") or "image" in part or "image_url" in part:
            if "image" not in part and "image_url" not in part:
                raise UserError(f"{name}: turn {t} has an image part without an 'image' path.")
            parts.append(add_image(part.get("image", part.get("image_url"))))
        elif "text" in part:
            if not isinstance(part["text"], str):
                raise UserError(f"{name}: turn {t} has a text part whose 'text' is not a string.")
            _check_no_vision_tokens(part["text"], name, t)
            parts.append({"type": "text", "text": part["text"]})
        else:
            raise UserError(
                f"{name}: turn {t} has a content part of unknown type {kind!r} (use text or image)."
            )
    return parts


def record_name(rid: str, where: str, has_id: bool) -> str:
    """How messages name a record: ``record 'ID' (file:line)``, or ``record at file:line``."""
    return f"record {rid!r} ({where})" if has_id else f"record at {where}"


def _messages_turns(raw: dict[str, Any], name: str, add_image: Any) -> list[dict[str, Any]]:
    """Qwen messages of a ``messages`` record (role/content turns, images as parts).

    Raises:
        UserError: not a non-empty list, a bad turn, or ``image(s)`` next to ``messages``.
    """
    turns = raw["messages"]
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{name}: 'messages' must be a non-empty list of turns.")
    messages = []
    for t, turn in enumerate(turns):
        role = _turn_role(turn, t, name, ("role", "from"), "'role' and 'content'")
        content = turn.get("content", turn.get("value"))
        messages.append({"role": role, "content": _content_parts(content, t, name, add_image)})
    unused = [k for k in ("image", "images") if k in raw]
    if unused:
        raise UserError(
            f"{name}: has both 'messages' and '{unused[0]}'; put images into the messages as "
            "image parts."
        )
    return messages


def _llava_turns(raw: dict[str, Any], name: str, add_image: Any) -> list[dict[str, Any]]:
    """Qwen messages of a LLaVA record: each ``<image>`` placeholder takes the next image.

    Raises:
        UserError: not a non-empty list, a bad turn, placeholders that do not match the images.
    """
    turns = raw["conversations"]
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{name}: 'conversations' must be a non-empty list of turns.")
    refs = raw.get("images", raw.get("image", []))
    refs = [refs] if isinstance(refs, str) else list(refs or [])
    placeholders = sum(
        _text_of(turn.get("value"), name, t).count(LLAVA_IMAGE)
        for t, turn in enumerate(turns)
        if isinstance(turn, dict)
    )
    if placeholders != len(refs):
        raise UserError(
            f"{name}: {placeholders} {LLAVA_IMAGE} placeholder(s) in the text but {len(refs)} "
            "image(s); "
            f"every image needs exactly one {LLAVA_IMAGE} where it belongs."
        )
    pending = iter(refs)
    messages = []
    for t, turn in enumerate(turns):
        role = _turn_role(turn, t, name, ("from", "role"), "'from' and 'value'")
        value = _text_of(turn.get("value"), name, t)
        _check_no_vision_tokens(value, name, t)
        parts = []
        for k, piece in enumerate(value.split(LLAVA_IMAGE)):
            if k > 0:
                parts.append(add_image(next(pending)))
            # LLaVA puts "<image>\n" before the question: the newline belongs to the placeholder
            piece = piece[1:] if k > 0 and piece.startswith("\n") else piece
            if piece:
                parts.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": parts})
    return messages


def _up_to_last_answer(
    messages: list[dict[str, Any]], images: list[ImageSource], name: str
) -> tuple[list[dict[str, Any]], list[ImageSource]]:
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


def parse_record(
    raw: dict[str, Any], where: str, base_dir: Path, system_prompt: str | None = None
) -> Conversation:
    """Validate one record and bring it into the Qwen message layout.

    Args:
        raw: the JSON object.
        where: ``file:line``.
        base_dir: folder for relative image paths.
        system_prompt: system message added when the record has none (None: the template's default).

    Returns:
        A :class:`Conversation`. Turns after the last assistant turn are dropped (nothing in them
        is trained, and generation stops at the last assistant turn).

    Raises:
        UserError: unknown layout or role, no assistant turn, empty assistant text, an image in
            an assistant turn, ``<image>`` placeholders that do not match the images, vision tokens
            in text, videos.
    """
    rid = str(raw.get("id", where))
    name = record_name(rid, where, "id" in raw)
    images: list[ImageSource] = []

    def add_image(ref: Any) -> dict[str, Any]:
        images.append(resolve_image(ref, base_dir, name))
        return {"type": "image", "image": len(images) - 1}

    if "messages" in raw:
        messages = _messages_turns(raw, name, add_image)
    elif "conversations" in raw:
        messages = _llava_turns(raw, name, add_image)
    else:
        raise UserError(
            f"{name}: needs 'messages' (role/content turns) or 'conversations' (LLaVA from/value "
            "turns)."
        )
    messages, images = _up_to_last_answer(messages, images, name)
    if system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    reference = "".join(p["text"] for p in messages[-1]["content"])
    n_assistant = sum(1 for m in messages if m["role"] == "assistant")
    return Conversation(rid, where, messages, images, n_assistant, reference)


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def load_image(source: ImageSource, where: str, max_source_pixels: int) -> Image.Image:
    """Open and decode one image as RGB, refusing files too big to decode safely.

    Args:
        source: the image.
        where: the record, for messages.
        max_source_pixels: largest ``width x height`` accepted before decoding.

    Returns:
        The decoded RGB image at its original size (:func:`vision_size` gives the model's size).

    Raises:
        UserError: missing file, undecodable data, or more than ``max_source_pixels`` pixels.
    """
    import io

    if source.path is not None and not source.path.is_file():
        raise UserError(f"{where}: image {source.label!r} not found (looked for {source.path}).")
    try:
        image = Image.open(
            source.path if source.path is not None else io.BytesIO(source.data or b"")
        )
        width, height = image.size  # read from the header; nothing decoded yet
        if width * height > max_source_pixels:
            raise UserError(
                f"{where}: image {source.label!r} has {width}x{height} = {width * height:,} "
                "pixels, more than "
                f"data.max_source_pixels={max_source_pixels:,}; downscale the file or raise that "
                "limit."
            )
        image.load()
        # RGBA on white, like qwen_vl_utils: transparent pixels must not turn black
        if image.mode == "RGBA":
            canvas = Image.new("RGB", image.size, (255, 255, 255))
            canvas.paste(image, mask=image.getchannel("A"))
            return canvas
        return image.convert("RGB")
    except UserError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(
            f"{where}: image {source.label!r} cannot be decoded ({type(err).__name__}: {err}); "
            "the file is corrupt or not an image."
        ) from None


def vision_size(
    width: int, height: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """The ``(width, height)`` an image is resized to before patching (qwen_vl_utils' rule).

    Both sides become multiples of ``factor`` (patch size x merge size = 28) with an area in
    ``[min_pixels, max_pixels]`` and the aspect ratio kept as well as possible.

    Raises:
        ValueError: aspect ratio above 200 (qwen_vl_utils' limit).
    """
    from qwen_vl_utils.vision_process import smart_resize

    h, w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return w, h


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------


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
        header: token ids of ``<|im_start|>assistant\\n`` (a sequence: ``<|im_start|>`` alone also
            opens user turns, and ``assistant`` can appear in any text).
        end_id: id of ``<|im_end|>``.

    Returns:
        ``[(start, stop), ...]``: ``ids[start:stop]`` is an answer *including* its ``<|im_end|>``
        (``stop`` is ``L`` for an unterminated last answer).
    """
    spans = []
    pos = find_sequence(ids, header)
    while pos >= 0:
        start = pos + len(header)
        stop = start
        while stop < len(ids) and ids[stop] != end_id:
            stop += 1
        stop = min(stop + 1, len(ids))  # include <|im_end|>
        spans.append((start, stop))
        pos = find_sequence(ids, header, stop)
    return spans


def build_labels(
    ids: Sequence[int], spans: Sequence[tuple[int, int]], vision_ids: set[int]
) -> list[int]:
    """Labels for one conversation: token ids inside the assistant spans, ``IGNORE_INDEX``
    elsewhere.

    Args:
        ids: token ids, length ``L``.
        spans: from :func:`assistant_spans`.
        vision_ids: ids of vision tokens (masked even inside a span).

    Returns:
        ``L`` labels (not shifted: the loss shifts them, as for any causal LM).
    """
    labels = [IGNORE_INDEX] * len(ids)
    for start, stop in spans:
        for i in range(start, stop):
            if ids[i] not in vision_ids:
                labels[i] = ids[i]
    return labels


# --------------------------------------------------------------------------------------------
# Encoding with the processor
# --------------------------------------------------------------------------------------------


class Encoder:
    """Applies the chat template, qwen_vl_utils and the processor with one pixel setting, and builds
    labels.

    Args:
        processor: a Qwen2.5-VL processor (``AutoProcessor``).
        min_pixels: smallest image area; None: the processor's ``size["shortest_edge"]``.
        max_pixels: largest image area; None: the processor's ``size["longest_edge"]``.

    The processor's image size is set to the same limits, so its own resize is a no-op on images
    that qwen_vl_utils already resized, and ``final/`` saves the limits the model was trained with.
    """

    def __init__(
        self, processor: Any, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> None:
        from transformers.image_utils import SizeDict

        self.processor = processor
        self.tokenizer = processor.tokenizer
        image_processor = processor.image_processor
        size = image_processor.size
        self.min_pixels = int(min_pixels if min_pixels is not None else size.shortest_edge)
        self.max_pixels = int(max_pixels if max_pixels is not None else size.longest_edge)
        if self.min_pixels > self.max_pixels:
            raise UserError(
                f"data.min_pixels={self.min_pixels} is larger than "
                f"data.max_pixels={self.max_pixels}."
            )
        image_processor.size = SizeDict(shortest_edge=self.min_pixels, longest_edge=self.max_pixels)
        self.patch_size = int(image_processor.patch_size)
        self.merge_size = int(image_processor.merge_size)
        self.temporal_patch_size = int(image_processor.temporal_patch_size)
        self.factor = self.patch_size * self.merge_size
        tok = self.tokenizer
        self.header_ids = tok.encode(ASSISTANT_HEADER, add_special_tokens=False)
        self.end_id = tok.convert_tokens_to_ids(END_OF_TURN)
        self.image_token_id = tok.convert_tokens_to_ids("<|image_pad|>")
        self.vision_ids = {
            tok.convert_tokens_to_ids(t)
            for t in VISION_TOKENS
            if tok.convert_tokens_to_ids(t) is not None
        }
        self.dummy_ids = [tok.convert_tokens_to_ids(t) for t in DUMMY_TOKENS]
        self.pad_id = (
            tok.pad_token_id
            if tok.pad_token_id is not None
            else tok.convert_tokens_to_ids("<|endoftext|>")
        )
        missing = [
            t
            for t in (END_OF_TURN, *DUMMY_TOKENS)
            if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)
        ]
        if missing or len(self.header_ids) < 2:
            raise UserError(
                f"The tokenizer lacks Qwen's chat tokens {missing or ASSISTANT_HEADER!r}; use a "
                "Qwen2.5-VL processor."
            )

    # -- text ----------------------------------------------------------------------------------

    def chat_text(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """The conversation rendered by the chat template, one ``<|image_pad|>`` per image.

        Args:
            messages: Qwen-style messages (image parts may hold anything; only their type matters).
            add_generation_prompt: append the assistant header (for inference).
        """
        plain = [
            {
                "role": m["role"],
                "content": [{"type": "image"} if p["type"] == "image" else p for p in m["content"]],
            }
            for m in messages
        ]
        return self.processor.apply_chat_template(
            plain, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def image_tokens(self, width: int, height: int) -> int:
        """Vision tokens of a ``width x height`` image under this encoder's pixel limits."""
        w, h = vision_size(width, height, self.factor, self.min_pixels, self.max_pixels)
        return (w // self.factor) * (h // self.factor)

    def image_part(self, image: Image.Image) -> dict[str, Any]:
        """A qwen_vl_utils image part of ``image`` at this encoder's pixel limits."""
        return {
            "type": "image",
            "image": image,
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
        }

    # -- whole records -------------------------------------------------------------------------

    def encode(self, conv: Conversation, images: list[Image.Image]) -> dict[str, Any]:
        """Token ids, labels and pixel patches of one conversation.

        Args:
            conv: the validated record.
            images: its decoded images, in order (original sizes).

        Returns:
            ``input_ids``, ``labels``, ``mm_token_type_ids``: ``(L,)`` int64 tensors;
            ``pixel_values``: ``(patches, 3 * temporal_patch * patch * patch)`` float32 or None;
            ``image_grid_thw``: ``(images, 3)`` int64 or None; ``prompt_length``: tokens before
            the last answer (int); ``spans``: the answer ranges.
        """
        from qwen_vl_utils import process_vision_info

        messages = [
            {
                "role": m["role"],
                "content": [
                    self.image_part(images[p["image"]]) if p["type"] == "image" else p
                    for p in m["content"]
                ],
            }
            for m in conv.messages
        ]
        resized = None
        if images:
            resized, _ = process_vision_info(messages, image_patch_size=self.patch_size)[:2]
        out = self.processor(
            text=[self.chat_text(conv.messages)], images=resized, return_tensors="pt"
        )
        ids = out["input_ids"][0]
        spans = assistant_spans(ids.tolist(), self.header_ids, self.end_id)
        labels = torch.tensor(build_labels(ids.tolist(), spans, self.vision_ids), dtype=torch.long)
        return {
            "input_ids": ids,
            "labels": labels,
            "mm_token_type_ids": out["mm_token_type_ids"][0],
            "pixel_values": out.get("pixel_values") if images else None,
            "image_grid_thw": out.get("image_grid_thw") if images else None,
            "prompt_length": spans[-1][0] if spans else len(ids),
            "spans": spans,
        }

    def encode_prompt(self, prompt: str, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """Model inputs for answering ``prompt`` about ``images`` (one user turn, then the assistant
        header).

        Args:
            prompt: the question.
            images: decoded images (original sizes), shown before the question.

        Returns:
            ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` ``(1, P)``; with images also
            ``pixel_values`` ``(patches, D)`` and ``image_grid_thw`` ``(images, 3)``.
        """
        from qwen_vl_utils import process_vision_info

        parts: list[dict[str, Any]] = [self.image_part(im) for im in images]
        messages = [{"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}]
        resized = (
            process_vision_info(messages, image_patch_size=self.patch_size)[0] if images else None
        )
        text = self.chat_text(messages, add_generation_prompt=True)
        out = self.processor(text=[text], images=resized, return_tensors="pt")
        keep = (
            "input_ids",
            "attention_mask",
            "mm_token_type_ids",
            "pixel_values",
            "image_grid_thw",
        )
        return {k: v for k, v in out.items() if k in keep}

    def dummy_pixels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The smallest image the vision tower accepts: one merge window, all zeros.

        Returns:
            ``pixel_values`` ``(merge**2, 3 * temporal_patch * patch**2)`` and ``image_grid_thw``
            ``[[1, merge, merge]]``; it makes exactly one vision token.
        """
        dim = 3 * self.temporal_patch_size * self.patch_size**2
        pixels = torch.zeros(self.merge_size**2, dim)
        grid = torch.tensor([[1, self.merge_size, self.merge_size]], dtype=torch.long)
        return pixels, grid


# --------------------------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------------------------


@dataclass
class ConversationData(Dataset):
    """Validated conversations of one file; items are encoded on access (in the loader workers).

    Attributes:
        conversations: the records.
        lengths: exact token count of each record (text + vision tokens), from the image sizes.
        encoder: the encoder.
        max_source_pixels: decoding limit per image.
        generation: items also carry ``prompt_length`` (validation / evaluation batches then get a
            left-padded prompt view for ``generate``).
        files: data files read (for the manifest).
        image_fingerprint: sha256 over every image's path, size and bytes length (the manifest).
    """

    conversations: list[Conversation]
    lengths: list[int]
    encoder: Encoder
    max_source_pixels: int
    generation: bool = False
    files: list[Path] = field(default_factory=list)
    image_fingerprint: str = ""

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Encode record ``i``.

        Returns:
            :meth:`Encoder.encode`'s dict plus ``index`` (int).
        """
        conv = self.conversations[i]
        name = record_name(conv.id, conv.where, conv.id != conv.where)
        images = [load_image(src, name, self.max_source_pixels) for src in conv.images]
        item = self.encoder.encode(conv, images)
        if len(item["input_ids"]) != self.lengths[i]:  # the processor disagrees with our resize
            raise RuntimeError(
                f"{name}: encoded to {len(item['input_ids'])} tokens, expected {self.lengths[i]}."
            )
        item["index"] = i
        if not self.generation:
            item.pop("prompt_length")
        item.pop("spans")
        return item


def measure_images(
    conv: Conversation, name: str, max_source_pixels: int, decode: bool
) -> list[tuple[int, int, int]]:
    """Open every image of a record: ``(width, height, bytes)`` each.

    Args:
        conv: the record.
        name: the record, for messages.
        max_source_pixels: decoding limit per image.
        decode: decode the pixels (finds truncated or corrupt files now, not during training);
            False reads only the header (size, format), which is much faster on big data sets.

    Raises:
        UserError: a missing, undecodable or oversized image.
    """
    import io

    sizes = []
    for src in conv.images:
        if decode:
            width, height = load_image(src, name, max_source_pixels).size
        else:
            if src.path is not None and not src.path.is_file():
                raise UserError(f"{name}: image {src.label!r} not found (looked for {src.path}).")
            try:
                with Image.open(
                    src.path if src.path is not None else io.BytesIO(src.data or b"")
                ) as image:
                    width, height = image.size
            except (OSError, SyntaxError, ValueError) as err:
                raise UserError(
                    f"{name}: image {src.label!r} cannot be read ({type(err).__name__}: {err})."
                ) from None
            if width * height > max_source_pixels:
                raise UserError(
                    f"{name}: image {src.label!r} has {width * height:,} pixels, more than "
                    f"data.max_source_pixels={max_source_pixels:,}."
                )
        sizes.append(
            (width, height, len(src.data) if src.data is not None else src.path.stat().st_size)
        )
    return sizes


def shorten_question(conv: Conversation, encoder: Encoder, length: int, limit: int) -> int:
    """Cut the text of the last user turn before the reference answer (its start kept) so the
    record fits ``limit`` tokens; changes ``conv.messages``.

    Args:
        conv: the record.
        encoder: the encoder (tokenizer, chat template).
        length: the record's length in tokens, vision tokens included.
        limit: the tokens it may have.

    Returns:
        The record's text tokens without its images' vision tokens (what ``length`` is made of
        besides them); unchanged when there is no question text to cut (the caller's length
        check then refuses or drops the record as before).
    """
    tokenizer = encoder.tokenizer
    last_answer = max(i for i, m in enumerate(conv.messages) if m["role"] == "assistant")
    users = [i for i, m in enumerate(conv.messages[:last_answer]) if m["role"] == "user"]
    parts = [p for p in conv.messages[users[-1]]["content"] if p["type"] == "text"] if users else []

    def text_tokens() -> int:
        ids = tokenizer(encoder.chat_text(conv.messages), add_special_tokens=False)["input_ids"]
        return len(ids) - len(conv.images)

    vision = length - text_tokens()
    if not parts:
        return length - vision
    part = parts[-1]
    words = tokenizer(part["text"], add_special_tokens=False, verbose=False)["input_ids"]
    excess = length - limit
    for _ in range(8):  # re-tokenizing at the cut can add a token or two
        keep = len(words) - excess
        if keep < 1:
            break
        part["text"] = tokenizer.decode(words[:keep])
        over = text_tokens() + vision - limit
        if over <= 0:
            break
        excess += over
    return text_tokens()


def load_conversations(
    path: Path,
    encoder: Encoder,
    *,
    max_source_pixels: int,
    max_length: int | None = None,
    drop_too_long: bool = False,
    system_prompt: str | None = None,
    generation: bool = False,
    decode_images: bool = True,
    workers: int = 8,
    key: str = "data file",
    cut_long: Any = None,
) -> ConversationData:
    """Read, validate and measure every record of a data file (no half-valid data reaches training).

    Checks per record: layout, roles and unique ids (:func:`parse_record`); every image opens
    (:func:`measure_images`, in ``workers`` threads: decoding releases the GIL); token counts and
    the length limit (:func:`_measure_all`).

    Args:
        path: ``.jsonl`` or ``.json`` data file.
        encoder: the encoder (tokenizer and pixel limits).
        max_source_pixels: decoding limit per image.
        max_length: token limit per record (None: none).
        drop_too_long: drop longer records (logged) instead of failing.
        system_prompt: system message for records without one.
        generation: items carry the prompt length for generation.
        decode_images: decode every image now (False: read headers only).
        workers: threads that open images.
        key: the config key or option that named ``path`` (for messages).
        cut_long: a :class:`core.task.truncation.Truncation` (evaluation): a record longer than
            ``max_length`` has the text of its last question cut (images and answers stay
            whole) and is counted there, instead of being refused or dropped.

    Returns:
        The data set with exact lengths (at least one record).

    Raises:
        UserError: a bad record, by id, file and line (structure is checked for all records
            before images are opened).
    """
    from concurrent.futures import ThreadPoolExecutor
    from functools import partial

    convs, names = _parse_all(read_records(path, key), path.parent, system_prompt)
    measure = partial(measure_images, max_source_pixels=max_source_pixels, decode=decode_images)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        sizes = list(pool.map(measure, convs, names))
    texts = [encoder.chat_text(c.messages) for c in convs]
    all_ids = encoder.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    measured = _measure_all(
        convs, names, sizes, all_ids, encoder, max_length, drop_too_long, cut_long
    )
    kept, lengths, dropped, fingerprint = measured
    _report_dropped(path, key, dropped, max_length, bool(kept))
    return ConversationData(
        kept, lengths, encoder, max_source_pixels, generation, [path], fingerprint
    )


def _measure_all(
    convs: list[Conversation],
    names: list[str],
    sizes: list[list[tuple[int, int, int]]],
    all_ids: list[list[int]],
    encoder: Encoder,
    max_length: int | None,
    drop_too_long: bool,
    cut_long: Any,
) -> tuple[list[Conversation], list[int], list[str], str]:
    """Token lengths of the records (vision tokens included), checked against the limit.

    Every assistant turn must be found by its header token sequence (a count mismatch means an
    answer starting with whitespace that merged into the header, or turn markers typed into the
    text). Arguments as for :func:`load_conversations`; ``sizes`` from :func:`measure_images`,
    ``all_ids`` the token ids of each record's chat text.

    Returns:
        ``(kept records, their lengths, ids of dropped records, image fingerprint)``.

    Raises:
        UserError: a count that does not match, or a record over ``max_length`` that may not be
            dropped.
    """
    kept, lengths, dropped = [], [], []
    fingerprint = hashlib.sha256()
    for conv, name, image_sizes, ids in zip(convs, names, sizes, all_ids):
        length, vision = _record_length(conv, name, image_sizes, ids, encoder, fingerprint)
        if cut_long is not None and max_length is not None:
            if cut_long.count(length) < length:
                length = shorten_question(conv, encoder, length, max_length) + vision
        if max_length is not None and length > max_length:
            if not drop_too_long:
                raise UserError(
                    f"{name}: {length} tokens ({vision} of them vision tokens), more than "
                    f"data.max_length={max_length}. "
                    "Lower data.max_pixels, raise data.max_length, or set data.drop_too_long=true."
                )
            dropped.append(conv.id)
            continue
        kept.append(conv)
        lengths.append(length)
    return kept, lengths, dropped, fingerprint.hexdigest()


def _parse_all(
    records: list[tuple[str, dict[str, Any]]], base_dir: Path, system_prompt: str | None
) -> tuple[list[Conversation], list[str]]:
    """:func:`parse_record` of every record, with unique ids.

    Returns:
        ``(conversations, names)``, names as messages give them.

    Raises:
        UserError: a bad record, or an id used twice.
    """
    convs, names = [], []
    seen: dict[str, str] = {}
    for where, raw in records:
        conv = parse_record(raw, where, base_dir, system_prompt)
        name = record_name(conv.id, where, "id" in raw)
        if conv.id in seen and "id" in raw:
            raise UserError(
                f"{name}: id {conv.id!r} is used twice (also at {seen[conv.id]}); ids must be "
                "unique."
            )
        seen[conv.id] = where
        convs.append(conv)
        names.append(name)
    return convs, names


def _record_length(
    conv: Conversation,
    name: str,
    image_sizes: list[tuple[int, int, int]],
    ids: list[int],
    encoder: Encoder,
    fingerprint: Any,
) -> tuple[int, int]:
    """Tokens of a record, its images' vision tokens included; adds each image to the data set's
    ``fingerprint``. The tokenized text must hold every assistant turn and one image token per
    image.

    Returns:
        ``(length, vision tokens)``.

    Raises:
        UserError: an image the processor cannot use, or a count that does not match.
    """
    vision = 0
    for src, (width, height, nbytes) in zip(conv.images, image_sizes):
        try:
            vision += encoder.image_tokens(width, height)
        except ValueError as err:
            raise UserError(f"{name}: image {src.label!r} cannot be used: {err}.") from None
        fingerprint.update(f"{src.path or src.label}|{width}x{height}|{nbytes}".encode())
    found = assistant_spans(ids, encoder.header_ids, encoder.end_id)
    if len(found) != conv.n_assistant:
        raise UserError(
            f"{name}: {conv.n_assistant} assistant turn(s) but {len(found)} found in the "
            "tokenized text. "
            "Answers must not start with whitespace and no text may contain turn markers "
            f"like {ASSISTANT_HEADER!r}."
        )
    if sum(1 for t in ids if t == encoder.image_token_id) != len(conv.images):
        raise UserError(
            f"{name}: the image-token count of the text does not match its {len(conv.images)} "
            "image(s)."
        )
    return len(ids) - len(conv.images) + vision, vision  # each <|image_pad|> -> its vision tokens


def _report_dropped(
    path: Path, key: str, dropped: list[str], max_length: int | None, kept: bool
) -> None:
    """Log the records dropped for their length.

    Raises:
        UserError: when every record was dropped (``kept`` is False).
    """
    if dropped:
        log.warning(
            "%s: dropped %d record(s) longer than data.max_length=%s: %s",
            path,
            len(dropped),
            max_length,
            ", ".join(dropped[:20]),
        )
    if not kept:
        raise UserError(
            f"Data file '{path}' ({key}): all {len(dropped)} records are longer than "
            f"data.max_length={max_length} "
            "and were dropped. Raise data.max_length or lower data.max_pixels."
        )


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


class Collator:
    """Pads encoded items into a batch; a batch without images gets a masked dummy image.

    Why the dummy: a batch without images would skip the vision tower. Under DDP that leaves its
    parameters without gradients (an error without the slow unused-parameter search), and under
    FSDP a rank that skips it never joins the vision blocks' all-gathers, so the other ranks hang.
    The dummy is one vision token (``<|vision_start|><|image_pad|><|vision_end|>``) in the padding
    of row 0, with attention mask 0 and label -100: it runs the vision tower inside the model's
    forward (where FSDP gathers the parameters) and contributes exactly 0 to the loss and the
    gradients; no real token can attend to it.

    Args:
        encoder: gives pad id, dummy tokens and dummy pixels.

    Returns (``__call__``):
        ``input_ids``, ``attention_mask``, ``labels``, ``mm_token_type_ids``: ``(B, T)``,
        right-padded;
        ``pixel_values`` ``(patches, D)``; ``image_grid_thw`` ``(images, 3)``; ``index`` ``(B,)``;
        ``has_images`` ``()`` bool (False when the images are only the dummy). Items with
        ``prompt_length`` add ``gen_input_ids``, ``gen_attention_mask``, ``gen_mm_token_type_ids``:
        ``(B, P)``, the prompts before each last answer, *left*-padded for ``generate``.
    """

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        enc = self.encoder
        pixels = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
        dummy = not pixels
        extra = len(enc.dummy_ids) if dummy else 0
        width = max(len(s["input_ids"]) for s in samples) + extra
        batch = {
            "input_ids": pad_rows([s["input_ids"] for s in samples], enc.pad_id, width, left=False),
            "attention_mask": pad_rows(
                [torch.ones(len(s["input_ids"]), dtype=torch.long) for s in samples],
                0,
                width,
                left=False,
            ),
            "labels": pad_rows([s["labels"] for s in samples], IGNORE_INDEX, width, left=False),
            "mm_token_type_ids": pad_rows(
                [s["mm_token_type_ids"] for s in samples], 0, width, left=False
            ),
            "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
            "has_images": torch.tensor(not dummy),
        }
        if dummy:
            batch["input_ids"][0, width - extra :] = torch.tensor(enc.dummy_ids)
            batch["mm_token_type_ids"][0, width - extra :] = torch.tensor([0, 1, 0])
            batch["pixel_values"], batch["image_grid_thw"] = enc.dummy_pixels()
        else:
            batch["pixel_values"] = torch.cat(pixels)
            batch["image_grid_thw"] = torch.cat(
                [s["image_grid_thw"] for s in samples if s["image_grid_thw"] is not None]
            )
        if "prompt_length" in samples[0]:
            prompts = [s["input_ids"][: s["prompt_length"]] for s in samples]
            types = [s["mm_token_type_ids"][: s["prompt_length"]] for s in samples]
            gen_width = max(len(p) for p in prompts) + extra
            batch["gen_input_ids"] = pad_rows(prompts, enc.pad_id, gen_width, left=True)
            batch["gen_attention_mask"] = pad_rows(
                [torch.ones(len(p), dtype=torch.long) for p in prompts], 0, gen_width, left=True
            )
            batch["gen_mm_token_type_ids"] = pad_rows(types, 0, gen_width, left=True)
            if dummy:  # in row 0's left padding, masked
                batch["gen_input_ids"][0, :extra] = torch.tensor(enc.dummy_ids)
                batch["gen_mm_token_type_ids"][0, :extra] = torch.tensor([0, 1, 0])
        return batch


if __name__ == "__main__":  # self-check: python -m qwen_vl.data
    import tempfile

    from transformers import AutoProcessor

    from qwen_vl.model import TINY_PROCESSOR_DIR

    encoder = Encoder(
        AutoProcessor.from_pretrained(TINY_PROCESSOR_DIR), min_pixels=3136, max_pixels=12544
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        Image.new("RGB", (300, 200), (200, 30, 30)).save(folder / "a.png")
        rows = [
            {
                "id": "img",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "image": "a.png"},
                            {"type": "text", "text": "How many circles?"},
                        ],
                    },
                    {"role": "assistant", "content": "3"},
                    {"role": "user", "content": "And plus one?"},
                    {"role": "assistant", "content": "4"},
                ],
            },
            {
                "id": "llava",
                "image": "a.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nHow many?"},
                    {"from": "gpt", "value": "2"},
                ],
            },
            {
                "id": "text",
                "messages": [
                    {"role": "user", "content": "Count the letters of cat."},
                    {"role": "assistant", "content": "3"},
                ],
            },
        ]
        (folder / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        data = load_conversations(
            folder / "d.jsonl", encoder, max_source_pixels=10**8, generation=True
        )
        print("lengths:", data.lengths, "(300x200 -> 112x84 -> 12 vision tokens)")
        item = data[0]
        tok = encoder.tokenizer
        trained = [
            tok.decode([t])
            for t, lab in zip(item["input_ids"].tolist(), item["labels"].tolist())
            if lab != IGNORE_INDEX
        ]
        print("trained tokens of the two-turn record:", trained)
        assert "".join(trained) == "3<|im_end|>4<|im_end|>", trained
        batch = Collator(encoder)([data[2]])
        print({k: tuple(v.shape) for k, v in batch.items()}, "(text-only batch: dummy image)")
        assert batch["attention_mask"][0, -3:].sum() == 0 and batch["pixel_values"].shape[0] == 4
        try:
            parse_record({"messages": [{"role": "user", "content": "hi"}]}, "x.jsonl:1", folder)
        except UserError as err:
            print("rejected:", err)
    print("qwen_vl.data: ok")
