"""The Qwen2.5-VL task: what the core Trainer needs to fine-tune it. The loss is the summed
cross-entropy of the answer tokens; validation adds greedy answers whose parsed counts give
``count_accuracy`` / ``count_mae`` (under a sharded strategy ``generate`` runs with
``synced_gpus``).

Self-check: ``python -m qwen_vl.task`` (a few training steps of the tiny model on drawn data).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.errors import UserError
from core.nn.models import block_classes, check_dtypes
from core.nn.models import precision_dtype as expected_param_dtype
from core.task.base import IGNORE_INDEX, StepOutput, Task
from qwen_vl import __version__
from qwen_vl.config import QwenVLConfig
from qwen_vl.data import Collator, ConversationData, Encoder, load_conversations
from qwen_vl.metrics import METRIC_VERSION, counting_metrics
from qwen_vl.model import build_model, export_final, load_processor, param_groups, processor_source
from qwen_vl.synth import BUILTIN, builtin_data

log = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]  # a batch, or a state dict

MODEL_INPUTS = tuple(
    "input_ids attention_mask mm_token_type_ids pixel_values image_grid_thw".split()
)
"""Batch keys the model's forward takes."""


class QwenVLTask(Task[QwenVLConfig]):
    """Fine-tunes Qwen2.5-VL on conversations with images (see the module docstring)."""

    name = "qwen_vl"
    shift_labels = True
    #: the data set ``validation_step`` reads references from (validation or ``evaluate`` data)
    eval_data: ConversationData | None = None
    _dtypes_checked = False

    def setup_model_side(self, model_dir: Path | None = None) -> None:
        """The processor and pixel limits (a trained model's own once :meth:`configure_for_model`
        pointed ``model.name`` at it); ``UserError`` when it cannot be loaded here."""
        self.processor = load_processor(self.cfg.model)
        self.encoder = Encoder(self.processor, self.cfg.data.min_pixels, self.cfg.data.max_pixels)
        self.collator = Collator(self.encoder)
        e = self.encoder
        facts = (e.min_pixels, e.max_pixels, e.factor, e.max_pixels // e.factor**2)
        message = "Processor %s; images resized into [%d, %d] pixels (multiples of %d): at most %d"
        log.info(message + " vision tokens each", processor_source(self.cfg.model), *facts)

    def load_data(
        self, path: Path, generation: bool, key: str, cut_long: Any = None
    ) -> ConversationData:
        """:func:`qwen_vl.data.load_conversations` of ``path`` (named by ``key``) with this task's
        encoder and data settings."""
        d, settings = self.cfg.data, {"generation": generation, "cut_long": cut_long, "key": key}
        for name in ("max_source_pixels", "max_length", "drop_too_long", "system_prompt"):
            settings[name] = getattr(d, name)
        decode = d.verify_images == "decode"
        data = load_conversations(Path(path), self.encoder, decode_images=decode, **settings)
        convs = data.conversations
        images, text_only = sum(len(c.images) for c in convs), sum(not c.images for c in convs)
        facts = (len(data), text_only, images, max(data.lengths, default=0))
        log.info("%s: %d records (%d text-only), %d images, %d tokens at most", path, *facts)
        return data

    def setup_data(self) -> None:
        """Every record of the training and validation files, validated (``UserError``: no
        training file, or a bad record)."""
        d = self.cfg.data
        if d.train_file is None:
            raise UserError(
                "data.train_file is not set. Point it at your JSONL conversations, or use "
                f"data.train_file={BUILTIN} data.val_file={BUILTIN} for the built-in counting "
                "data (drawn into a cache folder on first use)."
            )
        # The config keeps ``builtin:counting`` (so a continued run's config is unchanged); the
        # task reads the cached files it stands for.
        train_file = self.resolve_builtin(d.train_file, "train")
        val_file = self.resolve_builtin(d.val_file, "dev")
        self.train_data = self.load_data(train_file, generation=False, key="data.train_file")
        if val_file is not None:
            self.val_data = self.load_data(
                val_file, generation=self.cfg.generation.in_validation, key="data.val_file"
            )
            self.eval_data = self.val_data

    def resolve_builtin(self, path: Path | None, split: str) -> Path | None:
        """``builtin:counting`` -> the cached built-in file (rank 0 draws it); others unchanged."""
        if path is None or str(path) != BUILTIN:
            return path
        with self.ranks.rank_zero_first():
            return builtin_data(split)

    def data_files(self) -> list[Path]:
        """The JSONL files read (images are covered by the manifest's image fingerprint)."""
        return [f for d in (self.train_data, self.val_data) if d is not None for f in d.files]

    def configure_model(self) -> nn.Module:
        """The model with its training switches, on Fabric's default device and dtype."""
        m, tc = self.cfg.model, self.cfg.trainer
        checkpointing = m.gradient_checkpointing
        if checkpointing and tc.strategy == "fsdp":
            log.info(
                "model.gradient_checkpointing is ignored under FSDP; "
                "fsdp.activation_checkpointing=%s applies",
                self.cfg.fsdp.activation_checkpointing,
            )
            checkpointing = False
        model = build_model(m, self.processor, gradient_checkpointing=checkpointing)
        check_dtypes(model, expected_param_dtype(tc.precision))
        self.check_loss_head(model)
        return model

    def parameter_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Groups ``vision`` / ``merger`` / ``llm``, decay / no-decay each."""
        return param_groups(model, self.cfg.model, self.cfg.optim.lr, self.cfg.optim.weight_decay)

    def fsdp_wrap_classes(self) -> set[type[nn.Module]]:
        """``Qwen2_5_VLDecoderLayer`` and ``Qwen2_5_VLVisionBlock`` (its ``_no_split_modules``)."""
        from transformers import Qwen2_5_VLForConditionalGeneration

        return block_classes(Qwen2_5_VLForConditionalGeneration)

    def configure_for_model(self, model_dir: Path, overrides: Any) -> None:
        """The model and its own processor; unless overridden, the pixel limits saved with the
        model's processor (the ones it was trained with), not the config's."""
        cfg = self.cfg
        keys = {r.split("=", 1)[0] for r in overrides}
        for limit in ("min_pixels", "max_pixels"):
            if f"data.{limit}" not in keys:
                setattr(cfg.data, limit, None)
        cfg.model.name, cfg.model.processor = str(model_dir), None
        cfg.model.lora.enabled = False  # final/ holds merged weights

    def evaluation_inputs(self, data: Path | None, split: str) -> list[tuple[Path, str]]:
        """Nothing beyond the config's files; refuses a config without ``data.val_file``."""
        if data is None and self.cfg.data.val_file is None:
            raise UserError(
                "No data to evaluate on: give --data FILE, or a config whose data.val_file is set."
            )
        return []

    def load_trained(self, model_dir: Path, options: Any, fabric: Any) -> nn.Module:
        """The model's processor, then the model (``model.name`` is ``model_dir``)."""
        self.setup_model_side(model_dir)
        with fabric.init_module(empty_init=False):
            return self.configure_model()

    def evaluation_set(
        self, data: Path | None, split: str, options: Any, report: bool
    ) -> ConversationData:
        """``--data`` or ``data.val_file`` for generation; a record over the input limit gets its
        last question cut (counted in one note)."""
        from transformers import AutoConfig

        from core.task.truncation import Truncation, input_limit, model_limit

        cfg = self.cfg
        config = AutoConfig.from_pretrained(cfg.model.name)
        hard = model_limit(config, reserve=cfg.generation.max_new_tokens)
        limits = (options.max_input_tokens, cfg.data.max_length, hard, "data.max_length")
        cfg.data.max_length, origin = input_limit(*limits)
        cut = Truncation(cfg.data.max_length, origin, "records")
        source, key = (data, "--data") if data is not None else (cfg.data.val_file, "data.val_file")
        path = self.resolve_builtin(Path(source), "dev")
        self.eval_data = self.load_data(path, generation=True, key=key, cut_long=cut)
        cut.report(enabled=report)
        return self.eval_data

    def evaluation_row(self, record: dict[str, Any]) -> dict[str, Any]:
        """``{id, prediction, reference}``."""
        return {k: record[k] for k in ("id", "prediction", "reference") if k in record}

    def evaluation_scores(self, metrics: dict[str, float], run: Any) -> dict[str, Any]:
        """The metrics, the model, the data file and the processes."""
        return {
            **metrics,
            "model": str(run.model),
            "data": str(run.data if run.data is not None else self.cfg.data.val_file),
            "world_size": run.world_size,
        }

    def kept_targets(self, batch: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keep, targets)``: the ``(K,)`` positions whose next token is a label in some row, and
        the ``(B, K)`` labels at ``keep + 1`` (already shifted). Most tokens are vision and prompt
        tokens, so the head (152k columns for Qwen) runs only there (``logits_to_keep``)."""
        labels = batch["labels"]
        keep = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)  # (K,)
        return keep, labels[:, keep + 1]

    def call(self, model: nn.Module, batch: Tensors, keep: torch.Tensor) -> Any:
        """One forward of the model with the head at the ``keep`` positions; the output object."""
        return model(**{k: batch[k] for k in MODEL_INPUTS}, use_cache=False, logits_to_keep=keep)

    def training_step(self, model: nn.Module, batch: Tensors) -> StepOutput:
        """Summed loss of the assistant tokens of ``batch`` (:class:`Collator`) and their count."""
        if not self._dtypes_checked:  # also after a resume: the loaded weights keep one dtype
            check_dtypes(model, expected_param_dtype(self.cfg.trainer.precision))
            self._dtypes_checked = True
        keep, targets = self.kept_targets(batch)
        return self.loss_sum(model, lambda: self.call(model, batch, keep), targets, shift=False)

    def sample_losses(self, model: nn.Module, batch: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample loss sums and answer-token counts, both ``(B,)``."""
        keep, targets = self.kept_targets(batch)
        return self.sample_loss_sums(model, lambda: self.call(model, batch, keep), targets, False)

    def generate(self, model: nn.Module, batch: Tensors) -> list[str]:
        """The ``B`` greedy answers (special tokens removed) to the left-padded ``gen_*`` prompts of
        ``batch``."""
        inputs = {k: batch[f"gen_{k}"] for k in MODEL_INPUTS[:3]}  # the prompts
        inputs.update(pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
        greedy = {"max_new_tokens": self.cfg.generation.max_new_tokens, "do_sample": False}
        out = model.generate(**inputs, **greedy, synced_gpus=self.ranks.sharded)
        answers = out[:, inputs["input_ids"].shape[1] :]
        return self.processor.tokenizer.batch_decode(answers, skip_special_tokens=True)

    def add_predictions(
        self, model: nn.Module, batch: Tensors, records: list[dict[str, Any]]
    ) -> None:
        """When generating: the answer, the reference and the record ``id`` of each sample."""
        if "gen_input_ids" in batch and self.eval_data is not None:
            for record, answer in zip(records, self.generate(model, batch)):
                conv = self.eval_data.conversations[record["index"]]
                record.update(prediction=answer.strip(), reference=conv.reference, id=conv.id)

    def compute_metrics(self, records: list[dict[str, Any]]) -> dict[str, float]:
        """``loss`` (token-weighted), and with generation the counting metrics."""
        metrics = super().compute_metrics(records)
        answered = [r for r in records if "prediction" in r]
        if answered:
            predictions = [r["prediction"] for r in answered]
            metrics.update(counting_metrics(predictions, [r["reference"] for r in answered]))
        return metrics

    def save_final(self, model: nn.Module, state_dict: Tensors, out_dir: Path) -> None:
        """Model (LoRA merged) and processor (:func:`qwen_vl.model.export_final`)."""
        lora = self.cfg.model.lora if self.cfg.model.lora.enabled else None
        export_final(model, state_dict, out_dir, self.processor, lora)

    def manifest_entries(self) -> dict[str, Any]:
        """Metric implementation, model and processor sources, pixel limits, image fingerprints."""
        e, data = self.encoder, (self.train_data, self.val_data)
        how = "qwen_vl.metrics.counting_metrics (first number in the answer)"
        metric = {"implementation": how, "version": METRIC_VERSION}
        return {
            "metrics": {name: metric for name in ("count_accuracy", "count_mae")},
            "qwen_vl_version": __version__,
            "model": self.cfg.model.name,
            "processor": processor_source(self.cfg.model),
            "pixels": {"min": e.min_pixels, "max": e.max_pixels, "factor": e.factor},
            "image_fingerprints": {
                str(d.files[0]): d.image_fingerprint for d in data if d is not None
            },
        }


if __name__ == "__main__":  # self-check: python -m qwen_vl.task
    from core.testing.checks import trained_briefly
    from qwen_vl.synth import SynthSettings, write_dataset

    def draw(folder: Path) -> None:
        write_dataset(folder / "data", SynthSettings(n_train=16, n_dev=4, seed=1))

    data = ["data.train_file={tmp}/data/train.jsonl", "data.val_file={tmp}/data/dev.jsonl"]
    small = ["data.max_pixels=12544", "trainer.batch_size=4", "generation.max_new_tokens=3"]
    overrides = [*data, *small, "trainer.max_steps=3"]
    with trained_briefly(QwenVLConfig, QwenVLTask, overrides, prepare=draw) as result:
        assert (result.run_dir / "final" / "model.safetensors").is_file()
    print("qwen_vl.task: ok")
