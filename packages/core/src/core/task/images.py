"""Images named by data records: where they come from, opening them safely, their sizes.

A record names an image by a local path (relative to the data file's folder, or absolute), a
``file://`` URI or a ``data:image/...;base64,...`` URI. Web URLs are refused: training must not
depend on the network. :func:`resolve_image` checks the reference (no file opened yet);
:func:`load_image` decodes it as RGB (transparent pixels on white) and refuses files above a
pixel limit before decoding; :func:`image_sizes` reads every image of a record (decoded, or its
header only). Every message names the record (``record 'ID' (file:line)``).

Pillow is imported on use: only tasks with images need it.

Self-check: ``python -m core.task.images``.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from core.errors import UserError


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

    def nbytes(self) -> int:
        """Size of the file or of the inline data, in bytes."""
        return len(self.data) if self.data is not None else self.path.stat().st_size


def resolve_image(ref: Any, base_dir: Path, where: str) -> ImageSource:
    """Turn an image reference of a record into an :class:`ImageSource` (the file is not opened
    yet).

    Args:
        ref: a path, ``file://`` URI or ``data:image/...;base64,`` URI (or ``{"url": ...}``).
        base_dir: folder that relative paths are relative to (the data file's folder).
        where: the record, for messages.

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


def _check_exists(source: ImageSource, where: str) -> None:
    """Refuse an image file that is not there."""
    if source.path is not None and not source.path.is_file():
        raise UserError(f"{where}: image {source.label!r} not found (looked for {source.path}).")


def _open(source: ImageSource) -> Any:
    """The lazily-decoding PIL image of ``source``."""
    from PIL import Image

    return Image.open(source.path if source.path is not None else io.BytesIO(source.data or b""))


def load_image(source: ImageSource, where: str, max_source_pixels: int) -> Any:
    """Open and decode one image as RGB, refusing files too big to decode safely.

    Args:
        source: the image.
        where: the record, for messages.
        max_source_pixels: largest ``width x height`` accepted before decoding.

    Returns:
        The decoded RGB ``PIL.Image`` at its original size.

    Raises:
        UserError: missing file, undecodable data, or more than ``max_source_pixels`` pixels.
    """
    from PIL import Image

    _check_exists(source, where)
    try:
        image = _open(source)
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


def header_size(source: ImageSource, where: str, max_source_pixels: int) -> tuple[int, int]:
    """``(width, height)`` of an image read from its header only (much faster than decoding).

    Raises:
        UserError: a missing or unreadable file, or more than ``max_source_pixels`` pixels.
    """
    _check_exists(source, where)
    try:
        with _open(source) as image:
            width, height = image.size
    except (OSError, SyntaxError, ValueError) as err:
        raise UserError(
            f"{where}: image {source.label!r} cannot be read ({type(err).__name__}: {err})."
        ) from None
    if width * height > max_source_pixels:
        raise UserError(
            f"{where}: image {source.label!r} has {width * height:,} pixels, more than "
            f"data.max_source_pixels={max_source_pixels:,}."
        )
    return width, height


def image_sizes(
    images: Sequence[ImageSource], where: str, max_source_pixels: int, decode: bool
) -> list[tuple[int, int, int]]:
    """Open every image of a record: ``(width, height, bytes)`` each.

    Args:
        images: the record's images.
        where: the record, for messages.
        max_source_pixels: decoding limit per image.
        decode: decode the pixels (finds truncated or corrupt files now, not during training);
            False reads only the header (size, format), which is much faster on big data sets.

    Raises:
        UserError: a missing, undecodable or oversized image.
    """
    sizes = []
    for src in images:
        if decode:
            width, height = load_image(src, where, max_source_pixels).size
        else:
            width, height = header_size(src, where, max_source_pixels)
        sizes.append((width, height, src.nbytes()))
    return sizes


if __name__ == "__main__":  # self-check: python -m core.task.images
    import tempfile

    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        Image.new("RGBA", (30, 20), (0, 0, 0, 0)).save(folder / "a.png")
        b64 = base64.b64encode((folder / "a.png").read_bytes()).decode()
        inline = (
            "data:image/png;base64," + base64.b64encode((folder / "a.png").read_bytes()).decode()
        )
        sources = [
            resolve_image(r, folder, "demo") for r in ("a.png", inline, f"file://{tmp}/a.png")
        ]
        sizes = image_sizes(sources, "demo", 10**6, decode=True)
        assert [s[:2] for s in sizes] == [(30, 20)] * 3 and sizes[0][2] == sizes[1][2]
        assert image_sizes(sources[:1], "demo", 10**6, decode=False) == sizes[:1]
        assert load_image(sources[0], "demo", 10**6).getpixel((0, 0)) == (255, 255, 255)
        for bad in ("https://x/a.png", "missing.png", "a.png"):
            try:
                load_image(resolve_image(bad, folder, "record 'r' (d.jsonl:3)"), "r", 100)
            except UserError as err:
                print("refused:", str(err).replace(tmp, "<tmp>"))
            else:
                raise AssertionError(f"{bad} must be refused")
    print("core.task.images: ok")
