"""Models: from-scratch BART, local pretrained folders (BART and T5), freezing switches,
gradient checkpointing, T5 + fp16 refusal, Hub presets failing fast offline, bad input to train."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from core.config.loader import load_config
from core.errors import ConfigError, UserError
from summarization.config import (
    PRESETS_DIR,
    SAMPLES,
    ModelConfig,
    ScratchConfig,
    SummarizationConfig,
)
from summarization.model import (
    build_model,
    check_precision,
    load_model_config,
    load_tokenizer,
    parameter_report,
)

SCRATCH = ScratchConfig(
    d_model=32,
    encoder_layers=3,
    decoder_layers=2,
    attention_heads=2,
    ffn_dim=64,
    max_position_embeddings=128,
)


def run_dir(root: Path) -> Path:
    """The single run folder under ``root`` (``.claims`` is the run-number bookkeeping)."""
    runs = [p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(runs) == 1, runs
    return runs[0]


def build(**switches):
    """A small scratch BART with the given ``model.*`` switches, and its tokenizer."""
    cfg = ModelConfig(init="scratch", **{"scratch": SCRATCH, **switches})
    tokenizer = load_tokenizer(cfg)
    return build_model(cfg, load_model_config(cfg, tokenizer)), tokenizer


def count(module: torch.nn.Module) -> int:
    """Parameters of a module (tied tensors once)."""
    return sum(p.numel() for p in module.parameters())


def trainable(model: torch.nn.Module) -> int:
    """Parameters that require gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_freezing_switches_change_trainable_counts_exactly():
    model, tokenizer = build()
    total = count(model)
    assert trainable(model) == total
    bart = model.model
    embeddings = (
        count(bart.shared)
        + count(bart.encoder.embed_positions)
        + count(bart.decoder.embed_positions)
    )
    assert count(bart.shared) == len(tokenizer) * 32

    frozen, _ = build(freeze_embeddings=True)
    assert trainable(frozen) == total - embeddings
    assert not frozen.lm_head.weight.requires_grad, (
        "the output layer is tied to the token embeddings"
    )

    first_two, _ = build(freeze_encoder_layers=2)
    assert trainable(first_two) == total - 2 * count(bart.encoder.layers[0])
    assert (
        not first_two.model.encoder.layers[1].fc1.weight.requires_grad
        and first_two.model.encoder.layers[2].fc1.weight.requires_grad
    )

    listed, _ = build(freeze_encoder_layers=[0, 2], freeze_decoder_layers=[1])
    assert trainable(listed) == total - 2 * count(bart.encoder.layers[0]) - count(
        bart.decoder.layers[0]
    )
    report = parameter_report(listed)
    assert report["encoder.1"]["trainable"] == report["encoder.1"]["total"] > 0
    assert (
        report["encoder.0"]["trainable"]
        == report["encoder.2"]["trainable"]
        == report["decoder.1"]["trainable"]
        == 0
    )
    assert report["all"] == {"total": total, "trainable": trainable(listed)}

    whole, _ = build(freeze_encoder=True)
    encoder_own = sum(
        p.numel() for n, p in bart.encoder.named_parameters() if not n.startswith("embed_tokens")
    )
    assert trainable(whole) == total - encoder_own


def test_bad_freeze_settings_are_config_errors():
    with pytest.raises(ConfigError, match="has 3 blocks"):
        build(freeze_encoder_layers=4)
    with pytest.raises(ConfigError, match=r"names blocks \[5\]"):
        build(freeze_decoder_layers=[5])


def test_eager_attention_computes_what_sdpa_computes():
    batch = {
        "input_ids": torch.tensor([[0, 50, 60, 70, 2], [0, 80, 2, 1, 1]]),
        "attention_mask": torch.tensor([[1] * 5, [1, 1, 1, 0, 0]]),
        "decoder_input_ids": torch.tensor([[2, 0, 90, 91], [2, 0, 92, 1]]),
    }
    logits = {}
    for kind in ("sdpa", "eager"):
        torch.manual_seed(0)
        model, _ = build(attn_implementation=kind)
        assert model.config._attn_implementation == kind
        logits[kind] = model.eval()(**batch).logits
    assert torch.allclose(logits["sdpa"], logits["eager"], atol=1e-5)
    with pytest.raises(ConfigError, match="model.attn_implementation"):
        load_config(SummarizationConfig, "tiny", ["model.attn_implementation=fast"], PRESETS_DIR)


@pytest.mark.trains
def test_gradient_checkpointing_trains_like_without_it():
    from dataclasses import replace

    cfg = ModelConfig(init="scratch", scratch=replace(SCRATCH, dropout=0.0))
    tokenizer = load_tokenizer(cfg)
    plain = build_model(cfg, load_model_config(cfg, tokenizer))
    checkpointed = build_model(
        replace(cfg, gradient_checkpointing=True), load_model_config(cfg, tokenizer)
    )
    checkpointed.load_state_dict(plain.state_dict())
    assert checkpointed.is_activation_checkpointing and not plain.is_activation_checkpointing
    batch = tokenizer(["#Person1#: hello there\n#Person2#: hi"], return_tensors="pt")
    labels = tokenizer(text_target=["they greet"], return_tensors="pt")["input_ids"]
    grads = []
    for model in (plain, checkpointed):
        model.zero_grad()
        model(**batch, labels=labels).loss.backward()
        grads.append(model.model.encoder.layers[0].fc1.weight.grad.clone())
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-7)


@pytest.mark.trains
def test_t5_in_fp16_is_refused(tmp_path, train_cli):
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = load_tokenizer(ModelConfig(init="scratch"))
    folder = tmp_path / "tiny-t5"
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_ff=64,
        d_kv=16,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    for precision in ("16-mixed", "16-true"):
        with pytest.raises(ConfigError, match="T5 overflows in float16"):
            load_config(
                SummarizationConfig,
                "t5_small",
                [f"model.name={folder}", f"trainer.precision={precision}"],
                PRESETS_DIR,
            )
        with pytest.raises(ConfigError, match="T5 overflows"):
            check_precision(config, precision)
    check_precision(config, "bf16-mixed")
    check_precision(config, "32-true")
    code, err, root = train_cli("-c", "t5_small", "trainer.precision=16-mixed")
    assert (
        code == 2 and "T5 overflows in float16" in err and "bf16-mixed" in err and not root.exists()
    )
    # the same local T5 folder trains in float32 through the pretrained path, with the prefix
    code, err, root = train_cli(
        "-c",
        "t5_small",
        f"model.name={folder}",
        "trainer.precision=32-true",
        "trainer.max_steps=2",
        "trainer.max_epochs=null",
        "optim.name=adamw",
        "generation.num_beams=1",
        "generation.max_new_tokens=4",
    )
    assert code == 0, err
    final = run_dir(root) / "final"
    assert T5ForConditionalGeneration.from_pretrained(final).config.model_type == "t5"
    assert '"source_prefix": "summarize: "' in (final / "summarization.json").read_text()


def test_hub_preset_fails_fast_offline_with_a_way_forward(monkeypatch, train_cli):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    code, err, root = train_cli()  # no -c: the default preset, facebook/bart-large-cnn
    assert code == 2 and time.perf_counter() - start < 20
    assert (
        "Cannot load the tokenizer 'facebook/bart-large-cnn'" in err
        or "Cannot load the model 'facebook/bart-large-cnn'" in err
    )
    assert (
        "not reachable" in err and "-c tiny" in err and "model.name=/path/to/a/local/folder" in err
    )
    assert not root.exists(), "no run folder for a model that cannot be loaded"
    code, err, _ = train_cli("-c", "tiny", "data.dataset=knkarthick/dialogsum")
    assert (
        code == 2
        and "Cannot load the dataset 'knkarthick/dialogsum'" in err
        and "data.train_file" in err
    )


def test_missing_local_model_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(ModelConfig(name=str(tmp_path / "no-such-model")))


@pytest.mark.trains
def test_local_bart_folder_trains_through_the_auto_classes(tmp_path, train_cli):
    model, tokenizer = build()
    model.save_pretrained(tmp_path / "bart")
    tokenizer.save_pretrained(tmp_path / "bart")
    code, err, root = train_cli(
        "-c",
        "bart_base",
        f"model.name={tmp_path / 'bart'}",
        "trainer.max_steps=2",
        "trainer.max_epochs=null",
        "trainer.precision=32-true",
        "generation.num_beams=2",
        "generation.max_new_tokens=4",
        "data.max_source_length=128",
        "model.freeze_embeddings=true",
    )
    assert code == 0, err
    log = (run_dir(root) / "train.log").read_text()
    assert "embeddings" in log and "trainable" in log, (
        "the trainable-parameter table is logged at start"
    )


@pytest.mark.trains
def test_mbart_scratch_architecture_is_pre_norm_and_its_final_model_loads_with_auto_classes(
    train_cli,
):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model, _ = build(scratch=ScratchConfig(**{**vars(SCRATCH), "architecture": "mbart"}))
    assert type(model).__name__ == "MBartForConditionalGeneration" and count(model) > count(
        build()[0]
    )
    assert model.config.model_type == "mbart" and model.model.encoder.layer_norm is not None, (
        "pre-norm stacks end in a LayerNorm"
    )
    code, err, root = train_cli(
        "-c",
        "tiny",
        "model.scratch.architecture=mbart",
        "trainer.max_steps=4",
        "trainer.val_every_n_steps=4",
        "generation.max_new_tokens=6",
    )
    assert code == 0, err
    run = run_dir(root)
    assert "scratch mbart d_model=128" in (run / "train.log").read_text()
    again = AutoModelForSeq2SeqLM.from_pretrained(run / "final")
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    assert type(again).__name__ == "MBartForConditionalGeneration"
    ids = tokenizer(["#Person1#: Hello. #Person2#: Hi."], return_tensors="pt")
    out = again.generate(**ids, max_new_tokens=5)
    assert out.shape[0] == 1 and out.shape[1] <= 7


def mlm_task(*overrides: str):
    """A summarization task with its tokenizer and model config set up (no data read), and a
    small scratch model for it."""
    from summarization.task import SummarizationTask

    cfg = load_config(
        SummarizationConfig,
        "tiny",
        [
            "model.scratch.d_model=32",
            "model.scratch.ffn_dim=64",
            "model.scratch.dropout=0.0",
            *overrides,
        ],
        PRESETS_DIR,
    )
    task = SummarizationTask(cfg)
    task.setup_model_side()
    return task, build_model(cfg.model, task.model_config)


def test_encoder_mlm_masks_only_ordinary_source_tokens():
    task, _ = mlm_task("model.encoder_mlm=0.3")
    tok = task.tokenizer
    rows = [
        tok("#Person1#: " + "the train to London leaves at nine " * (i + 1))["input_ids"]
        for i in range(24)
    ]
    batch = task.collator(
        [{"index": i, "input_ids": ids, "labels": ids[:4]} for i, ids in enumerate(rows)]
    )
    torch.manual_seed(0)
    masked, chosen = task.masked_source(batch["input_ids"], batch["attention_mask"])
    special = torch.isin(batch["input_ids"], torch.tensor(tok.all_special_ids))
    assert not chosen[special].any() and not chosen[batch["attention_mask"] == 0].any(), (
        "never padding, <s>, </s>"
    )
    assert (masked[chosen] == tok.mask_token_id).all() and torch.equal(
        masked[~chosen], batch["input_ids"][~chosen]
    )
    share = chosen.sum() / (~special & batch["attention_mask"].bool()).sum()
    assert 0.27 < share < 0.33, share
    torch.manual_seed(0)
    assert torch.equal(
        task.masked_source(batch["input_ids"], batch["attention_mask"])[1], chosen
    ), "seeded, so resumable"


def test_encoder_mlm_adds_the_weighted_masked_lm_loss_to_the_summary_loss():
    from core.task.base import token_loss_sum

    task, model = mlm_task("model.encoder_mlm=0.25", "model.encoder_mlm_weight=2.0")
    tok = task.tokenizer
    items = [
        {
            "index": i,
            "input_ids": tok(f"#Person1#: I need {n} tickets to Paris.\n#Person2#: Here you are.")[
                "input_ids"
            ],
            "labels": tok(text_target=f"#Person1# buys {n} tickets.")["input_ids"],
        }
        for i, n in enumerate(["two", "three", "four"])
    ]
    batch = task.collator(items)
    batch.pop("index")
    torch.manual_seed(3)
    out = task.training_step(model, batch)
    # the same draw by hand: the summary loss on the masked dialogue, plus 2 x the mean
    # cross-entropy of the encoder's output at the masked positions, per summary token
    torch.manual_seed(3)
    masked, chosen = task.masked_source(batch["input_ids"], batch["attention_mask"])
    assert chosen.any()
    full = model(
        input_ids=masked,
        attention_mask=batch["attention_mask"],
        decoder_input_ids=batch["decoder_input_ids"],
    )
    summary = token_loss_sum(full.logits, batch["labels"], shift=False)
    hidden = model.model.encoder(
        input_ids=masked, attention_mask=batch["attention_mask"]
    ).last_hidden_state
    mlm = torch.nn.functional.cross_entropy(
        model.lm_head(hidden[chosen]), batch["input_ids"][chosen]
    )
    assert out.num_tokens == summary.num_tokens
    assert torch.allclose(
        out.loss_sum / out.num_tokens, summary.loss_sum / summary.num_tokens + 2.0 * mlm, atol=1e-5
    )
    clean = token_loss_sum(
        model(**{k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")}).logits,
        batch["labels"],
        shift=False,
    )
    off, _ = mlm_task()
    assert torch.equal(off.training_step(model, batch).loss_sum, clean.loss_sum), (
        "encoder_mlm=0 is the plain summary loss"
    )
    out.loss_sum.backward()
    assert model.model.encoder.layers[0].fc1.weight.grad.abs().sum() > 0


def test_label_smoothing_spreads_eps_of_each_target_over_the_vocabulary():
    task, model = mlm_task("model.label_smoothing=0.1")
    tok = task.tokenizer
    items = [
        {
            "index": i,
            "input_ids": tok(f"#Person1#: {n} coffees, please.")["input_ids"],
            "labels": tok(text_target=f"#Person1# orders {n} coffees.")["input_ids"],
        }
        for i, n in enumerate(["two", "five"])
    ]
    batch = task.collator(items)
    batch.pop("index")
    out = task.training_step(model, batch)
    logp = torch.log_softmax(task.forward_logits(model, batch).float(), dim=-1)
    kept = batch["labels"] != -100
    nll = -logp.gather(-1, batch["labels"].clamp(min=0).unsqueeze(-1)).squeeze(-1)[kept]
    uniform = -logp.mean(dim=-1)[kept]
    assert out.num_tokens == kept.sum()
    assert torch.allclose(out.loss_sum, (0.9 * nll + 0.1 * uniform).sum(), rtol=1e-5)
    with pytest.raises(ConfigError, match=r"'model.label_smoothing' \(1.0\) must be in \[0, 1\)"):
        load_config(SummarizationConfig, "tiny", ["model.label_smoothing=1.0"], PRESETS_DIR)


def test_encoder_mlm_settings_are_checked():
    with pytest.raises(ConfigError, match="model.encoder_mlm"):
        load_config(SummarizationConfig, "tiny", ["model.encoder_mlm=1.0"], PRESETS_DIR)
    with pytest.raises(ConfigError, match="trainer.strategy=fsdp"):
        mlm_task("model.encoder_mlm=0.15", "trainer.strategy=fsdp")


BAD = {
    "malformed JSON line": (
        "train",
        b'{"fname": "a", "dialogue": "x", "summary": "y"}\n{"fname": "b", "dialogue": \n',
        ":2:28: not valid JSON (Expecting value)",
    ),
    "missing field": (
        "val",
        b'{"fname": "a", "dialogue": "x", "summary": "y"}\n{"fname": "b", "dialogue": "x"}\n',
        ":2: missing field 'summary'",
    ),
    "empty dialogue": (
        "train",
        b'{"fname": "a", "dialogue": "x", "summary": "y"}\n\n\n{"fname": "b", "dialogue": ""}\n',
        ":4: field 'dialogue' is empty",
    ),
    "non-UTF-8 file": (
        "val",
        '{"fname": "a", "dialogue": "대화", "summary": "요약"}\n'.encode("cp949"),
        ":1:29: not UTF-8 text (byte 0xb4)",
    ),
    "missing file": ("train", None, " (data.train_file) does not exist"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_naming_file_and_line_without_a_run_folder(tmp_path, train_cli, case):
    split, content, expected = BAD[case]
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_bytes(content)
    code, err, root = train_cli("-c", "tiny", f"data.{split}_file={path}")
    assert code == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, (
        "one paragraph, no traceback"
    )
    assert (f"{path}{expected}" if content is not None else f"'{path}'{expected}") in err
    assert not root.exists() or not any(root.iterdir()), "bad input must not leave a run folder"


def test_shipped_samples_are_the_tiny_defaults():
    cfg = load_config(SummarizationConfig, "tiny", [], PRESETS_DIR)
    assert (
        cfg.data.file_for("train") == SAMPLES["en"] / "train.jsonl" and cfg.model.init == "scratch"
    )
    assert (
        load_config(SummarizationConfig, "tiny", ["data.sample=ko"], PRESETS_DIR).data.file_for(
            "test"
        )
        == SAMPLES["ko"] / "test.jsonl"
    )
    assert (cfg.checkpoint.monitor, cfg.checkpoint.mode) == ("val/rougeL", "max")
    assert SummarizationConfig().checkpoint.monitor == "val/rougeL", (
        "best model by ROUGE-L by default"
    )


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU (bf16-mixed training and generation on the device)",
)
def test_tiny_trains_and_generates_in_bf16_on_a_gpu(train_cli):
    import json

    code, err, root = train_cli(
        "-c",
        "tiny",
        "trainer.accelerator=cuda",
        "trainer.precision=bf16-mixed",
        "trainer.max_steps=6",
        "trainer.val_every_n_steps=3",
    )
    assert code == 0, err
    run = run_dir(root)
    assert json.loads((run / "manifest.json").read_text())["precision"] == "bf16-mixed"
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
