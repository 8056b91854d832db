"""DialogSum data: JSON lines ``{fname, dialogue, summary | summary1..N, topic}``, each checked
when read (a bad one raises :class:`core.errors.UserError` naming the file and line), tokenised
into a ``datasets`` Arrow cache, batched by core's :class:`Seq2SeqCollator`.

Self-check: ``python -m summarization.data``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.errors import UserError
from core.task.batching import Seq2SeqCollator as Seq2SeqCollator
from core.task.batching import TokenDataset
from core.task.token_cache import cached_map, content_fingerprint, tokenizer_fingerprint

CACHE_VERSION = "2"  # 2: source_tokens (length before truncation)
"""Bump when the tokenised layout changes, so old cache files are not reused."""


# -- reading and checking rows ---------------------------------------------------------------


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
    """The stripped reference summaries of a row (:func:`reference_keys`); ``UserError`` for none
    although ``need_references``, or one that is empty or not text."""
    keys = reference_keys(obj)
    if need_references and not keys:
        raise UserError(
            f"{where}: missing field 'summary' (or 'summary1', 'summary2', ... for several "
            f"references); fields present: {', '.join(sorted(obj))}. Training and scoring need a "
            "reference summary per row."
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
    """One parsed row (named ``where``, ``"FILE:LINE"``, in messages), checked and normalised to
    ``{"fname": str, "dialogue": str, "references": list[str], "topic": str}``; ``fname``
    defaults to ``default_fname``.

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
    """The rows (:func:`check_row`), in order, of a JSON-lines / JSON file, a dataset folder or a
    Hub dataset id (its ``split``), through :func:`core.task.records.read_all`.

    Args:
        key: the config key or option that named ``source`` (for messages).
        need_references: require a summary on every row (training, validation, scoring).
        hint: added to the error when a ``datasets`` source cannot be loaded.

    Raises:
        UserError: an unreadable source, bad or duplicate rows, or no rows: file and line named.
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
    """``{fname: [summary, ...]}`` (file order) of the ``{fname, summary}`` rows of a predictions
    file for ``score`` (option ``key``), or of a references file (``references``: ``summary1..N``
    allowed, empty text refused).

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
        fname = obj.get("fname")
        if not isinstance(fname, (str, int)) or str(fname) == "":
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
        fname = str(fname)
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
    "data.dataset null to use the shipped sample."
)
"""The way forward when ``data.dataset`` cannot be loaded."""


def batch_encoder(tokenizer: Any, max_source_length: int, max_target_length: int) -> Any:
    """The ``Dataset.map`` function that tokenises a batch of ``source`` / ``target`` texts into
    ``{"input_ids": [[int]], "labels": [[int]], "source_tokens": [int]}``."""

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
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
    """Tokenise ``prefix + dialogue`` (at most ``max_source_length`` tokens) and the first
    reference (``max_target_length``) of each row with ``Dataset.map(batched=True)``, cached in
    an Arrow file under ``cache_dir`` (default ``$HF_DATASETS_CACHE/summarization``) whose name
    hashes the texts, the tokenizer and the settings (:func:`core.task.token_cache.cached_map`).

    Returns:
        A ``datasets.Dataset`` with columns ``index`` (int), ``input_ids`` and ``labels``
        (lists of ints, each ending with the end-of-sequence token) and ``source_tokens`` (the
        dialogue's length before truncation, so the cut ones can be counted).
    """
    from datasets import config as ds_config

    sources = [prefix + row["dialogue"] for row in rows]
    targets = [row["references"][0] if row["references"] else "" for row in rows]
    settings = [CACHE_VERSION, tokenizer_fingerprint(tokenizer), prefix]
    key = content_fingerprint(
        [*settings, str(max_source_length), str(max_target_length)], [sources, targets]
    )
    return cached_map(
        {"index": list(range(len(rows))), "source": sources, "target": targets},
        batch_encoder(tokenizer, max_source_length, max_target_length),
        key,
        Path(cache_dir) if cache_dir else Path(ds_config.HF_DATASETS_CACHE) / "summarization",
        "data.cache_dir" if cache_dir else "data.cache_dir (or HF_DATASETS_CACHE)",
        remove=["source", "target"],
    )


class SummarizationDataset(TokenDataset):
    """Tokenised rows for the engine: ``len()``, ``[i]`` and per-sample lengths (the source's),
    from the normalised ``rows`` (kept for references and ids) and their :func:`tokenize_rows`."""

    def __init__(self, rows: Sequence[dict[str, Any]], tokens: Any) -> None:
        columns = tokens.to_dict()  # plain lists: cheap item access, picklable for workers
        super().__init__(columns["input_ids"], columns["labels"])
        self.rows = list(rows)
        self.source_tokens: list[int] = columns["source_tokens"]
        self.cache_files = [f["filename"] for f in tokens.cache_files]

    def truncation(self, limit: int, origin: str, what: str = "dialogues") -> Any:
        """The dialogues cut to ``limit`` tokens, counted
        (:class:`core.task.truncation.Truncation`)."""
        from core.task.truncation import Truncation

        return Truncation.of(self.source_tokens, limit, origin, what)


# -- Lead-3 baseline --------------------------------------------------------------------------

TURN = re.compile(r"\r?\n")


def lead_n(dialogue: str, n: int = 3) -> str:
    """The first ``n`` utterances of a dialogue, speaker tags kept, one per line (Lead-N)."""
    turns = [t.strip() for t in TURN.split(dialogue) if t.strip()]
    return "\n".join(turns[:n])


if __name__ == "__main__":  # self-check: python -m summarization.data
    import tempfile

    from transformers import AutoTokenizer

    from summarization.config import SAMPLES, SHIPPED_TOKENIZER

    rows = (
        read_jsonl(SAMPLES["en"] / "dev.jsonl")[:8] + read_jsonl(SAMPLES["ko"] / "train.jsonl")[:4]
    )
    test = read_jsonl(SAMPLES["en"] / "test.jsonl")
    print(f"{len(test)} test rows with {len(test[0]['references'])} references")
    with tempfile.TemporaryDirectory() as tmp:
        bad = Path(tmp) / "bad.jsonl"
        bad.write_text('{"fname": "a", "dialogue": "x", "summary": "y"}\n{"fname": "b"\n')
        try:
            read_jsonl(bad)
        except UserError as err:
            assert ":2:" in str(err)
            print("bad line ->", str(err).replace(tmp, "TMP"))
        tok = AutoTokenizer.from_pretrained(SHIPPED_TOKENIZER)
        settings = {"max_source_length": 64, "max_target_length": 40, "cache_dir": Path(tmp)}
        data = SummarizationDataset(rows, tokenize_rows(rows, tok, **settings))
        again = tokenize_rows(rows, tok, **settings)
        assert again.cache_files[0]["filename"] == data.cache_files[0], "must read the cache"
        batch = Seq2SeqCollator(tok.pad_token_id, tok.eos_token_id)([data[i] for i in (0, 9, 11)])
        print({name: tuple(tensor.shape) for name, tensor in batch.items()})
        assert batch["decoder_input_ids"][0, 1] == batch["labels"][0, 0]
        assert (batch["decoder_input_ids"][:, 0] == tok.eos_token_id).all()
        print("korean round trip:", tok.decode(data[9]["labels"], skip_special_tokens=True)[:40])
    print("lead-3 of dev_0:", lead_n(rows[0]["dialogue"]).replace("\n", " | ")[:100])
    print("summarization.data: ok")
