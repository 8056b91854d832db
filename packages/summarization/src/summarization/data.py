"""DialogSum data: reading with per-line checks, tokenising through ``datasets``, batching.

Rows are JSON lines with ``fname``, ``dialogue``, ``summary`` and ``topic``; test rows carry
several references ``summary1..N`` instead of ``summary``. Every line is checked when it is
read, and a bad one raises :class:`core.errors.UserError` naming the file and line (malformed
JSON, a missing or empty field, bytes that are not UTF-8, a duplicate ``fname``).

A row becomes ``{"fname", "dialogue", "references": [str, ...], "topic"}``. Tokenisation runs
through ``datasets.Dataset.map(batched=True)`` into an Arrow cache file keyed by the data's and
the tokenizer's fingerprints, so a second run with the same data reads the tokens back.

Items are ``{"index", "input_ids", "labels"}``; :class:`Seq2SeqCollator` pads them per batch
(dynamic padding), fills label padding with ``-100`` (ignored by the loss) and builds the
decoder inputs by shifting the labels right.

Self-check: ``python -m summarization.data``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from core.errors import UserError
from core.nn.padding import length_mask, pad_rows
from core.run.storage import writable_cache
from core.task.base import IGNORE_INDEX

CACHE_VERSION = "2"  # 2: source_tokens (length before truncation)
"""Bump when the tokenised layout changes, so old cache files are not reused."""


# --------------------------------------------------------------------------------------------
# Reading and checking rows
# --------------------------------------------------------------------------------------------


def reference_keys(row: dict[str, Any]) -> list[str]:
    """The reference fields of a row: ``["summary"]``, or ``["summary1", "summary2", ...]``
    (consecutive from 1), or ``[]``."""
    if "summary" in row:
        return ["summary"]
    keys = []
    while f"summary{len(keys) + 1}" in row:
        keys.append(f"summary{len(keys) + 1}")
    return keys


def check_references(obj: dict[str, Any], where: str, need_references: bool) -> list[str]:
    """The stripped reference summaries of a row (:func:`reference_keys`).

    Raises:
        UserError: none although ``need_references``, or one that is empty or not text.
    """
    keys = reference_keys(obj)
    if need_references and not keys:
        raise UserError(
            f"{where}: missing field 'summary' (or 'summary1', 'summary2', ... for several "
            "references); "
            f"fields present: {', '.join(sorted(obj))}. Training and scoring need a reference "
            "summary per row."
        )
    references = []
    for key in keys:
        value = obj[key]
        if not isinstance(value, str) or not value.strip():
            what = "empty" if isinstance(value, str) else type(value).__name__
            raise UserError(
                f"{where}: field '{key}' is {what}; a reference summary must be non-empty text."
            )
        references.append(value.strip())
    return references


def check_row(
    obj: Any, where: str, need_references: bool = True, default_fname: str = ""
) -> dict[str, Any]:
    """Validate one parsed row and normalise it.

    Args:
        obj: the parsed JSON value of one line.
        where: ``"FILE:LINE"`` (or a dataset row) for messages.
        need_references: whether a ``summary`` / ``summary1..N`` field is required.
        default_fname: id to use when the row has no ``fname``.

    Returns:
        ``{"fname": str, "dialogue": str, "references": list[str], "topic": str}``.

    Raises:
        UserError: not an object, a missing / empty / non-text field.
    """
    if not isinstance(obj, dict):
        raise UserError(
            f"{where}: expected a JSON object with 'dialogue' and 'summary', got "
            f"{type(obj).__name__}. Each line must be one object."
        )
    if "dialogue" not in obj:
        raise UserError(
            f"{where}: missing field 'dialogue' (fields present: "
            f"{', '.join(sorted(obj)) or 'none'}). Every row needs the dialogue text."
        )
    dialogue = obj["dialogue"]
    if not isinstance(dialogue, str):
        raise UserError(f"{where}: field 'dialogue' must be text, got {type(dialogue).__name__}.")
    if not dialogue.strip():
        raise UserError(
            f"{where}: field 'dialogue' is empty. Remove the row or fill in the dialogue."
        )
    references = check_references(obj, where, need_references)
    fname = obj.get("fname", default_fname)
    if not isinstance(fname, (str, int)) or str(fname) == "":
        raise UserError(
            f"{where}: field 'fname' must be a non-empty id (text or number), got {fname!r}."
        )
    topic = obj.get("topic", obj.get("topic1", ""))
    return {
        "fname": str(fname),
        "dialogue": dialogue,
        "references": references,
        "topic": topic if isinstance(topic, str) else "",
    }


def read_rows(
    source: Path | str,
    key: str = "file",
    need_references: bool = True,
    split: str = "train",
    hint: str = "",
) -> list[dict[str, Any]]:
    """Read and check DialogSum-style rows from a JSON-lines / JSON file or a ``datasets`` source
    (core's reader: UTF-8 with or without BOM, every problem named with file and line).

    Args:
        source: a file, a dataset folder, or a Hub dataset id.
        key: the config key or option that named it (for messages).
        need_references: require a summary on every row (training, validation, scoring).
        split: the split of a ``datasets`` source.
        hint: added to the error when a ``datasets`` source cannot be loaded.

    Returns:
        Normalised rows (see :func:`check_row`), in order.

    Raises:
        UserError: missing file, a folder, bytes that are not UTF-8, malformed JSON, bad or
            duplicate rows, or no rows at all: each with the file and line.
    """
    from core.task.records import read_all

    rows: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    stem = Path(str(source)).stem if not isinstance(source, str) or Path(source).suffix else split
    what = "rows (JSON objects with fname, dialogue and summary)"
    for record in read_all(source, key, what=what, split=split, hint=hint):
        row = check_row(
            record.value, record.where, need_references, default_fname=f"{stem}_{record.line}"
        )
        if row["fname"] in seen:
            raise UserError(
                f"{record.where}: duplicate fname '{row['fname']}' (first at "
                f"{seen[row['fname']]}); ids must be unique."
            )
        seen[row["fname"]] = record.where
        rows.append(row)
    return rows


def read_jsonl(path: Path, key: str = "file", need_references: bool = True) -> list[dict[str, Any]]:
    """Rows of one data *file* (see :func:`read_rows`); a folder is refused as a folder."""
    from core.task.records import check_file

    return read_rows(check_file(Path(path), key), key, need_references)


def read_scoring_file(path: Path, key: str, references: bool) -> dict[str, list[str]]:
    """Rows of a predictions or references file for ``score``, by ``fname``.

    Args:
        path: JSONL with ``{fname, summary}`` rows, or (references) ``{fname, summary1..N}``.
        key: the option that named it (``--predictions`` / ``--references``).
        references: whether these are references (``summary1..N`` allowed, empty text refused).

    Returns:
        ``{fname: [summary, ...]}`` in file order (one entry per prediction).

    Raises:
        UserError: bad line, missing ``fname`` / ``summary``, duplicate ``fname``, empty file.
    """
    from core.task.records import read_all

    out: dict[str, list[str]] = {}
    lines: dict[str, str] = {}
    for record in read_all(path, key, what="rows", allow_folders=False):
        where, obj = record.where, record.value
        if not isinstance(obj, dict):
            raise UserError(
                f'{where}: expected a JSON object {{"fname": ..., "summary": ...}}, got '
                f"{type(obj).__name__}."
            )
        if (
            "fname" not in obj
            or not isinstance(obj["fname"], (str, int))
            or str(obj["fname"]) == ""
        ):
            raise UserError(
                f"{where}: missing field 'fname' (fields present: "
                f"{', '.join(sorted(obj)) or 'none'}); rows are matched by fname."
            )
        keys = reference_keys(obj) if references else (["summary"] if "summary" in obj else [])
        if not keys:
            wanted = "'summary' (or 'summary1', 'summary2', ...)" if references else "'summary'"
            raise UserError(
                f"{where}: missing field {wanted}; fields present: {', '.join(sorted(obj))}."
            )
        texts = []
        for k in keys:
            if not isinstance(obj[k], str) or (references and not obj[k].strip()):
                raise UserError(
                    f"{where}: field '{k}' must be {'non-empty ' if references else ''}text, got "
                    f"{obj[k]!r}."
                )
            texts.append(obj[k].strip())
        fname = str(obj["fname"])
        if fname in out:
            raise UserError(
                f"{where}: duplicate fname '{fname}' (first at {lines[fname]}); ids must be unique."
            )
        out[fname], lines[fname] = texts, where
    return out


def read_hub_split(
    name: str, split: str, key: str = "data.dataset", need_references: bool = True
) -> list[dict[str, Any]]:
    """Rows of one split of a Hugging Face dataset (a Hub id or a local dataset folder), checked
    like file rows (see :func:`read_rows`)."""
    local = Path(name).expanduser()
    return read_rows(
        local if local.is_dir() else name, key, need_references, split=split, hint=DATASET_HINT
    )


DATASET_HINT = (
    "Or set data.train_file / data.val_file / data.test_file to local JSONL files, or leave "
    "data.dataset null "
    "to use the shipped sample."
)
"""The way forward when ``data.dataset`` cannot be loaded."""


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


def default_cache_dir() -> Path:
    """``$HF_DATASETS_CACHE/summarization``."""
    from datasets import config as ds_config

    return Path(ds_config.HF_DATASETS_CACHE) / "summarization"


def cache_fingerprint(
    sources: list[str],
    targets: list[str],
    tokenizer: Any,
    prefix: str,
    max_source_length: int,
    max_target_length: int,
) -> str:
    """Hash (32 hex digits) of the texts, the tokenizer and the settings: the cache file's key."""
    digest = hashlib.sha256()
    for text in (
        CACHE_VERSION,
        tokenizer_fingerprint(tokenizer),
        prefix,
        str(max_source_length),
        str(max_target_length),
    ):
        digest.update(text.encode() + b"\0")
    for source, target in zip(sources, targets):
        digest.update(source.encode() + b"\0" + target.encode() + b"\0")
    return digest.hexdigest()[:32]


def batch_encoder(tokenizer: Any, max_source_length: int, max_target_length: int) -> Any:
    """The ``Dataset.map`` function that tokenises a batch of ``source`` / ``target`` texts."""

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        """Token ids of a batch of rows: ``{"input_ids": [[int]], "labels": [[int]]}``."""
        source = tokenizer(batch["source"], max_length=max_source_length, truncation=True)
        target = tokenizer(
            text_target=batch["target"], max_length=max_target_length, truncation=True
        )
        # Only a dialogue that fills the limit can have been cut: those are tokenized whole.
        full = [len(ids) for ids in source["input_ids"]]
        at_limit = [i for i, n in enumerate(full) if n >= max_source_length]
        if at_limit:
            whole = tokenizer([batch["source"][i] for i in at_limit], verbose=False)["input_ids"]
            for i, ids in zip(at_limit, whole, strict=True):
                full[i] = len(ids)
        return {
            "input_ids": source["input_ids"],
            "labels": target["input_ids"],
            "source_tokens": full,
        }

    return encode


def tokenize_rows(
    rows: Sequence[dict[str, Any]],
    tokenizer: Any,
    *,
    prefix: str = "",
    max_source_length: int = 512,
    max_target_length: int = 128,
    cache_dir: Path | None = None,
) -> datasets.Dataset:  # noqa: F821
    """Tokenise rows with ``datasets.Dataset.map(batched=True)``, cached in an Arrow file.

    The target is the row's first reference. The cache file name hashes the texts, the
    tokenizer and the settings, so changing any of them makes a new file.

    Args:
        rows: normalised rows.
        tokenizer: a transformers tokenizer.
        prefix: text put before each dialogue (``summarize: `` for T5).
        max_source_length: dialogue tokens kept (truncation).
        max_target_length: summary tokens kept.
        cache_dir: folder of cache files (default :func:`default_cache_dir`).

    Returns:
        A ``datasets.Dataset`` with columns ``index`` (int), ``input_ids`` and ``labels``
        (lists of ints, each ending with the end-of-sequence token) and ``source_tokens`` (the
        dialogue's length before truncation, so the cut ones can be counted).
    """
    import datasets

    # one bar per split floods SLURM logs; the run log says what was read
    datasets.disable_progress_bars()
    sources = [prefix + row["dialogue"] for row in rows]
    targets = [row["references"][0] if row["references"] else "" for row in rows]
    fingerprint = cache_fingerprint(
        sources, targets, tokenizer, prefix, max_source_length, max_target_length
    )
    # A read-only cache (HOME, a shared HF_DATASETS_CACHE) falls back to $TMPDIR with a warning.
    folder = writable_cache(
        Path(cache_dir) if cache_dir else default_cache_dir(),
        "data.cache_dir (or HF_DATASETS_CACHE)" if not cache_dir else "data.cache_dir",
        "the tokenised-data cache",
    )
    table = datasets.Dataset.from_dict(
        {"index": list(range(len(rows))), "source": sources, "target": targets}
    )
    # An explicit cache file: in-memory datasets are not cached by default. datasets writes to a
    # temporary file and renames it, so DDP ranks that tokenise at the same time never see a
    # half-written cache.
    return table.map(
        batch_encoder(tokenizer, max_source_length, max_target_length),
        batched=True,
        batch_size=1000,
        remove_columns=["source", "target"],
        cache_file_name=str(folder / f"tokens-{fingerprint}.arrow"),
        new_fingerprint=fingerprint,
        load_from_cache_file=True,
        desc="tokenising",
    )


class SummarizationDataset(torch.utils.data.Dataset):
    """Tokenised rows for the engine: ``len()``, ``[i]`` and per-sample lengths.

    Args:
        rows: the normalised rows (kept for references and ids).
        tokens: the output of :func:`tokenize_rows` for these rows.
    """

    def __init__(self, rows: Sequence[dict[str, Any]], tokens: Any) -> None:
        self.rows = list(rows)
        columns = tokens.to_dict()  # plain lists: cheap item access, picklable for workers
        self.input_ids: list[list[int]] = columns["input_ids"]
        self.labels: list[list[int]] = columns["labels"]
        self.source_tokens: list[int] = columns["source_tokens"]
        self.cache_files = [f["filename"] for f in tokens.cache_files]

    def __len__(self) -> int:
        """Number of rows."""
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """``{"index": int, "input_ids": list[int], "labels": list[int]}``."""
        return {"index": i, "input_ids": self.input_ids[i], "labels": self.labels[i]}

    def lengths(self) -> list[int]:
        """Source lengths in tokens (what dominates padding and generation cost)."""
        return [len(ids) for ids in self.input_ids]

    def truncation(self, limit: int, origin: str, what: str = "dialogues") -> Any:
        """The dialogues cut to ``limit`` tokens, counted
        (:class:`core.task.truncation.Truncation`)."""
        from core.task.truncation import Truncation

        cut = Truncation(limit, origin, what)
        for length in self.source_tokens:
            cut.count(length)
        return cut


class Seq2SeqCollator:
    """Pads a list of items into a seq2seq batch.

    Args:
        pad_token_id: id used to pad inputs and decoder inputs.
        decoder_start_token_id: first decoder input (BART: ``</s>``; T5: ``<pad>``).
    """

    def __init__(self, pad_token_id: int, decoder_start_token_id: int) -> None:
        self.pad_token_id = pad_token_id
        self.decoder_start_token_id = decoder_start_token_id

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Batch items.

        Returns:
            ``input_ids`` / ``attention_mask``: ``(batch, max_source_len)`` right-padded;
            ``labels``: ``(batch, max_target_len)`` with ``-100`` on padding;
            ``decoder_input_ids``: ``(batch, max_target_len)``, the labels shifted right by one
            with the decoder start token first (what the model would build from ``labels``);
            ``index``: ``(batch,)`` dataset indices.
        """
        sources = [s["input_ids"] for s in samples]
        input_ids = pad_rows(sources, self.pad_token_id)
        attention_mask = length_mask([len(s) for s in sources])
        labels = pad_rows([s["labels"] for s in samples], IGNORE_INDEX)
        decoder_input_ids = torch.full_like(labels, self.pad_token_id)
        decoder_input_ids[:, 0] = self.decoder_start_token_id
        decoder_input_ids[:, 1:] = labels[:, :-1].masked_fill(
            labels[:, :-1] == IGNORE_INDEX, self.pad_token_id
        )
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "decoder_input_ids": decoder_input_ids,
            "labels": labels,
            "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
        }


# --------------------------------------------------------------------------------------------
# Lead-3 baseline
# --------------------------------------------------------------------------------------------

TURN = re.compile(r"\r?\n")


def lead_n(dialogue: str, n: int = 3) -> str:
    """The first ``n`` utterances of a dialogue, speaker tags kept, one per line (Lead-3
    baseline)."""
    turns = [t.strip() for t in TURN.split(dialogue) if t.strip()]
    return "\n".join(turns[:n])


if __name__ == "__main__":  # self-check: python -m summarization.data
    import tempfile

    from transformers import AutoTokenizer

    from summarization.config import SAMPLES, SHIPPED_TOKENIZER

    rows = read_jsonl(SAMPLES["en"] / "dev.jsonl")
    test = read_jsonl(SAMPLES["en"] / "test.jsonl")
    korean = read_jsonl(SAMPLES["ko"] / "train.jsonl")
    print(
        f"{len(rows)} dev rows, {len(test)} test rows with {len(test[0]['references'])} "
        f"references, {len(korean)} Korean rows"
    )
    with tempfile.TemporaryDirectory() as tmp:
        bad = Path(tmp) / "bad.jsonl"
        bad.write_text(
            '{"fname": "a", "dialogue": "x", "summary": "y"}\n{"fname": "b", "dialogue": ""\n',
            encoding="utf-8",
        )
        try:
            read_jsonl(bad)
        except UserError as err:
            assert ":2:" in str(err)
            print("bad line ->", str(err).replace(tmp, "TMP"))
        tok = AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)
        tokens = tokenize_rows(
            rows[:8] + korean[:4],
            tok,
            max_source_length=64,
            max_target_length=40,
            cache_dir=Path(tmp),
        )
        data = SummarizationDataset(rows[:8] + korean[:4], tokens)
        again = tokenize_rows(
            rows[:8] + korean[:4],
            tok,
            max_source_length=64,
            max_target_length=40,
            cache_dir=Path(tmp),
        )
        assert again.cache_files and again.cache_files[0]["filename"] == data.cache_files[0], (
            "second call must read the cache"
        )
        batch = Seq2SeqCollator(tok.pad_token_id, tok.eos_token_id)([data[i] for i in (0, 9, 11)])
        for name, tensor in batch.items():
            print(f"  {name:18s} {tuple(tensor.shape)}")
        assert (batch["labels"] == IGNORE_INDEX).any() and (
            batch["decoder_input_ids"][:, 0] == tok.eos_token_id
        ).all()
        assert batch["decoder_input_ids"][0, 1] == batch["labels"][0, 0]
        print("korean round trip:", tok.decode(data[9]["labels"], skip_special_tokens=True)[:40])
    print("lead-3 of dev_0:", lead_n(rows[0]["dialogue"]).replace("\n", " | ")[:100])
    print("summarization.data: ok")
