"""The summarization :class:`core.task.base.Task`: DialogSum rows in, a seq2seq model trained
on the summary tokens' cross-entropy, ROUGE-1/2/L/Lsum F1 of generated summaries out.

``final/`` holds the model, tokenizer, ``generation_config.json`` and ``summarization.json``
(source prefix, length limits, metric): ``AutoModelForSeq2SeqLM.from_pretrained(final/)`` works.

Self-check: ``python -m summarization.task`` (a few training steps of a very small model).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.errors import ConfigError
from core.nn.models import block_classes
from core.run.outputs import write_jsonl
from core.task.base import StepOutput, Task, per_sample_loss, token_loss_sum
from core.task.metrics import describe, resolve_tokenizer, rouge
from summarization.config import SummarizationConfig
from summarization.data import (
    Seq2SeqCollator,
    SummarizationDataset,
    read_hub_split,
    read_jsonl,
    tokenize_rows,
)
from summarization.model import (
    build_model,
    check_precision,
    decoder_start_id,
    format_report,
    load_model_config,
    load_tokenizer,
    parameter_report,
    scratch_config_class,
    tokenizer_source,
)

log = logging.getLogger(__name__)

SPLIT_KEYS = {"train": "data.train_file", "val": "data.val_file", "test": "data.test_file"}
TASK_FILE = "summarization.json"
"""Written into ``final/``: what a later ``evaluate`` / ``predict`` needs besides the weights."""


class SummarizationTask(Task[SummarizationConfig]):
    """Dialogue summarization with any seq2seq model."""

    name = "summarization"
    shift_labels = False
    #: The ``transformers.GenerationConfig`` of every summary (:meth:`prepare_generation`).
    generation_config: Any = None
    #: The ROUGE word tokenizer of this run (:meth:`choose_rouge_tokenizer`).
    rouge_tokenizer = "default"

    # -- data ----------------------------------------------------------------------------------

    def setup_data(self) -> None:
        """Read, check and tokenise the train and validation rows (after
        :meth:`setup_model_side`); bad data raises ``UserError`` (file and line named)."""
        train_rows = self.read_split("train")
        val_rows = self.read_split("val")
        self.train_data = self.tokenize(train_rows[: self.cfg.data.max_train_samples])
        self.val_data = self.tokenize(val_rows[: self.cfg.data.max_val_samples])
        # One line per data set: how many dialogues training sees only the start of.
        for split, dataset in (("training", self.train_data), ("validation", self.val_data)):
            cut = dataset.truncation(
                self.cfg.data.max_source_length, "data.max_source_length", f"{split} dialogues"
            )
            if not cut.report(log):
                log.info("%s: none longer than %d tokens", cut.what, cut.limit)
        self.choose_rouge_tokenizer(train_rows + val_rows)
        log.info(
            "Data: %d training rows, %d validation rows; ROUGE tokenizer %s",
            len(self.train_data),
            len(self.val_data),
            self.rouge_tokenizer,
        )

    def setup_model_side(self, model_dir: Path | None = None) -> None:
        """Tokenizer, model config, precision check and collator of ``model.*``, or of a trained
        ``model_dir`` (evaluate / predict; its ``summarization.json`` gives the source prefix).
        ``UserError``: unreachable Hub model, T5 with fp16, ``model.encoder_mlm`` impossible."""
        cfg = self.cfg
        if model_dir is not None:
            cfg.model.init, cfg.model.name, cfg.model.tokenizer = "pretrained", str(model_dir), None
            saved = Path(model_dir) / TASK_FILE
            if saved.is_file():
                cfg.model.source_prefix = json.loads(saved.read_text(encoding="utf-8")).get(
                    "source_prefix", cfg.model.source_prefix
                )
        self.tokenizer = load_tokenizer(cfg.model)
        self.model_config = load_model_config(cfg.model, self.tokenizer)
        check_precision(self.model_config, cfg.trainer.precision)
        if cfg.model.encoder_mlm > 0 and model_dir is None:
            if self.tokenizer.mask_token_id is None:
                raise ConfigError(
                    f"model.encoder_mlm={cfg.model.encoder_mlm} needs a tokenizer with a mask "
                    f"token, and '{tokenizer_source(cfg.model)}' has none. Set model.encoder_mlm=0 "
                    "or use a tokenizer with one (BART's <mask>)."
                )
            if "fsdp" in str(cfg.trainer.strategy) or "stage_3" in str(cfg.trainer.strategy):
                raise ConfigError(
                    f"model.encoder_mlm={cfg.model.encoder_mlm} reads the output layer outside the "
                    f"model's forward, which trainer.strategy={cfg.trainer.strategy} shards. Use "
                    "ddp (or DeepSpeed stage 1/2) or set model.encoder_mlm=0."
                )
        self.collator = Seq2SeqCollator(
            self.tokenizer.pad_token_id, decoder_start_id(self.model_config)
        )

    def read_split(
        self, split: str, need_references: bool = True, key: str = "--split"
    ) -> list[dict[str, Any]]:
        """Normalised rows (:func:`summarization.data.check_row`) of ``train`` / ``val`` / ``test``
        from the configured files, the shipped sample or ``data.dataset``; or of a JSONL file when
        ``split`` is a path (named ``key`` in errors: the option it came from)."""
        data = self.cfg.data
        if split not in SPLIT_KEYS:
            path = Path(split).expanduser()
            self.files.append(path)
            return read_jsonl(path, key, need_references)
        if data.dataset:
            hub_split = getattr(data, f"{split}_split")  # data.train_split, ...
            return read_hub_split(data.dataset, hub_split, "data.dataset", need_references)
        path = data.file_for(split)  # type: ignore[arg-type]
        self.files.append(path)
        return read_jsonl(path, SPLIT_KEYS[split], need_references)

    def tokenize(self, rows: list[dict[str, Any]]) -> SummarizationDataset:
        """Tokenised dataset of ``rows`` (cached through ``datasets``)."""
        data = self.cfg.data
        tokens = tokenize_rows(
            rows,
            self.tokenizer,
            prefix=self.cfg.model.source_prefix,
            max_source_length=data.max_source_length,
            max_target_length=data.max_target_length,
            cache_dir=data.cache_dir,
        )
        return SummarizationDataset(rows, tokens)

    def choose_rouge_tokenizer(self, rows: list[dict[str, Any]]) -> None:
        """Fix the ROUGE tokenizer for this run from the data (``metric.tokenizer=auto`` looks at
        every dialogue and reference), so every validation uses the same one."""
        texts = [r["dialogue"] for r in rows] + [ref for r in rows for ref in r["references"]]
        self.rouge_tokenizer = resolve_tokenizer(self.cfg.metric.tokenizer, texts)

    # -- model ---------------------------------------------------------------------------------

    def configure_model(self) -> nn.Module:
        """The model with the fine-tuning switches applied; logs the trainable-parameter table."""
        model = build_model(self.cfg.model, self.model_config)
        log.info(
            "Model %s (%s), parameters per part:\n%s",
            self.model_source(),
            type(model).__name__,
            format_report(parameter_report(model)),
        )
        self.prepare_generation(model)
        return model

    def model_source(self) -> str:
        """Human-readable origin of the model."""
        m = self.cfg.model
        return (
            f"scratch {m.scratch.architecture} d_model={m.scratch.d_model} "
            f"layers={m.scratch.encoder_layers}+{m.scratch.decoder_layers}"
            if m.init == "scratch"
            else m.name
        )

    def prepare_generation(self, model: nn.Module) -> Any:
        """The ``transformers.GenerationConfig`` of every summary (kept in
        ``self.generation_config``): the model's own, updated with the ``generation`` group
        (``min_length`` reset so e.g. bart-large-cnn's 56 for news does not apply)."""
        g = self.cfg.generation
        config = copy.deepcopy(model.generation_config)
        config.update(
            num_beams=g.num_beams,
            max_new_tokens=g.max_new_tokens,
            min_new_tokens=g.min_new_tokens or None,
            min_length=0,
            max_length=None,
            length_penalty=g.length_penalty,
            no_repeat_ngram_size=g.no_repeat_ngram_size,
            early_stopping=g.early_stopping if g.num_beams > 1 else False,
            do_sample=False,
            use_cache=True,
        )
        self.generation_config = config
        return config

    def fsdp_wrap_classes(self) -> set[type[nn.Module]]:
        """The model's transformer blocks (its ``_no_split_modules``, e.g. BART's encoder and
        decoder layers)."""
        from transformers import AutoConfig, AutoModelForSeq2SeqLM

        m, scratch = self.cfg.model, self.cfg.model.init == "scratch"
        config_class = (
            scratch_config_class(m) if scratch else type(AutoConfig.from_pretrained(m.name))
        )
        return block_classes(AutoModelForSeq2SeqLM._model_mapping[config_class])

    # -- steps ---------------------------------------------------------------------------------

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor], source: Any = None) -> Any:
        """The teacher-forced output for ``batch`` (``.logits``: ``(batch, target_len, vocab)``),
        with ``source`` ``(batch, source_len)`` as the dialogues' ids if given."""
        return model(
            input_ids=batch["input_ids"] if source is None else source,
            attention_mask=batch["attention_mask"],
            decoder_input_ids=batch["decoder_input_ids"],
        )

    def forward_logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Teacher-forced decoder logits ``(batch, target_len, vocab)`` for ``batch``."""
        return self.forward(model, batch).logits

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        """Summed cross-entropy over the summary tokens of a micro-batch (label-smoothed by
        ``model.label_smoothing``), and their count; with ``model.encoder_mlm`` > 0, plus the
        weighted masked-LM loss of the encoder (:meth:`masked_source`) times the summary-token
        count, so the engine's per-token mean gives ``summary mean + weight x MLM mean``."""
        source, chosen = None, None
        if self.cfg.model.encoder_mlm > 0:
            source, chosen = self.masked_source(batch["input_ids"], batch["attention_mask"])
        out = self.forward(model, batch, source)
        eps = self.cfg.model.label_smoothing
        summary = token_loss_sum(out.logits, batch["labels"], shift=False, label_smoothing=eps)
        # a micro-batch of very short dialogues can draw no position
        if chosen is None or not bool(chosen.any()):
            return summary
        # (masked positions, d_model) -> (masked positions, vocab) through the tied output layer;
        # ``.module`` is the model inside Fabric's wrapper (the weights are the same tensors)
        head = getattr(model, "module", model).get_output_embeddings()
        mlm_logits = head(out.encoder_last_hidden_state[chosen].to(head.weight.dtype))
        mlm = torch.nn.functional.cross_entropy(mlm_logits.float(), batch["input_ids"][chosen])
        count = torch.as_tensor(summary.num_tokens, device=mlm.device)
        weight = self.cfg.model.encoder_mlm_weight * count
        return StepOutput(loss_sum=summary.loss_sum + weight * mlm, num_tokens=summary.num_tokens)

    def masked_source(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace a random ``model.encoder_mlm`` fraction of the ordinary (not special, not
        padding) tokens of ``input_ids`` ``(batch, source_len)`` by the mask token.

        Returns:
            ``(masked input_ids, chosen)``, ``chosen`` the bool mask of the replaced positions.
            Draws from torch's global generator, which the engine seeds and restores on resume.
        """
        special = torch.as_tensor(self.tokenizer.all_special_ids, device=input_ids.device)
        eligible = attention_mask.bool() & ~torch.isin(input_ids, special)
        chosen = eligible & (
            torch.rand(input_ids.shape, device=input_ids.device) < self.cfg.model.encoder_mlm
        )
        return input_ids.masked_fill(chosen, self.tokenizer.mask_token_id), chosen

    def generate(
        self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> list[str]:
        """One decoded, stripped summary per dialogue of ``input_ids`` / ``attention_mask``
        ``(batch, source_len)``; ``model`` may be Fabric-wrapped."""
        # Sharded parameters (FSDP2) are gathered in every forward: all ranks must keep stepping
        # until the longest summary of any rank is done.
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=self.generation_config,
            synced_gpus=self.ranks.sharded,
        )
        return [text.strip() for text in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def sample_losses(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample loss sums (against the first reference) and summary-token counts."""
        return per_sample_loss(self.forward_logits(model, batch), batch["labels"], shift=False)

    def add_predictions(
        self, model: nn.Module, batch: dict[str, torch.Tensor], records: list[dict[str, Any]]
    ) -> None:
        """A generated summary per sample: records gain ``fname``, ``prediction`` and
        ``references``."""
        predictions = self.generate(model, batch["input_ids"], batch["attention_mask"])
        for record, prediction in zip(records, predictions, strict=True):
            row = self.val_data.rows[record["index"]]  # validation's, or evaluate's rows
            record.update(fname=row["fname"], prediction=prediction, references=row["references"])

    def compute_metrics(self, records: list[dict[str, Any]]) -> dict[str, float]:
        """``{"loss", "rouge1", "rouge2", "rougeL", "rougeLsum", "gen_words", "samples"}`` over all
        gathered records (``gen_words``: the mean summary length in words)."""
        m = self.cfg.metric
        scores = rouge(
            [r["prediction"] for r in records],
            [r["references"] for r in records],
            tokenizer=self.rouge_tokenizer,
            use_stemmer=m.use_stemmer,
            multi_reference=m.multi_reference,
        )
        if self.run_dir is not None:  # the run's own file, rows as evaluate writes them
            rows = [self.evaluation_row(r) for r in records]
            write_jsonl(self.run_dir / "val_predictions.jsonl", rows)
        return {
            **super().compute_metrics(records),
            **{k: float(scores[k]) for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")},
            "gen_words": sum(len(r["prediction"].split()) for r in records) / max(len(records), 1),
            "samples": float(len(records)),
        }

    # -- output --------------------------------------------------------------------------------

    def save_final(
        self, model: nn.Module, state_dict: dict[str, torch.Tensor], out_dir: Path
    ) -> None:
        """Model (safetensors), tokenizer, generation settings and ``summarization.json`` into
        ``out_dir``."""
        super().save_final(model, state_dict, out_dir)
        if self.generation_config is not None:
            self.generation_config.save_pretrained(out_dir)
        write_task_file(out_dir, self.cfg, self.rouge_tokenizer)

    def manifest_entries(self) -> dict[str, Any]:
        """ROUGE implementation, version, tokenizer and convention; model and tokenizer sources."""
        m = self.cfg.metric
        return {
            "metrics": {
                "rouge": {
                    **describe(self.rouge_tokenizer, m.use_stemmer, m.multi_reference),
                    "tokenizer_setting": m.tokenizer,
                }
            },
            "model_source": self.model_source(),
            "tokenizer_source": str(getattr(self.tokenizer, "name_or_path", "")),
            "data_source": self.cfg.data.dataset or "files",
        }

    # -- evaluate: a trained model (core.commands.model_io) ----------------------------------

    def evaluation_inputs(self, data: Path | None, split: str) -> list[tuple[Path, str]]:
        """The split's file (also the shipped sample's, when no file is configured)."""
        if data is not None or self.cfg.data.dataset:
            return []
        return [(self.cfg.data.file_for("test" if split == "test" else "val"), f"--split {split}")]

    def load_trained(self, model_dir: Path, options: Any, fabric: Any) -> nn.Module:
        """Tokenizer, model config and source prefix of ``model_dir``, and its model with the
        ``generation`` settings."""
        from transformers import AutoModelForSeq2SeqLM

        self.setup_model_side(model_dir)
        model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
        self.prepare_generation(model)
        return model

    def source_limit(self, option: int | None) -> str:
        """Set ``data.max_source_length`` to the dialogue length ``evaluate`` / ``predict`` keep
        (``--max-input-tokens`` if given, else the configured one, at most the model's positions)
        and return where it comes from (named in the note on cut dialogues)."""
        from core.task.truncation import input_limit, model_limit

        hard = model_limit(self.model_config, self.tokenizer)
        limit, origin = input_limit(
            option, self.cfg.data.max_source_length, hard, "data.max_source_length"
        )
        self.cfg.data.max_source_length = limit
        return origin

    def evaluation_set(
        self, data: Path | None, split: str, options: Any, report: bool
    ) -> SummarizationDataset:
        """The rows of ``--data`` or of the split (the first ``--limit``), tokenised; the ROUGE
        tokenizer chosen from them."""
        origin = self.source_limit(options.max_input_tokens)
        rows = self.read_split(
            str(data) if data is not None else ("test" if split == "test" else "val"),
            key="--data" if data is not None else "--split",
        )[: options.limit]
        self.val_data = self.tokenize(rows)
        self.val_data.truncation(self.cfg.data.max_source_length, origin).report(enabled=report)
        self.choose_rouge_tokenizer(rows)
        return self.val_data

    def evaluation_row(self, record: dict[str, Any]) -> dict[str, Any]:
        """``{fname, summary, references}``."""
        return {
            "fname": record["fname"],
            "summary": record["prediction"],
            "references": record["references"],
        }

    def evaluation_scores(self, metrics: dict[str, float], run: Any) -> dict[str, Any]:
        """ROUGE, its tokenizer and convention, the data (hashed) and the generation settings."""
        from core.config.loader import to_dict
        from core.run.manifest import sha256_file

        cfg, files, rows = self.cfg, self.data_files(), self.val_data.rows
        return {
            **metrics,
            **describe(self.rouge_tokenizer, cfg.metric.use_stemmer, cfg.metric.multi_reference),
            "references_per_sample": max(len(r["references"]) for r in rows),
            "loss_reference": "first reference of each row (summary or summary1)",
            "model": str(run.model),
            "split": str(run.data) if run.data is not None else run.split,
            "data": [{"file": str(f), "sha256": sha256_file(f)} for f in files]
            if files
            else cfg.data.dataset,
            "generation": to_dict(cfg.generation),
            "world_size": run.world_size,
            "predictions": str(run.records_path) if run.records_path else None,
        }


def write_task_file(out_dir: Path, cfg: SummarizationConfig, rouge_tokenizer: str) -> None:
    """``summarization.json``: source prefix, length limits, generation and metric settings."""
    from core.config.loader import to_dict

    info = {
        "source_prefix": cfg.model.source_prefix,
        "max_source_length": cfg.data.max_source_length,
        "max_target_length": cfg.data.max_target_length,
        "generation": to_dict(cfg.generation),
        "metric": {**to_dict(cfg.metric), "resolved_tokenizer": rouge_tokenizer},
    }
    (Path(out_dir) / TASK_FILE).write_text(
        json.dumps(info, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
    )


if __name__ == "__main__":  # self-check: python -m summarization.task
    from core.testing.checks import trained_briefly
    from summarization.config import PRESETS_DIR

    small = ["model.scratch.d_model=32", "model.scratch.ffn_dim=64", "generation.max_new_tokens=8"]
    data = ["data.max_train_samples=24", "data.max_val_samples=4", "data.cache_dir={tmp}/cache"]
    overrides = ["trainer.max_steps=3", *small, *data]
    with trained_briefly(
        SummarizationConfig, SummarizationTask, overrides, "tiny", PRESETS_DIR
    ) as result:
        final = result.run_dir / "final"
        assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
        assert result.metrics["val/samples"] == 4
    print("summarization.task: ok")
