"""A counting data set that needs no download: the users' crowd counting in miniature. Each
image holds ``n`` shapes of one kind (and optionally distractors), "How many circles are in the
image?" -> ``n``; some records are text-only, some have two turns. The same seed writes the same
bytes. Self-check: ``python -m qwen_vl.synth``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

SHAPES = ("circles", "squares", "triangles")
"""Object kinds (plural, as asked in the questions)."""

QUESTIONS = (
    "How many {shape} are in the image?",
    "Count the {shape} in this picture.",
    "How many {shape} can you see?",
)
"""Question templates of the image records."""

FOLLOW_UPS = ("And if {k} more {shape} were added, how many would there be?",)
"""Second-turn templates of the two-turn records (answer: count + k)."""

TEXT_QUESTIONS = ('How many letters are in the word "{word}"?',)
"""Question templates of the text-only records (answer: the word's length)."""

WORDS = tuple(
    "cat dog tree house river people crowd street window garden mountain counting station "
    "bicycle yellow orange market festival stadium airport bridge camera picture circle square "
    "triangle".split()
)
"""Words of the text-only records."""

NUMBER_WORDS = tuple(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty".split()
)
"""English number words 0..20 (the metric parses them too)."""


@dataclass
class SynthSettings:
    """What ``make-data`` draws."""

    n_train: int = 200
    """Training records."""
    n_dev: int = 40
    """Dev records."""
    seed: int = 0
    """Seed of everything."""
    size: int = 112
    """Image side in pixels (square images)."""
    min_count: int = 1
    """Fewest objects per image."""
    max_count: int = 9
    """Most objects per image."""
    max_distractors: int = 0
    """Most objects of another kind per image (0: none)."""
    text_share: float = 0.1
    """Share of text-only records."""
    multi_turn_share: float = 0.1
    """Share of two-turn image records."""


def place_objects(
    rng: random.Random, n: int, size: int, radius_range: tuple[int, int]
) -> list[tuple[int, int, int]]:
    """``[(x, y, r)] * n``: centres and radii (in ``radius_range``) of ``n`` non-overlapping
    objects on a ``size`` x ``size`` canvas (``ValueError``: they do not fit)."""
    placed: list[tuple[int, int, int]] = []
    for _ in range(n):
        for _attempt in range(2000):
            r = rng.randint(*radius_range)
            x, y = rng.randint(r + 1, size - r - 2), rng.randint(r + 1, size - r - 2)
            # a gap of 2 pixels keeps touching objects countable
            if all(math.hypot(x - px, y - py) > r + pr + 2 for px, py, pr in placed):
                placed.append((x, y, r))
                break
        else:
            hint = "lower --max-count or raise --size"
            raise ValueError(f"cannot place {n} objects on a {size}x{size} image; {hint}")
    return placed


def random_colour(rng: random.Random, avoid: tuple[int, int, int]) -> tuple[int, int, int]:
    """A saturated colour clearly different from ``avoid`` (the background)."""
    while True:
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        if sum(abs(a - b) for a, b in zip(colour, avoid)) > 200:
            return colour  # type: ignore[return-value]


def draw_shape(
    draw: ImageDraw.ImageDraw, kind: str, x: int, y: int, r: int, colour: tuple[int, int, int]
) -> None:
    """Draw one filled object of ``kind`` with bounding radius ``r`` centred at ``(x, y)``."""
    if kind == "circles":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    elif kind == "squares":
        half = int(r / math.sqrt(2)) + 1
        draw.rectangle((x - half, y - half, x + half, y + half), fill=colour)
    else:  # triangles
        corners = (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        draw.polygon([(x + r * math.cos(a), y + r * math.sin(a)) for a in corners], fill=colour)


def draw_image(
    rng: random.Random, kind: str, count: int, distractors: int, settings: SynthSettings
) -> Image.Image:
    """An RGB image with ``count`` objects of ``kind`` and ``distractors`` of other kinds."""
    size = settings.size
    background = tuple(rng.randint(200, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)  # type: ignore[arg-type]
    draw = ImageDraw.Draw(image)
    radius = (max(3, size // 28), max(4, size // 12))
    positions = place_objects(rng, count + distractors, size, radius)
    others = [s for s in SHAPES if s != kind]
    for i, (x, y, r) in enumerate(positions):
        shape = kind if i < count else rng.choice(others)
        draw_shape(draw, shape, x, y, r, random_colour(rng, background))  # type: ignore[arg-type]
    return image


def turn(role: str, *parts: Any) -> dict[str, Any]:
    """A message of ``role`` whose string ``parts`` become text parts."""
    content = [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]
    return {"role": role, "content": content}


def make_record(
    rng: random.Random, split: str, i: int, out: Path, settings: SynthSettings
) -> dict[str, Any]:
    """Record ``i`` of ``split``, ``{"id", "messages", "count"}`` (``count``: the last answer);
    its image, if any, goes to ``out/images``."""
    record_id = f"{split}-{i:05d}"
    roll = rng.random()
    if roll < settings.text_share:
        word = rng.choice(WORDS)
        question = rng.choice(TEXT_QUESTIONS).format(word=word)
        messages = [turn("user", question), turn("assistant", str(len(word)))]
        return {"id": record_id, "messages": messages, "count": len(word)}
    kind = rng.choice(SHAPES)
    count = rng.randint(settings.min_count, settings.max_count)
    distractors = rng.randint(0, settings.max_distractors)
    image = draw_image(rng, kind, count, distractors, settings)
    relative = Path("images") / f"{record_id}.png"
    image.save(out / relative, format="PNG", optimize=False)
    question = rng.choice(QUESTIONS).format(shape=kind)
    image_part = {"type": "image", "image": relative.as_posix()}
    messages = [turn("user", image_part, question), turn("assistant", str(count))]
    answer = count
    if roll < settings.text_share + settings.multi_turn_share:
        k = rng.randint(1, 3)
        follow_up = rng.choice(FOLLOW_UPS).format(k=k, shape=kind)
        answer = count + k
        messages += [turn("user", follow_up), turn("assistant", str(answer))]
    return {"id": record_id, "messages": messages, "count": answer}


DATA_CARD = """# Synthetic counting data

Written by `make-data` (package `qwen_vl` {version}) with seed {seed}: {n_train} training and
{n_dev} dev records; {size}x{size} PNG images with {min_count}..{max_count} objects (circles,
squares or triangles) and up to {max_distractors} distractors of another kind; {text_share:.0%}
text-only records, {multi_turn_share:.0%} two-turn records. Regenerate with

    make-data --out DIR --n {n_train} --n-dev {n_dev} --seed {seed} --size {size}

The images are drawn by the program: no third-party content, no license restrictions (CC0).
"""


def write_dataset(out: Path, settings: SynthSettings) -> dict[str, Any]:
    """Write ``train.jsonl``, ``dev.jsonl``, the images and a data card to ``out`` (created);
    returns ``{"train": n, "dev": n, "images": n, "count_histogram": {count: n}}``."""
    from qwen_vl import __version__

    (out / "images").mkdir(parents=True, exist_ok=True)
    hist: dict[int, int] = {}
    stats: dict[str, Any] = {"images": 0, "count_histogram": {}}
    for split, n, stream in (("train", settings.n_train, 0), ("dev", settings.n_dev, 1)):
        # one stream per split: the dev set does not depend on --n
        rng = random.Random(f"{settings.seed}-{stream}")
        lines = []
        for i in range(n):
            record = make_record(rng, split, i, out, settings)
            stats["images"] += sum(
                p["type"] == "image" for m in record["messages"] for p in m["content"]
            )
            hist[record["count"]] = hist.get(record["count"], 0) + 1
            lines.append(json.dumps(record, ensure_ascii=False))
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        stats[split] = n
    (out / "README.md").write_text(
        DATA_CARD.format(version=__version__, **vars(settings)), encoding="utf-8"
    )
    stats["count_histogram"] = dict(sorted(hist.items()))
    return stats


BUILTIN = "builtin:counting"
"""Value of ``data.train_file`` / ``data.val_file`` that means the built-in counting data, drawn
on first use into a cache folder (its train / dev split)."""
BUILTIN_SETTINGS = SynthSettings(n_train=400, n_dev=80, seed=0)
"""What the built-in data holds: ``make-data --n 400 --seed 0`` (dev: 80 records)."""


def cache_root() -> Path:
    """Where drawn data is kept: ``$QWEN_VL_CACHE``, else ``$XDG_CACHE_HOME/finetune/qwen_vl``."""
    if os.environ.get("QWEN_VL_CACHE"):
        return Path(os.environ["QWEN_VL_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "finetune" / "qwen_vl"


def builtin_data(split: str, settings: SynthSettings = BUILTIN_SETTINGS) -> Path:
    """``<cache>/counting-<hash of settings>/<split>.jsonl``, drawn the first time into a temporary
    folder renamed into place (concurrent or killed runs never leave a half-drawn set)."""
    from qwen_vl import __version__

    facts = json.dumps({**vars(settings), "version": __version__}, sort_keys=True)
    key = hashlib.sha256(facts.encode()).hexdigest()[:12]
    folder = cache_root() / f"counting-{key}"
    if not (folder / "dev.jsonl").is_file():
        from core.run.storage import writable_cache

        # Drawn data can be drawn again: a read-only cache falls back to $TMPDIR with a warning.
        root = writable_cache(cache_root(), "QWEN_VL_CACHE", "the built-in counting data")
        folder = root / f"counting-{key}"
    if not (folder / "dev.jsonl").is_file():
        tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        write_dataset(tmp, settings)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process put its (identical) copy in place first
            shutil.rmtree(tmp, ignore_errors=True)
    return folder / f"{split}.jsonl"


if __name__ == "__main__":  # self-check: python -m qwen_vl.synth
    import tempfile

    def digest(folder: Path) -> str:
        h = hashlib.sha256()
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                h.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
        return h.hexdigest()

    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp) / "a", Path(tmp) / "b"
        stats = write_dataset(a, SynthSettings(n_train=20, n_dev=5, seed=3))
        write_dataset(b, SynthSettings(n_train=20, n_dev=5, seed=3))
        assert digest(a) == digest(b), "same seed must write identical files"
        first = json.loads((a / "train.jsonl").read_text().splitlines()[0])
        print("stats:", stats)
        print("first record:", json.dumps(first)[:160], "...")
    print("qwen_vl.synth: ok")
