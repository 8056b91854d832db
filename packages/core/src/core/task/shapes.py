"""Small drawn images with questions about them: example data for an image + question -> answer
task that needs no download (the ``vision-language`` template of ``new-task`` ships them).

Each image is one filled shape (circle, square or triangle) of one colour on white, at a random
place and size; each image gets two records, ``{"image": "data:image/png;base64,...",
"question": "what colour is the shape?", "answer": "red"}`` and the same for its shape. The image
is inline (a ``data:`` URI, which :func:`core.task.images.resolve_image` reads), so a data file
is complete on its own. Drawing is deterministic for a seed.

Maintainer tool: ``python -m core.task.shapes --write DIR`` writes ``DIR/train.jsonl`` (120
images, 240 records, seed 0) and ``DIR/dev.jsonl`` (30 images, 60 records, seed 1).

Self-check: ``python -m core.task.shapes`` (draws, encodes and decodes a few images).
"""

from __future__ import annotations

import base64
import io
import json
import random
from pathlib import Path
from typing import Any

SHAPES = ("circle", "square", "triangle")
"""The shapes drawn."""

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
"""Colour name -> RGB."""

QUESTIONS = {"colour": "what colour is the shape?", "shape": "what shape is it?"}
"""What is asked of every image (the answer is its colour, its shape)."""

SPLITS = {"train.jsonl": (120, 0), "dev.jsonl": (30, 1)}
"""File -> (images, seed) of the example data."""


def draw(shape: str, colour: str, size: int, rng: random.Random) -> Any:
    """A ``size`` x ``size`` RGB ``PIL.Image``: white, with one filled ``shape`` of ``colour``
    whose side is 40-80 % of ``size``, at a random place."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (255, 255, 255))
    side = rng.randint(size * 2 // 5, size * 4 // 5)
    x, y = rng.randint(0, size - side), rng.randint(0, size - side)
    box, fill = (x, y, x + side - 1, y + side - 1), COLOURS[colour]
    pen = ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(x + side // 2, y), (x, y + side - 1), (x + side - 1, y + side - 1)], fill)
    return image


def data_uri(image: Any) -> str:
    """``image`` as a ``data:image/png;base64,...`` URI."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def example_records(images: int, seed: int, size: int = 56) -> list[dict[str, str]]:
    """``2 x images`` records ``{"image", "question", "answer"}``: a colour and a shape question
    about each drawn image (shape and colour drawn at random, seeded by ``seed``)."""
    rng = random.Random(seed)
    records = []
    for _ in range(images):
        shape, colour = rng.choice(SHAPES), rng.choice(sorted(COLOURS))
        uri = data_uri(draw(shape, colour, size, rng))
        for asked, answer in (("colour", colour), ("shape", shape)):
            records.append({"image": uri, "question": QUESTIONS[asked], "answer": answer})
    return records


def write_examples(folder: Path) -> list[Path]:
    """Write the example files of :data:`SPLITS` into ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (images, seed) in SPLITS.items():
        lines = [json.dumps(r) + "\n" for r in example_records(images, seed)]
        (folder / name).write_text("".join(lines), encoding="utf-8")
        written.append(folder / name)
    return written


if __name__ == "__main__":  # self-check: python -m core.task.shapes (--write DIR: the files)
    import sys
    import tempfile

    from core.task.images import load_image, resolve_image

    if sys.argv[1:2] == ["--write"]:
        print("\n".join(str(p) for p in write_examples(Path(sys.argv[2]))))
        raise SystemExit(0)
    records = example_records(6, seed=0)
    assert records == example_records(6, seed=0) and len(records) == 12
    image = load_image(resolve_image(records[0]["image"], Path("."), "self-check"), "x", 10**6)
    assert image.size == (56, 56) and image.getpixel((0, 0)) in [(255, 255, 255), *COLOURS.values()]
    colours = {c for c in image.getdata() if c != (255, 255, 255)}
    assert colours == {COLOURS[records[0]["answer"]]}, colours
    with tempfile.TemporaryDirectory() as tmp:
        train, dev = write_examples(Path(tmp))
        assert len(dev.read_text().splitlines()) == 60, dev
    print("core.task.shapes: ok")
