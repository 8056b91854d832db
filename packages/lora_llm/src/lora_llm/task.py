"""The LoRA / QLoRA task for the core Trainer: records -> encoded (packed) samples, base model
(``tiny``: written to ``<run>/base``) + adapter, summed causal-LM token loss, and an adapter-only
``final`` folder (``PeftModel.from_pretrained(base, final)`` loads it).

Self-check: ``python -m lora_llm.task`` (a few optimizer steps of the tiny preset in a temp folder).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.errors import UserError
from core.nn.models import block_classes as decoder_layer_classes
from core.task.base import StepOutput, Task
from core.task.batching import PackedDataset, collate_causal, flatten_batch
from core.task.encode_report import EncodeStats
from core.task.hub import ensure_available
from core.task.packed_forward import call_model, check_packing
from core.task.records import split_holdout
from core.task.response_encoder import encode_records
from core.task.textbatch import continuations
from lora_llm import __version__
from lora_llm.config import LoraLLMConfig, ModelConfig, QuantConfig
from lora_llm.data import (
    Encoder,
    Record,
    SFTDataset,
    read_records,
    reference_text,
    resolve_spec,
    without_answer,
)
from lora_llm.model import (
    add_adapter,
    build_tiny_base,
    causal_lm_class,
    is_tiny,
    load_base,
    load_tokenizer,
    parameter_counts,
    write_settings,
)

log = logging.getLogger(__name__)


class LoraLLMTask(Task[LoraLLMConfig]):
    """LoRA / QLoRA supervised fine-tuning of a causal LM on instruction or chat data."""

    name = "lora_llm"
    shift_labels = True

    def __init__(self, cfg: LoraLLMConfig) -> None:
        super().__init__(cfg)
        self.stats: dict[str, EncodeStats] = {}
        # ``evaluate``: the evaluated records by dataset index, and the tokens to generate.
        self.eval_records: list[Record] = []
        self.eval_new_tokens = 0

    # -- data ----------------------------------------------------------------------------------

    def setup_model_side(self, model_dir: Path | None = None) -> None:
        """The config's tokenizer and prompt encoder (a trained adapter's: :meth:`load_trained`);
        ``UserError`` for a Hub model that cannot be reached."""
        cfg = self.cfg
        self.tokenizer = load_tokenizer(cfg.model)
        if not is_tiny(cfg.model.name):
            ensure_available(cfg.model.name, what="model", key="model.name")
        d = cfg.data
        self.encoder = Encoder(
            self.tokenizer, d.template, d.max_length, d.min_response_tokens, d.train_on_prompt
        )

    def setup_data(self) -> None:
        """Records, encoding, split and packing; raises ``UserError`` for bad input."""
        d = self.cfg.data
        train, train_problems, val, val_problems = self.read_splits()
        examples = self.encode_split("train", train, train_problems, "training", d.train_files)
        self.train_data = (
            PackedDataset(examples, d.max_length) if d.packing else SFTDataset(examples)
        )
        examples = (
            self.encode_split("val", val, val_problems, "validation", d.val_files) if val else []
        )
        self.val_data = SFTDataset(examples) if examples else None

    def encode_split(
        self, split: str, records: list[Record], problems: list[str], noun: str, files: list[str]
    ) -> list[dict[str, Any]]:
        """``records`` encoded, their statistics in ``self.stats[split]`` and logged (a warning on
        samples cut to ``data.max_length``); ``UserError`` when none is usable from ``files``."""
        d = self.cfg.data
        examples, stats = encode_records(records, self.encoder, d.long_prompts, problems)
        self.stats[split] = stats
        if not examples and files:
            raise UserError(
                f"No usable {noun} samples in data.{split}_files={files}: {stats.describe(split)}."
            )
        if not stats.truncation(d.max_length, f"{split} samples").report(log):
            log.info(stats.describe(split))
        return examples

    def read_splits(self) -> tuple[list[Record], list[str], list[Record], list[str]]:
        """``(train records, their skipped problems, validation records, their problems)``: the
        validation records are ``data.val_files``, else a seeded ``data.val_size`` share."""
        d = self.cfg.data
        train_records, train_problems = self.read(d.train_files, d.max_samples, "data.train_files")
        if d.val_files:
            val_records, val_problems = self.read(d.val_files, None, "data.val_files")
            return train_records, train_problems, val_records, val_problems
        train_records, val_records = split_holdout(train_records, d.val_size, d.seed)
        return train_records, train_problems, val_records, []

    # -- evaluate: a trained adapter (core.commands.model_io) ----------------------------------

    def configure_for_model(self, model_dir: Path, overrides: Any) -> None:
        """No gradient checkpointing: nothing is trained."""
        self.cfg.model.gradient_checkpointing = False

    def load_trained(self, model_dir: Path, options: Any, fabric: Any) -> nn.Module:
        """Base + adapter of ``model_dir`` (``--base``, ``--quant``) with their tokenizer and
        encoder; ``model.name`` becomes the base."""
        model, self.tokenizer, self.encoder, base = load_for_generation(
            model_dir, options.base, options.quant, fabric.device
        )
        self.cfg.model.name = base
        self.model_config = getattr(model, "config", None)
        return model

    def evaluation_set(
        self, data: Path | None, split: str, options: Any, report: bool
    ) -> SFTDataset:
        """The records of ``--data`` or the run's held-out ones; prompts too long for the
        response's or the answer's room are cut (start + template end, counted), not left out.
        With ``--max-new-tokens`` each prompt gets a greedy answer, scored against its reference."""
        from core.task.truncation import Truncation, input_limit, model_limit

        if data is not None:
            records, _ = read_records(str(data), self.cfg.data, key="--data")
        else:
            records = self.read_splits()[2]
            if not records:
                raise UserError(
                    "The run's config holds out no records (data.val_files empty and "
                    "data.val_size 0): give --data FILE."
                )
        encoder = self.encoder
        encoder.prompt_limit, origin = input_limit(
            options.max_input_tokens,
            encoder.max_length - encoder.min_response_tokens,
            model_limit(self.model_config, self.tokenizer, reserve=options.max_new_tokens),
            "data.max_length less data.min_response_tokens",
        )
        cut = Truncation(encoder.prompt_limit, origin, "prompts")
        for record in records:
            if record.kind != "tokenized":  # pre-tokenized records are cut in encode(), uncounted
                cut.count(len(encoder.prompt_ids(without_answer(record), cut=False)))
        cut.report(enabled=report)
        examples, self.stats["eval"] = encode_records(records, encoder, "skip")
        # add_predictions finds each sample's record by its index
        kept = {e["source"] for e in examples}
        self.eval_records = [r for r in records if r.source in kept]
        self.eval_new_tokens = options.max_new_tokens
        if not examples:
            raise UserError(f"No usable evaluation samples: {self.stats['eval'].describe('eval')}.")
        return SFTDataset(examples)

    def evaluation_row(self, record: dict[str, Any]) -> dict[str, Any]:
        """``{source, prediction, reference, loss}``."""
        return {k: record[k] for k in ("source", "prediction", "reference") if k in record} | {
            "loss": record["loss_sum"] / max(record["tokens"], 1)
        }

    def evaluation_scores(self, metrics: dict[str, float], run: Any) -> dict[str, Any]:
        """The metrics, the samples, the adapter and its base, the data and the processes."""
        return {
            **metrics,
            "samples": run.samples,
            "model": str(run.model),
            "base": self.cfg.model.name,
            "data": str(run.data) if run.data is not None else "val",
            "world_size": run.world_size,
        }

    def read(self, specs: list[str], limit: int | None, key: str) -> tuple[list[Record], list[str]]:
        """Records of the sources ``specs`` (config key ``key``; the first ``limit`` of each)
        and the skipped problems."""
        records: list[Record] = []
        problems: list[str] = []
        for spec in specs:
            where = resolve_spec(spec)
            if isinstance(where, Path) and where.is_file():
                self.files.append(where)
            found, bad = read_records(spec, self.cfg.data, key=key)
            if not found and not bad:
                raise UserError(
                    f"Data source '{spec}' ({key}) holds no records: it is empty or has only "
                    "blank lines."
                )
            records += found[:limit] if limit else found
            problems += bad
        return records, problems

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """See :func:`core.task.batching.collate_causal`."""
        return collate_causal(samples, self.tokenizer.pad_token_id)

    # -- model ---------------------------------------------------------------------------------

    def configure_model(self) -> nn.Module:
        """Base (quantized when asked) + LoRA, on the device the trainer set as default."""
        cfg = self.cfg
        self.report_data()
        device = torch.get_default_device()
        name: str | Path = cfg.model.name
        if is_tiny(cfg.model.name):
            base = (Path(self.run_dir) / "base").resolve()
            if self.ranks.is_global_zero:
                build_tiny_base(cfg.model.tiny, self.tokenizer, base)
            self.ranks.barrier()
            name = base
        self.base_name = str(name)
        model = load_base(name, cfg.model, cfg.quant, device, compute_device=self.ranks.device)
        embeddings = model.get_input_embeddings().weight.shape[0]
        if len(self.tokenizer) > embeddings:
            raise UserError(
                f"The tokenizer has {len(self.tokenizer)} tokens but the model only {embeddings} "
                "embeddings: model.tokenizer does not belong to model.name."
            )
        if cfg.data.packing:
            log.info(
                "Packing check: packed vs separate logits differ by %.1e (relative)",
                check_packing(model, self.tokenizer.pad_token_id),
            )
        self.check_loss_head(model)
        if cfg.data.padding_free and cfg.model.attn_implementation != "flash_attention_2":
            log.warning(
                "data.padding_free=true with attention %s: transformers builds a block-diagonal "
                "mask over each whole micro-batch (flash_attention_2 needs none)",
                cfg.model.attn_implementation,
            )
        model = add_adapter(model, cfg.lora, cfg.model.gradient_checkpointing)
        trainable, total = parameter_counts(model)
        self.counts = {"trainable": trainable, "total": total}
        bits = (
            f"{cfg.quant.bits}-bit {cfg.quant.quant_type if cfg.quant.bits == 4 else 'int8'}"
            if cfg.quant.bits
            else "16/32-bit"
        )
        log.info(
            "LoRA r=%d alpha=%g on %s of a %s base: %s trainable of %s parameters (%.3f%%)",
            cfg.lora.r,
            cfg.lora.alpha,
            ",".join(cfg.lora.target_modules),
            bits,
            f"{trainable:,}",
            f"{total:,}",
            100.0 * trainable / total,
        )
        return model

    def report_data(self) -> None:
        """Log the data statistics and write ``<run>/data_stats.json`` (rank 0)."""
        if not self.ranks.is_global_zero:
            return
        for split, stats in self.stats.items():
            stats.log(split, self.cfg.data.max_length, log)
        if self.run_dir is not None:
            report = {
                split: stats.summary(self.cfg.data.max_length)
                for split, stats in self.stats.items()
            }
            if isinstance(self.train_data, PackedDataset):
                report["train"]["packed_rows"] = len(self.train_data)
            (Path(self.run_dir) / "data_stats.json").write_text(
                json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8"
            )

    def fsdp_wrap_classes(self) -> set[type[nn.Module]]:
        """The model's decoder block class, read from its config."""
        from lora_llm.memory import model_config

        config, _ = model_config(self.cfg)
        return decoder_layer_classes(causal_lm_class(config))

    def flops_per_token(self, model: nn.Module) -> float:
        """Training FLOPs per token with a frozen base: forward 2N, input gradients 2N, adapter
        weight gradients 2T, and one more forward 2N with gradient checkpointing."""
        trainable, total = parameter_counts(model)
        return (6.0 if self.cfg.model.gradient_checkpointing else 4.0) * total + 2.0 * trainable

    # -- steps ---------------------------------------------------------------------------------

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        """Summed next-token loss over the trained tokens (``data.padding_free``: the
        micro-batch flattened into one row first)."""
        if self.cfg.data.padding_free:
            batch = flatten_batch(batch)
        return self.loss_sum(model, lambda: call_model(model, batch), batch["labels"], shift=True)

    def sample_losses(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample loss sums and trained-token counts, both ``(batch,)``."""
        labels = batch["labels"]
        return self.sample_loss_sums(model, lambda: call_model(model, batch), labels, shift=True)

    def add_predictions(
        self, model: nn.Module, batch: dict[str, torch.Tensor], records: list[dict[str, Any]]
    ) -> None:
        """In ``evaluate`` with generation: each prompt's greedy answer, reference and source."""
        if not self.eval_new_tokens:
            return
        chosen = [self.eval_records[i] for i in batch["index"].tolist()]
        answers = continuations(
            model,
            self.tokenizer,
            [self.encoder.prompt_ids(without_answer(r)) for r in chosen],
            max_new_tokens=self.eval_new_tokens,
            do_sample=False,
            batch_size=len(chosen),
            synced_gpus=self.ranks.sharded,
        )
        for record, chosen_record, answer in zip(records, chosen, answers, strict=True):
            reference = reference_text(chosen_record)
            record.update(source=chosen_record.source, prediction=answer, reference=reference)

    def compute_metrics(self, records: list[dict[str, Any]]) -> dict[str, float]:
        """Loss and perplexity; with generated answers also core's answer scores."""
        metrics = super().compute_metrics(records)
        metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))
        answered = [r for r in records if "prediction" in r]
        if answered:
            from core.task.metrics import answer_scores

            metrics |= answer_scores(
                [r["prediction"] for r in answered], [r["reference"] for r in answered]
            )
        return metrics

    # -- output --------------------------------------------------------------------------------

    def save_final(
        self, model: nn.Module, state_dict: dict[str, torch.Tensor], out_dir: Path
    ) -> None:
        """The adapter, tokenizer and ``lora_llm.json``."""
        super().save_final(model, state_dict, out_dir)
        write_settings(out_dir, self.settings())

    def settings(self) -> dict[str, Any]:
        """What ``infer`` and ``merge`` need to rebuild the training setup."""
        cfg, quant, lora = self.cfg, self.cfg.quant, self.cfg.lora
        return {
            "lora_llm_version": __version__,
            "base_model": getattr(self, "base_name", cfg.model.name),
            "model_name": cfg.model.name,
            "template": cfg.data.template,
            "chat_source": self.encoder.chat_source,
            "max_length": cfg.data.max_length,
            "quant": {
                k: getattr(quant, k)
                for k in ("bits", "quant_type", "double_quant", "compute_dtype")
            },
            "model_dtype": cfg.model.dtype,
            "lora": {
                k: getattr(lora, k)
                for k in ("r", "alpha", "target_modules", "use_rslora", "use_dora")
            },
        }

    def manifest_entries(self) -> dict[str, Any]:
        """Model, tokenizer, template and quantization facts, and how perplexity is computed."""
        return {
            "metrics": {
                "perplexity": {
                    "implementation": "exp(token-weighted mean cross-entropy of response tokens)",
                    "version": __version__,
                }
            },
            "lora_llm": {
                **self.settings(),
                "tokenizer": self.tokenizer.name_or_path,
                "data": {k: v.summary(self.cfg.data.max_length) for k, v in self.stats.items()},
            },
        }


def adapter_setup(
    adapter: Path, base: str | None
) -> tuple[dict[str, Any], dict[str, Any], str, Any]:
    """``(adapter_config, settings, base, tokenizer)`` of an adapter folder."""
    from core.commands.train import check_model_dir, model_owner
    from core.task.adapters import resolve_base
    from lora_llm.model import read_adapter

    try:
        adapter_config, settings = read_adapter(adapter)
    except UserError:
        # A run or model of another task is named as such (infer and merge; evaluate checks
        # first); any other folder keeps read_adapter's message.
        owner = model_owner(adapter) if Path(adapter).is_dir() else None
        if owner is not None and owner[0] != "lora_llm":
            check_model_dir(adapter, "adapter_config.json", "an adapter folder", "lora_llm")
        raise
    base_name = resolve_base(adapter, adapter_config, base)
    source = adapter if (adapter / "tokenizer_config.json").is_file() else base_name
    tokenizer = load_tokenizer(ModelConfig(name=base_name), source)
    return adapter_config, settings, base_name, tokenizer


def trained_encoder(tokenizer: Any, settings: dict[str, Any]) -> Encoder:
    """The prompt encoder an adapter was trained with (its saved settings)."""
    return Encoder(
        tokenizer,
        settings.get("template", "auto"),
        settings.get("max_length", 512),
        chat_source=settings.get("chat_source"),
    )


def load_for_generation(
    adapter: Path, base: str | None, quant_choice: str, device: Any
) -> tuple[Any, Any, Any, str]:
    """``(model, tokenizer, encoder, base name)`` of an adapter, ready to generate;
    ``quant_choice``: ``auto`` (as in training), ``none``, ``4`` or ``8``."""
    from lora_llm.model import load_adapter_model

    _, settings, base_name, tokenizer = adapter_setup(adapter, base)
    named = {"auto": settings.get("quant", {}).get("bits"), "none": None}
    bits = named[quant_choice] if quant_choice in named else int(quant_choice)
    quant = QuantConfig(**{**settings.get("quant", {}), "bits": bits}) if bits else None
    model = load_adapter_model(
        adapter,
        base_name,
        ModelConfig(name=base_name, dtype=settings.get("model_dtype", "auto")),
        quant,
        device,
    )
    return model, tokenizer, trained_encoder(tokenizer, settings), base_name


if __name__ == "__main__":  # self-check: python -m lora_llm.task
    from core.testing.checks import trained_briefly
    from lora_llm.config import PRESETS_DIR

    steps = ["trainer.max_steps=3", "trainer.max_epochs=null", "trainer.log_every_n_steps=1"]
    overrides = [*steps, "data.max_samples=40"]
    with trained_briefly(LoraLLMConfig, LoraLLMTask, overrides, "tiny", PRESETS_DIR) as result:
        final = result.run_dir / "final"
        assert result.status == "completed" and result.step == 3, (result.status, result.step)
        assert (final / "adapter_model.safetensors").is_file() and (
            final / "lora_llm.json"
        ).is_file()
    print("lora_llm.task: ok")
