"""Models: training switches and per-part learning rates, LoRA only on the language model, export
to final/ (plain from_pretrained, LoRA merged), dtypes, FSDP units, Hub presets offline, the tiny
processor's reproducibility."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from qwen_vl.config import LoraConfig as LoraSettings
from qwen_vl.config import ModelConfig


def collated(processor: Any, tmp_path: Path) -> dict[str, torch.Tensor]:
    """A real two-sample batch (one image record, one text-only record) with the tiny processor."""
    import json

    from PIL import Image

    from qwen_vl.data import Collator, Encoder, load_conversations

    Image.new("RGB", (90, 60), (0, 90, 200)).save(tmp_path / "x.png")
    rows = [
        {
            "id": "i",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": "x.png"},
                        {"type": "text", "text": "How many?"},
                    ],
                },
                {"role": "assistant", "content": "2"},
            ],
        },
        {
            "id": "t",
            "messages": [
                {"role": "user", "content": "How many letters are in cat?"},
                {"role": "assistant", "content": "3"},
            ],
        },
    ]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    encoder = Encoder(processor, 3136, 12544)
    data = load_conversations(tmp_path / "b.jsonl", encoder, max_source_pixels=10**8)
    return Collator(encoder)([data[0], data[1]])


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys the model's forward takes."""
    return {
        k: batch[k]
        for k in (
            "input_ids",
            "attention_mask",
            "mm_token_type_ids",
            "pixel_values",
            "image_grid_thw",
        )
    }


def test_switches_and_per_part_learning_rates(processor):
    from qwen_vl.model import build_model, model_parts, param_groups

    cfg = ModelConfig(
        train_vision=False, train_merger=True, train_llm=True, lr_merger=1e-3, lr_llm=2e-4
    )
    model = build_model(cfg, processor, gradient_checkpointing=False)
    parts = model_parts(model)
    trains = {
        name: {p.requires_grad for m in mods for p in m.parameters()}
        for name, mods in parts.items()
    }
    assert trains == {"vision": {False}, "merger": {True}, "llm": {True}}
    groups = param_groups(model, cfg, lr=5e-5, weight_decay=0.1)
    assert {g["name"]: g["lr"] for g in groups} == {
        "merger/decay": 1e-3,
        "merger/no_decay": 1e-3,
        "llm/decay": 2e-4,
        "llm/no_decay": 2e-4,
    }
    assert all(g["weight_decay"] == (0.1 if g["name"].endswith("/decay") else 0.0) for g in groups)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert (
        len(grouped) == len(set(grouped)) == sum(1 for p in model.parameters() if p.requires_grad)
    )
    frozen_llm = build_model(
        ModelConfig(train_llm=False, train_vision=True), processor, gradient_checkpointing=False
    )
    assert {
        g["name"].split("/")[0] for g in param_groups(frozen_llm, ModelConfig(), 1e-4, 0.0)
    } == {"vision", "merger"}


def test_lora_adapts_only_the_language_model_and_final_holds_the_merged_model(processor, tmp_path):
    """Adapters sit only in the language model's decoder layers (the vision blocks have layers of
    the same names). With non-zero adapters, final/ loads as a plain model whose logits equal the
    adapted model's: the adapters are merged, not dropped."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from qwen_vl.model import build_model, export_final

    torch.manual_seed(0)
    cfg = ModelConfig(lora=LoraSettings(enabled=True, r=4, alpha=8), train_merger=True)
    model = build_model(cfg, processor, gradient_checkpointing=False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    adapters = [n for n in trainable if "lora_" in n]
    assert adapters and all(".language_model.layers." in n for n in adapters)
    assert {n for n in trainable if "lora_" not in n} == {
        n for n, _ in model.named_parameters() if ".visual.merger." in n
    }
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # trained adapters are not zero
    batch = model_inputs(collated(processor, tmp_path))
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    out = tmp_path / "final"
    out.mkdir()
    export_final(
        model,
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        out,
        processor,
        cfg.lora,
    )
    loaded = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    with torch.no_grad():
        got = loaded(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (
        AutoProcessor.from_pretrained(out).image_processor.size.longest_edge
        == processor.image_processor.size.longest_edge
    )


def test_bf16_model_exports_bf16_safetensors(processor, tmp_path):
    from safetensors import safe_open

    from core.nn.models import check_dtypes
    from qwen_vl.model import build_model, export_final

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # what Fabric's init_module does for bf16-true
    try:
        model = build_model(ModelConfig(), processor, gradient_checkpointing=False)
    finally:
        torch.set_default_dtype(previous)
    check_dtypes(model, torch.bfloat16)
    with pytest.raises(RuntimeError, match="not torch.float32"):
        check_dtypes(model, torch.float32)
    export_final(
        model,
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        tmp_path,
        processor,
        None,
    )
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert '"dtype": "bfloat16"' in (tmp_path / "config.json").read_text()


def test_training_loss_from_kept_positions_equals_the_full_logits_loss(
    processor, tmp_path, tiny_config
):
    """The task computes the vocabulary head only where a label follows; the loss and its
    token count must equal the plain shifted cross-entropy over the full logits."""
    from core.task.base import token_loss_sum
    from qwen_vl.model import build_model
    from qwen_vl.task import QwenVLTask

    task = QwenVLTask(tiny_config())
    task.setup_model_side()
    model = build_model(ModelConfig(), processor, gradient_checkpointing=False)
    batch = collated(processor, tmp_path)
    out = task.training_step(model, batch)
    full = token_loss_sum(model(**model_inputs(batch)).logits, batch["labels"], shift=True)
    torch.testing.assert_close(out.loss_sum, full.loss_sum, rtol=1e-5, atol=1e-5)
    assert (
        int(out.num_tokens) == int(full.num_tokens) == task.count_loss_tokens(batch) == 4
    )  # "2", "3" + two <|im_end|>


def test_fsdp_units_are_decoder_layers_and_vision_blocks(tiny_config):
    from core.parallel.fsdp import resolve_wrap_classes
    from qwen_vl.task import QwenVLTask

    task = QwenVLTask(tiny_config())
    names = {c.__name__ for c in task.fsdp_wrap_classes()}
    assert names == {"Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"}
    assert {
        c.__name__
        for c in resolve_wrap_classes(["Qwen2_5_VLVisionBlock"], task.fsdp_wrap_classes())
    } == {"Qwen2_5_VLVisionBlock"}


@pytest.mark.parametrize(
    "preset, hub_id",
    [
        ("qwen2_5_vl_3b", "Qwen/Qwen2.5-VL-3B-Instruct"),
        ("qwen2_5_vl_7b", "Qwen/Qwen2.5-VL-7B-Instruct"),
    ],
)
def test_hub_presets_fail_fast_offline(
    monkeypatch, capsys, tmp_path, counting_data, preset, hub_id
):
    """Offline, a Hub preset stops in seconds with exit code 2, says how to proceed and leaves no
    run folder."""
    from core.task.hub import is_cached
    from qwen_vl.cli import train

    if is_cached(hub_id):
        pytest.skip(f"{hub_id} is in the local Hugging Face cache, so it would load")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    code = train(
        [
            "-c",
            preset,
            f"run.root={tmp_path / 'runs'}",
            f"data.train_file={counting_data / 'train.jsonl'}",
            f"data.val_file={counting_data / 'dev.jsonl'}",
            "trainer.accelerator=cpu",
            "trainer.strategy=auto",
            "trainer.precision=32-true",
        ]
    )
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2 and elapsed < 10, (code, elapsed)
    assert hub_id in err and "-c tiny" in err and "not reachable" in err
    assert not (tmp_path / "runs").exists() or not [
        p for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".")
    ]


def test_presets_carry_the_users_recipe():
    from core.config.loader import load_config
    from qwen_vl.cli import PRESETS_DIR
    from qwen_vl.config import QwenVLConfig

    for preset in ("qwen2_5_vl_3b", "qwen2_5_vl_7b"):
        cfg = load_config(QwenVLConfig, preset, [], PRESETS_DIR)
        assert (
            cfg.optim.name,
            cfg.optim.scheduler,
            cfg.trainer.precision,
            cfg.trainer.strategy,
        ) == ("adafactor", "constant", "bf16-true", "fsdp")
        assert cfg.optim.warmup_ratio > 0 and cfg.trainer.gradient_clip_val == 1.0
        assert cfg.trainer.val_every_n_steps == cfg.trainer.ckpt_every_n_steps == 100
        assert (cfg.checkpoint.monitor, cfg.checkpoint.mode, cfg.checkpoint.load_best_at_end) == (
            "val/loss",
            "min",
            True,
        )
        f = cfg.fsdp
        assert (
            f.sharding_strategy,
            f.prefetch_backward,
            f.sync_module_states,
            f.cpu_offload,
            f.activation_checkpointing,
        ) == ("FULL_SHARD", 1, True, False, True)
        assert cfg.model.name.startswith("Qwen/Qwen2.5-VL-") and cfg.data.max_pixels is not None


def test_shipped_tiny_processor_is_reproducible(tmp_path):
    import runpy

    from core.task.tiny_tokenizer import differing_files as same_files
    from qwen_vl.model import TINY_PROCESSOR_DIR

    tool = Path(__file__).parents[1] / "tools" / "tiny_processor.py"
    build = runpy.run_path(str(tool))["build"]
    assert same_files(build(tmp_path / "tiny"), TINY_PROCESSOR_DIR) == []
    assert all(p.stat().st_size < 100_000 for p in TINY_PROCESSOR_DIR.iterdir())


# -- loss.chunked and model.liger_kernel (issue 16) -------------------------------------------


def batch_and_model(processor, tmp_path, **model_settings):
    """A real two-sample batch and the tiny model (every part trains)."""
    from qwen_vl.model import build_model

    torch.manual_seed(0)
    model = build_model(
        ModelConfig(train_vision=True, **model_settings), processor, gradient_checkpointing=False
    )
    return collated(processor, tmp_path), model


def test_chunked_loss_gives_the_plain_loss_gradients_and_validation_losses(
    processor, tmp_path, tiny_config
):
    from qwen_vl.task import QwenVLTask

    batch, model = batch_and_model(processor, tmp_path)
    results = {}
    for chunked in (True, False):
        task = QwenVLTask(
            tiny_config(f"loss.chunked={str(chunked).lower()}", "loss.chunk_tokens=3")
        )
        model.zero_grad(set_to_none=True)
        out = task.training_step(model, batch)
        out.loss_sum.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        with torch.no_grad():
            records = task.validation_step(model.eval(), {**batch, "index": torch.arange(2)})
        model.train()
        results[chunked] = (float(out.loss_sum.detach()), int(out.num_tokens), grads, records)
    (loss, tokens, grads, records), (ref_loss, ref_tokens, ref_grads, ref_records) = (
        results[True],
        results[False],
    )
    assert tokens == ref_tokens == 4 and loss == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == ref_grads.keys() and "lm_head.weight" in grads
    assert max(float((grads[k] - ref_grads[k]).abs().max()) for k in grads) < 1e-5
    for a, b in zip(records, ref_records):
        assert a["tokens"] == b["tokens"] and a["loss_sum"] == pytest.approx(b["loss_sum"], 1e-5)


@pytest.mark.gpu
def test_liger_kernel_gives_the_same_loss_on_a_gpu(processor, tmp_path, tiny_config):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: Liger Kernel's kernels are Triton GPU kernels")
    if __import__("importlib.util").util.find_spec("liger_kernel") is None:
        pytest.skip("Liger Kernel is not installed (uv sync --extra liger)")
    from qwen_vl.model import build_model
    from qwen_vl.task import QwenVLTask

    batch = {k: v.cuda() for k, v in collated(processor, tmp_path).items()}
    task = QwenVLTask(tiny_config())
    losses = []
    for liger in (False, True):
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = build_model(ModelConfig(liger_kernel=liger), processor, False)
        losses.append(float(task.training_step(model, batch).loss_sum.detach()))
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
