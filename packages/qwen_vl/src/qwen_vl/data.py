"""Conversation records with images -> token ids, assistant-only labels and pixel patches.

Records use the messages or the LLaVA layout (:class:`core.task.chat.ChatReader`); text-only
records may mix with image records. Only assistant turns (text and closing ``<|im_end|>``) are
trained. :func:`load_conversations` checks every record before training.
"""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from core.errors import UserError
from core.nn.padding import pad_fields
from core.task.base import IGNORE_INDEX
from core.task.chat import (
    ChatReader,
    assistant_spans,
    build_labels,
    map_images,
    record_name,
    up_to_last_answer,
)
from core.task.images import ImageSource, image_sizes, load_image, resolve_image
from core.task.records import read_objects

log = logging.getLogger(__name__)

ASSISTANT_HEADER = "<|im_start|>assistant\n"
"""Text that opens an assistant turn; matched as a token *sequence*, never as one token id."""
END_OF_TURN = "<|im_end|>"
"""Token that closes every turn (trained at the end of assistant turns)."""
VISION_TOKENS = tuple(
    "<|vision_start|> <|vision_end|> <|vision_pad|> <|image_pad|> <|video_pad|>".split()
)
"""Tokens that belong to images or videos: never trained, never allowed in record text."""
DUMMY_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
"""The masked placeholder of a batch's dummy image (see :class:`Collator`)."""


@dataclass
class Conversation:
    """One validated record: ``id`` (or ``file:line``), ``where`` (``file:line``), Qwen-style
    ``messages`` (image parts ``{"type": "image", "image": <index into images>}``), ``images``,
    ``n_assistant`` (trained turns) and ``reference`` (the last answer's text)."""

    id: str
    where: str
    messages: list[dict[str, Any]]
    images: list[ImageSource]
    n_assistant: int
    reference: str


def parse_record(
    raw: dict[str, Any], where: str, base_dir: Path, system_prompt: str | None = None
) -> Conversation:
    """The :class:`Conversation` of the JSON object ``raw`` at ``where`` (``file:line``; image
    paths relative to ``base_dir``), with ``system_prompt`` when it has no system turn and without
    the turns after its last answer; ``UserError`` for a bad record (:class:`ChatReader`)."""
    rid = str(raw.get("id", where))
    name = record_name(rid, where, "id" in raw)
    images: list[ImageSource] = []

    def add_image(ref: Any) -> dict[str, Any]:
        images.append(resolve_image(ref, base_dir, name))
        return {"type": "image", "image": len(images) - 1}

    messages = ChatReader(name, add_image, VISION_TOKENS).read(raw)
    messages, images = up_to_last_answer(messages, images, name)
    if system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    reference = "".join(p["text"] for p in messages[-1]["content"])
    n_assistant = sum(1 for m in messages if m["role"] == "assistant")
    return Conversation(rid, where, messages, images, n_assistant, reference)


class Encoder:
    """The chat template, qwen_vl_utils and a Qwen2.5-VL ``processor`` under one pixel setting
    (``min_pixels`` / ``max_pixels``; None: the processor's own; set on the processor too, so
    ``final/`` saves the limits the model was trained with), and the labels."""

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
        lo, hi = self.min_pixels, self.max_pixels
        if lo > hi:
            raise UserError(f"data.min_pixels={lo} is larger than data.max_pixels={hi}.")
        image_processor.size = SizeDict(shortest_edge=lo, longest_edge=hi)
        self.patch_size = int(image_processor.patch_size)
        self.merge_size = int(image_processor.merge_size)
        self.temporal_patch_size = int(image_processor.temporal_patch_size)
        self.factor = self.patch_size * self.merge_size
        tok, ids = self.tokenizer, self.tokenizer.convert_tokens_to_ids
        self.header_ids = tok.encode(ASSISTANT_HEADER, add_special_tokens=False)
        self.end_id = ids(END_OF_TURN)
        self.image_token_id = ids("<|image_pad|>")
        self.vision_ids = {i for i in map(ids, VISION_TOKENS) if i is not None}
        self.dummy_ids = [ids(t) for t in DUMMY_TOKENS]
        self.pad_id = tok.pad_token_id
        if self.pad_id is None:
            self.pad_id = ids("<|endoftext|>")
        missing = [t for t in (END_OF_TURN, *DUMMY_TOKENS) if ids(t) in (None, tok.unk_token_id)]
        if missing or len(self.header_ids) < 2:
            raise UserError(
                f"The tokenizer lacks Qwen's chat tokens {missing or ASSISTANT_HEADER!r}; use a "
                "Qwen2.5-VL processor."
            )

    def chat_text(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """``messages`` rendered by the chat template, one ``<|image_pad|>`` per image (and the
        assistant header with ``add_generation_prompt``)."""
        plain = map_images(messages, lambda part: {"type": "image"})
        return self.processor.apply_chat_template(
            plain, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def image_tokens(self, width: int, height: int) -> int:
        """Vision tokens of a ``width x height`` image: qwen_vl_utils resizes it to multiples of
        ``factor`` (28) with an area within the pixel limits (``ValueError``: aspect ratio > 200).
        """
        from qwen_vl_utils.vision_process import smart_resize

        limits = {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels}
        h, w = smart_resize(height, width, factor=self.factor, **limits)
        return (w // self.factor) * (h // self.factor)

    def encode(self, conv: Conversation, images: list[Image.Image]) -> dict[str, Any]:
        """``conv`` with its decoded ``images``: ``input_ids``, ``labels``, ``mm_token_type_ids``
        ``(L,)``; ``pixel_values`` ``(patches, 3 * temporal_patch * patch**2)`` and
        ``image_grid_thw`` ``(images, 3)`` or None; ``prompt_length`` (before the last answer)."""
        out = self.process(conv.messages, images)
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
        }

    def encode_prompt(self, prompt: str, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """Model inputs of one user turn, ``images`` then ``prompt``, and the assistant header:
        ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` ``(1, P)``; with images also
        ``pixel_values`` ``(patches, D)`` and ``image_grid_thw`` ``(images, 3)``."""
        parts = [{"type": "image", "image": i} for i in range(len(images))]
        messages = [{"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}]
        out = self.process(messages, images, add_generation_prompt=True)
        keep = "input_ids attention_mask mm_token_type_ids pixel_values image_grid_thw".split()
        return {k: v for k, v in out.items() if k in keep}

    def process(self, messages: list[dict[str, Any]], images: list[Any], **template: Any) -> Any:
        """The processor's output (tensors, batch of one) for ``messages`` whose image parts index
        ``images``; qwen_vl_utils resizes the images first, within the pixel limits."""
        from qwen_vl_utils import process_vision_info

        text, resized = self.chat_text(messages, **template), None
        if images:
            limits = {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels}
            parts = map_images(messages, lambda p: {**p, "image": images[p["image"]], **limits})
            resized = process_vision_info(parts, image_patch_size=self.patch_size)[0]
        return self.processor(text=[text], images=resized, return_tensors="pt")

    def dummy_pixels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The smallest image (one vision token, zeros): ``pixel_values``
        ``(merge**2, 3 * temporal_patch * patch**2)``, ``image_grid_thw`` ``[[1, merge, merge]]``.
        """
        dim = 3 * self.temporal_patch_size * self.patch_size**2
        pixels = torch.zeros(self.merge_size**2, dim)
        grid = torch.tensor([[1, self.merge_size, self.merge_size]], dtype=torch.long)
        return pixels, grid


@dataclass
class ConversationData(Dataset):
    """Validated conversations of one file, encoded on access: exact ``lengths`` (with vision
    tokens), the ``files`` and an ``image_fingerprint`` (paths, sizes, bytes) for the manifest;
    with ``generation`` items carry ``prompt_length`` (batches then get prompts to generate)."""

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
        """:meth:`Encoder.encode` of record ``i``, plus ``index``."""
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
        return item


def shorten_question(conv: Conversation, encoder: Encoder, length: int, limit: int) -> int:
    """Cut the last question's text (its start kept) so ``conv`` (``length`` tokens, vision
    included) fits ``limit``; changes ``conv.messages``. Returns its text tokens (vision excluded),
    unchanged without question text (the caller's length check then decides)."""
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
    """The data set (at least one record) of the data file ``path`` (named by ``key``), every
    record validated: structure and ids first, then every image opens (in ``workers`` threads;
    headers only unless ``decode_images``), then its tokens against ``max_length``: a longer one
    fails, is dropped (``drop_too_long``), or with ``cut_long`` (a
    :class:`core.task.truncation.Truncation`, for evaluation) has its last question cut.
    A bad record raises a ``UserError`` naming its id, file and line.
    """
    convs, names = _parse_all(path, key, system_prompt)
    measure = partial(image_sizes, max_source_pixels=max_source_pixels, decode=decode_images)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        sizes = list(pool.map(measure, [c.images for c in convs], names))
    texts = [encoder.chat_text(c.messages) for c in convs]
    all_ids = encoder.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    measured = _measure_all(
        convs, names, sizes, all_ids, encoder, max_length, drop_too_long, cut_long
    )
    kept, lengths, dropped, fingerprint = measured
    if dropped:
        facts = (path, len(dropped), max_length, ", ".join(dropped[:20]))
        log.warning("%s: dropped %d record(s) longer than data.max_length=%s: %s", *facts)
    if not kept:
        raise UserError(
            f"Data file '{path}' ({key}): all {len(dropped)} records are longer than data."
            f"max_length={max_length} and were dropped. Raise data.max_length or lower "
            "data.max_pixels."
        )
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
    """``(kept records, their lengths, ids of dropped records, image fingerprint)``: the records
    (chat texts tokenized to ``all_ids``, images of ``sizes``) against ``max_length``; a
    ``UserError`` for a record too long that may not be dropped (or see :func:`_record_length`)."""
    kept, lengths, dropped = [], [], []
    fingerprint = hashlib.sha256()
    for conv, name, dims, ids in zip(convs, names, sizes, all_ids):
        length, vision = _record_length(conv, name, dims, ids, encoder, fingerprint)
        if cut_long is not None and max_length is not None and cut_long.count(length) < length:
            length = shorten_question(conv, encoder, length, max_length) + vision
        if max_length is not None and length > max_length:
            if not drop_too_long:
                raise UserError(
                    f"{name}: {length} tokens ({vision} of them vision tokens), more than data."
                    f"max_length={max_length}. Lower data.max_pixels, raise data.max_length, or "
                    "set data.drop_too_long=true."
                )
            dropped.append(conv.id)
            continue
        kept.append(conv)
        lengths.append(length)
    return kept, lengths, dropped, fingerprint.hexdigest()


def _parse_all(
    path: Path, key: str, system_prompt: str | None
) -> tuple[list[Conversation], list[str]]:
    """``(conversations, names for messages)`` of the data file ``path`` (named by ``key``);
    ``UserError``: a bad record, or an id used twice."""
    convs, names = [], []
    seen: dict[str, str] = {}
    records = read_objects(
        path, key, "records (conversations)", "'messages' or 'conversations'", allow_folders=False
    )
    for where, raw in ((r.where, r.value) for r in records):
        conv = parse_record(raw, where, path.parent, system_prompt)
        name = record_name(conv.id, where, "id" in raw)
        if conv.id in seen and "id" in raw:
            also = seen[conv.id]
            raise UserError(
                f"{name}: id {conv.id!r} is used twice (also at {also}); ids must be unique."
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
    """``(length, vision tokens)`` of a record whose text tokenizes to ``ids``; adds its images
    to ``fingerprint``. ``UserError``: an image the processor cannot use, an assistant turn not
    found by its header, or an image-token count that does not match."""
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
            f"{name}: {conv.n_assistant} assistant turn(s) but {len(found)} found in the tokenized"
            " text. Answers must not start with whitespace and no text may contain turn markers "
            f"like {ASSISTANT_HEADER!r}."
        )
    if ids.count(encoder.image_token_id) != len(conv.images):
        n = len(conv.images)
        raise UserError(
            f"{name}: the image-token count of the text does not match its {n} image(s)."
        )
    return len(ids) - len(conv.images) + vision, vision  # each <|image_pad|> -> its vision tokens


class Collator:
    """Pads encoded items into a batch: ``input_ids``, ``attention_mask``, ``labels``,
    ``mm_token_type_ids`` ``(B, T)`` right-padded, ``pixel_values`` ``(patches, D)``,
    ``image_grid_thw`` ``(images, 3)``, ``index`` ``(B,)``, ``has_images``; with ``prompt_length``
    also ``gen_input_ids`` / ``gen_attention_mask`` / ``gen_mm_token_type_ids`` ``(B, P)``, the
    prompts left-padded. A batch without images would skip the vision tower (DDP: parameters
    without gradients; FSDP: a rank missing the all-gathers, a hang), so it gets a dummy image in
    row 0's padding (:data:`DUMMY_TOKENS`), masked and labelled -100: it adds exactly 0.
    """

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        enc = self.encoder
        pixels = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
        dummy = not pixels
        extra = len(enc.dummy_ids) if dummy else 0
        fields = {"input_ids": enc.pad_id, "labels": IGNORE_INDEX, "mm_token_type_ids": 0}
        batch = pad_fields(samples, fields, extra)
        batch["index"] = torch.tensor([s["index"] for s in samples], dtype=torch.long)
        batch["has_images"] = torch.tensor(not dummy)
        if dummy:
            batch["input_ids"][0, -extra:] = torch.tensor(enc.dummy_ids)
            batch["mm_token_type_ids"][0, -extra:] = torch.tensor([0, 1, 0])
            batch["pixel_values"], batch["image_grid_thw"] = enc.dummy_pixels()
        else:
            batch["pixel_values"] = torch.cat(pixels)
            grids = [s["image_grid_thw"] for s in samples if s["image_grid_thw"] is not None]
            batch["image_grid_thw"] = torch.cat(grids)
        if "prompt_length" in samples[0]:
            view = ("input_ids", "mm_token_type_ids")
            prompts = [{k: s[k][: s["prompt_length"]] for k in view} for s in samples]
            gen = {"input_ids": enc.pad_id, "mm_token_type_ids": 0}
            batch.update(pad_fields(prompts, gen, extra, left=True, prefix="gen_"))
            if dummy:  # in row 0's left padding, masked
                batch["gen_input_ids"][0, :extra] = torch.tensor(enc.dummy_ids)
                batch["gen_mm_token_type_ids"][0, :extra] = torch.tensor([0, 1, 0])
        return batch


if __name__ == "__main__":  # self-check: python -m qwen_vl.data
    import tempfile

    from transformers import AutoProcessor

    from qwen_vl.model import TINY_PROCESSOR_DIR

    encoder = Encoder(AutoProcessor.from_pretrained(TINY_PROCESSOR_DIR), 3136, 12544)
    rows = (
        '{"id": "img", "messages": [{"role": "user", "content": [{"type": "image", "image": '
        '"a.png"}, {"type": "text", "text": "How many circles?"}]}, {"role": "assistant", '
        '"content": "3"}, {"role": "user", "content": "And plus one?"}, {"role": "assistant", '
        '"content": "4"}]}\n'
        '{"id": "llava", "image": "a.png", "conversations": [{"from": "human", "value": '
        '"<image>\\nHow many?"}, {"from": "gpt", "value": "2"}]}\n'
        '{"id": "text", "messages": [{"role": "user", "content": "Count the letters of cat."}, '
        '{"role": "assistant", "content": "3"}]}\n'
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        Image.new("RGB", (300, 200), (200, 30, 30)).save(folder / "a.png")
        (folder / "d.jsonl").write_text(rows)
        data = load_conversations(
            folder / "d.jsonl", encoder, max_source_pixels=10**8, generation=True
        )
        print("lengths:", data.lengths, "(300x200 -> 112x84 -> 12 vision tokens)")
        ids, labels = data[0]["input_ids"].tolist(), data[0]["labels"].tolist()
        trained = [encoder.tokenizer.decode([t]) for t, lab in zip(ids, labels) if lab >= 0]
        assert "".join(trained) == "3<|im_end|>4<|im_end|>", trained
        batch = Collator(encoder)([data[2]])
        print({k: tuple(v.shape) for k, v in batch.items()}, "(text-only batch: dummy image)")
        assert batch["attention_mask"][0, -3:].sum() == 0 and batch["pixel_values"].shape[0] == 4
        try:
            parse_record({"messages": [{"role": "user", "content": "hi"}]}, "x.jsonl:1", folder)
        except UserError as err:
            print("rejected:", err)
        else:
            raise AssertionError("a record without an answer must be refused")
    print("qwen_vl.data: ok")
