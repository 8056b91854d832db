"""Tokenising a data set once: ``datasets.Dataset.map(batched=True)`` into an Arrow cache file
keyed by the texts, the tokenizer and the settings, so a second run with the same data reads the
tokens back.

- :func:`tokenizer_fingerprint`: a short hash of a tokenizer's vocabulary and rules.
- :func:`cached_map`: the cached ``map``; a read-only cache folder (HOME, a shared
  ``HF_DATASETS_CACHE``) falls back to ``$TMPDIR`` with a warning.

Self-check: ``python -m core.task.token_cache``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from core.run.storage import writable_cache


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash identifying a tokenizer's vocabulary and rules (for the cache key)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(
        tokenizer, "_tokenizer", None
    )
    if backend is not None and hasattr(backend, "to_str"):
        state = json.loads(backend.to_str())
        # Calling the tokenizer with truncation / padding changes these two entries in place.
        state.pop("truncation", None)
        state.pop("padding", None)
        text = json.dumps(state, sort_keys=True)
    else:
        text = f"{tokenizer.name_or_path}:{len(tokenizer)}"
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{text}".encode()).hexdigest()[:16]


def content_fingerprint(settings: Sequence[str], columns: Sequence[Sequence[str]]) -> str:
    """Hash (32 hex digits) of the settings and of every row's texts: a cache file's key.

    Args:
        settings: strings that change the tokens (a layout version, the tokenizer's
            fingerprint, prefixes, lengths).
        columns: text columns of equal length, hashed row by row.
    """
    digest = hashlib.sha256()
    for text in settings:
        digest.update(text.encode() + b"\0")
    for row in zip(*columns):
        digest.update(b"".join(text.encode() + b"\0" for text in row))
    return digest.hexdigest()[:32]


def cached_map(
    columns: dict[str, list[Any]],
    encode: Callable[[dict[str, list[Any]]], dict[str, list[Any]]],
    key: str,
    cache_dir: Path,
    cache_key: str,
    remove: Sequence[str] = (),
) -> Any:
    """``encode`` over a table of ``columns`` (batches of 1,000 rows), cached in
    ``cache_dir/tokens-<key>.arrow``.

    Args:
        columns: the table, column name -> values.
        encode: the batched ``Dataset.map`` function.
        key: the cache key (:func:`content_fingerprint`).
        cache_dir: folder of cache files.
        cache_key: the config key that names ``cache_dir`` (for the fallback warning).
        remove: columns dropped after encoding (the texts).

    Returns:
        The encoded ``datasets.Dataset``.
    """
    import datasets

    # one bar per split floods SLURM logs; the run log says what was read
    datasets.disable_progress_bars()
    folder = writable_cache(Path(cache_dir), cache_key, "the tokenised-data cache")
    # An explicit cache file: in-memory datasets are not cached by default. datasets writes to a
    # temporary file and renames it, so DDP ranks that tokenise at the same time never see a
    # half-written cache.
    return datasets.Dataset.from_dict(columns).map(
        encode,
        batched=True,
        batch_size=1000,
        remove_columns=list(remove),
        cache_file_name=str(folder / f"tokens-{key}.arrow"),
        new_fingerprint=key,
        load_from_cache_file=True,
        desc="tokenising",
    )


if __name__ == "__main__":  # self-check: python -m core.task.token_cache
    import tempfile

    texts = ["a b", "c"]
    key = content_fingerprint(["1"], [texts])
    assert key != content_fingerprint(["2"], [texts]) and len(key) == 32
    with tempfile.TemporaryDirectory() as tmp:

        def count(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
            return {"words": [len(t.split()) for t in batch["text"]]}

        first = cached_map({"text": texts}, count, key, Path(tmp), "demo", remove=["text"])
        again = cached_map({"text": texts}, count, key, Path(tmp), "demo", remove=["text"])
        assert first["words"] == [2, 1] and again.cache_files == first.cache_files
        print(again.cache_files[0]["filename"].replace(tmp, "<tmp>"))
    print("core.task.token_cache: ok")
