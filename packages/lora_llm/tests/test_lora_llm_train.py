"""Training in this process on the tiny preset (QLoRA, CPU): train -> infer -> merge, adapter-only
outputs, exact resume, packing, prepare, the dry run, and bad input through the command
functions."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.testing.toy import read_jsonl, train_losses
from lora_llm.cli import infer, merge, prepare, train
from lora_llm.config import ModelConfig, QuantConfig, TinyModelConfig
from lora_llm.data import Encoder, Record
from lora_llm.model import build_tiny_base, load_base, load_tokenizer
from lora_llm.task import LoraLLMTask

CPU = torch.device("cpu")


def adapter_tensors(run: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``<run>/final/adapter_model.safetensors``."""
    return load_file(run / "final" / "adapter_model.safetensors")


@pytest.mark.trains
def test_a_qlora_run_writes_an_adapter_that_plain_peft_loads(trained_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = trained_run.run_dir
    assert trained_run.status == "completed" and trained_run.step == 8
    final = run / "final"
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "lora_llm.json",
    } <= {p.name for p in final.iterdir()}
    assert not (final / "model.safetensors").exists()
    tensors = adapter_tensors(run)
    assert len(tensors) == 16 and all(".lora_A." in k or ".lora_B." in k for k in tensors)
    config = json.loads((final / "adapter_config.json").read_text())
    assert (
        config["base_model_name_or_path"] == str((run / "base").resolve())
        and (run / "base" / "model.safetensors").is_file()
    )
    assert (
        config["r"] == 8
        and config["lora_alpha"] == 16
        and sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    )
    # The plain peft path: base from its folder, adapter from final/.
    base = AutoModelForCausalLM.from_pretrained(run / "base")
    model = PeftModel.from_pretrained(base, final).eval()
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    assert float((adapted - plain).abs().max()) > 1e-3, "the trained adapter must change the model"
    # Checkpoints hold only the trainable (adapter) weights plus optimizer state.
    state = torch.load(
        sorted((run / "checkpoints").glob("step-*"))[-1] / "state", weights_only=False
    )
    assert (
        state["model"] and all("lora_" in k for k in state["model"]) and state["optimizer"]["state"]
    )
    # Logs: losses, validation, padding share, data statistics with truncation.
    records = read_jsonl(run / "metrics.jsonl")
    assert any("data/padding_share" in r for r in records) and any(
        "val/perplexity" in r for r in records
    )
    stats = json.loads((run / "data_stats.json").read_text())
    assert (
        stats["train"]["samples"] > 0
        and "truncated_samples" in stats["train"]
        and stats["val"]["samples"] == 16
    )
    log = (run / "train.log").read_text()
    assert "trainable of" in log and "4-bit nf4" in log
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["lora_llm"]["quant"]["bits"] == 4 and len(manifest["data_files"]) == 2


@pytest.mark.trains
def test_infer_generates_with_the_training_prompt(trained_run, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    final = trained_run.run_dir / "final"
    assert (
        infer(
            [
                "--adapter",
                str(final),
                "--prompt",
                "Name a fruit.",
                "--greedy",
                "--max-new-tokens",
                "12",
                "--quant",
                "none",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out.strip()
    # The same answer from the plain peft model and the training prompt format.
    tokenizer = load_tokenizer(ModelConfig(name="tiny"), final)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(trained_run.run_dir / "base"), final
    ).eval()
    prompt = Encoder(tokenizer, "auto", 256, chat_source="builtin").prompt_ids(
        Record(source="t", instruction="Name a fruit.")
    )
    assert tokenizer.decode(prompt).startswith("<s>Below is an instruction") and tokenizer.decode(
        prompt
    ).endswith("### Response:\n")
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    assert text == tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True).strip()
    # A file of instruction and chat records, on the 4-bit base as in training, sampled.
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"instruction": "한국의 수도는?", "output": "서울"}, ensure_ascii=False)
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "Hello"}]})
        + "\n",
        encoding="utf-8",
    )
    answers = tmp_path / "answers.jsonl"
    assert (
        infer(
            [
                "--adapter",
                str(final),
                "--input",
                str(prompts),
                "--output",
                str(answers),
                "--max-new-tokens",
                "8",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    rows = read_jsonl(answers)
    assert len(rows) == 2 and rows[0]["reference"] == "서울" and "messages" in rows[1]
    assert all(isinstance(r["generated"], str) for r in rows)


@pytest.mark.trains
def test_merge_saves_a_model_whose_logits_match_the_adapter(trained_run, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    final = trained_run.run_dir / "final"
    out = tmp_path / "merged"
    assert merge(["--adapter", str(final), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "verification passed" in printed
    report = json.loads((out / "merge_report.json").read_text())
    assert report["ok"] and report["dtype"] == "float32"
    assert (
        report["max_abs_diff"] < 1e-4
        and report["reloaded_max_abs_diff"] < 1e-5
        and report["adapter_effect"] > 1e-3
    )
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(trained_run.run_dir / "base"), final
    ).eval()
    ids = torch.tensor([[1, 200, 300, 400, 500, 600]])
    with torch.no_grad():
        assert torch.allclose(
            merged(input_ids=ids).logits, adapter(input_ids=ids).logits, atol=1e-4
        )
    # Never into a non-empty folder, never into a 4-bit base.
    assert merge(["--adapter", str(final), "--out", str(out)]) == 2
    assert "already holds a merged model" in capsys.readouterr().err
    quantized = tmp_path / "base-4bit"
    load_base(
        trained_run.run_dir / "base", ModelConfig(name="x"), QuantConfig(bits=4), CPU
    ).save_pretrained(quantized)
    assert (
        merge(["--adapter", str(final), "--out", str(tmp_path / "m2"), "--base", str(quantized)])
        == 2
    )
    assert "quantized checkpoint" in capsys.readouterr().err and not (tmp_path / "m2").exists()


@pytest.mark.trains
def test_adapters_that_do_not_fit_exit_2(trained_run, tmp_path, capsys, tokenizer):
    final = str(trained_run.run_dir / "final")
    common = ["--prompt", "Hi", "--max-new-tokens", "2", "--quant", "none"]
    assert infer(["--adapter", str(tmp_path / "nowhere"), *common]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert infer(["--adapter", str(tmp_path / "empty"), *common]) == 2
    assert "is not a LoRA adapter folder" in capsys.readouterr().err
    narrow = build_tiny_base(
        TinyModelConfig(hidden_size=32, intermediate_size=64), tokenizer, tmp_path / "narrow"
    )
    assert infer(["--adapter", final, "--base", str(narrow), *common]) == 2
    assert "does not match the base model" in capsys.readouterr().err
    deeper = build_tiny_base(TinyModelConfig(num_layers=3), tokenizer, tmp_path / "deeper")
    assert infer(["--adapter", final, "--base", str(deeper), *common]) == 2
    err = capsys.readouterr().err
    assert "holds 16 LoRA tensors, the base has places for 24" in err
    assert infer(["--adapter", final, "--base", str(tmp_path / "no-base"), *common]) == 2
    assert "does not exist" in capsys.readouterr().err
    # A base of another kind (a seq2seq model): one paragraph, no library load report before it.
    from transformers import BartConfig, BartForConditionalGeneration

    BartForConditionalGeneration(
        BartConfig(
            vocab_size=64,
            d_model=16,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
        )
    ).save_pretrained(tmp_path / "bart")
    assert infer(["--model", final, "--base", str(tmp_path / "bart"), *common]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and ("holds a bart model (BartForConditionalGeneration), not a causal language model")
        in err
    )


@pytest.mark.trains
@pytest.mark.parametrize(
    "batching",
    [(), ("data.packing=false", "trainer.batch_size=8")],
    ids=["packed-the-preset", "unpacked-grouped"],
)
def test_resume_of_an_adapter_run_is_exact(run_tiny, batching):
    args = (
        *batching,
        "trainer.max_steps=6",
        "trainer.max_epochs=null",
        "trainer.log_every_n_steps=1",
        "trainer.ckpt_every_n_steps=2",
        "checkpoint.keep_last=10",
        "trainer.deterministic=true",
        "data.max_samples=64",
        "trainer.val_every_n_steps=null",
    )
    full = run_tiny(*args, root="full")
    checkpoint = full.run_dir / "checkpoints" / "step-0000004"
    resumed = run_tiny(*args, f"trainer.resume={checkpoint}", root="resumed")
    a, b = adapter_tensors(full.run_dir), adapter_tensors(resumed.run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full_losses, resumed_losses = train_losses(full.run_dir), train_losses(resumed.run_dir)
    assert sorted(resumed_losses) == [5, 6]
    assert all(resumed_losses[s] == full_losses[s] for s in resumed_losses)
    # ... and the adapter did train: it differs from the one at step 4.
    step4 = {
        k.replace(".default", ""): v
        for k, v in torch.load(checkpoint / "state", weights_only=False)["model"].items()
    }
    assert step4.keys() == a.keys() and any(not torch.equal(step4[k], a[k]) for k in a)


@pytest.mark.trains
def test_packing_trains_with_less_padding(run_tiny):
    """The tiny preset packs (data.packing=true); the same two steps unpacked pad far more."""
    short = (
        "trainer.max_steps=2",
        "trainer.max_epochs=null",
        "data.max_samples=96",
        "trainer.val_every_n_steps=null",
        "trainer.log_every_n_steps=1",
    )
    packed = run_tiny(*short, root="packed")
    unpacked = run_tiny(*short, "data.packing=false", "trainer.batch_size=8", root="unpacked")

    def padding(result):
        rows = read_jsonl(result.run_dir / "metrics.jsonl")
        return [r["data/padding_share"] for r in rows if "data/padding_share" in r]

    assert padding(packed)[0] < padding(unpacked)[0] / 2, (padding(packed), padding(unpacked))
    stats = json.loads((packed.run_dir / "data_stats.json").read_text())
    assert stats["train"]["packed_rows"] < stats["train"]["samples"]
    assert (
        "packed_rows" not in json.loads((unpacked.run_dir / "data_stats.json").read_text())["train"]
    )
    log = (packed.run_dir / "train.log").read_text()
    assert "Packing check: packed vs separate logits differ by" in log
    samples, rows = stats["train"]["samples"], stats["train"]["packed_rows"]
    assert f"Data: {rows} packed rows ({samples} samples), " in log  # batches count rows
    unpacked_log = (unpacked.run_dir / "train.log").read_text()
    assert f"Data: {samples} training samples, " in unpacked_log
    assert "Packing check" not in unpacked_log
    assert all(v == v for v in train_losses(packed.run_dir).values())  # finite


def test_bad_input_exits_2_and_leaves_no_run_folder(tmp_path, capsys):
    root = tmp_path / "runs"
    cases = {
        "broken.jsonl": (
            '{"instruction": "A", "output": "a"}\n{"instruction": "B", "output": \n',
            r"broken.jsonl:2:32: not valid JSON (Expecting value)",
        ),
        "empty.jsonl": (
            '{"instruction": "A", "output": "a"}\n{"instruction": "B", "output": ""}\n',
            r"empty.jsonl:2: 'output' is empty",
        ),
        "long.jsonl": (
            json.dumps({"instruction": "Summarize: " + "many words " * 60, "output": "ok"}) + "\n",
            r"long.jsonl:1: the prompt has",
        ),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        code = train(
            [
                "-c",
                "tiny",
                f"run.root={root}",
                f"data.train_files=[{tmp_path / name}]",
                "data.max_length=64",
                "logger.progress_bar=false",
            ]
        )
        err = capsys.readouterr().err
        assert code == 2, err
        assert (
            err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
        ), err
    assert not root.exists() or not any(root.iterdir())


def test_prepare_writes_samples_and_statistics_that_train_reads_back(tmp_path, capsys, make_config):
    out = tmp_path / "prepared"
    assert (
        prepare(
            [
                "-c",
                "tiny",
                "--data",
                "sample:ko",
                "--out",
                str(out),
                "data.max_length=64",
                "data.long_prompts=skip",
                "data.val_size=4",
            ]
        )
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    stats = json.loads((out / "stats.json").read_text())
    assert stats["train"]["samples"] + stats["train"]["long_prompts_skipped"] == 44
    assert (
        stats["train"]["truncated_samples"] > 0 and stats["train"]["lengths"]["total"]["max"] <= 64
    )
    assert stats["train"]["templates"] == {"alpaca_ko": stats["train"]["samples"]}
    rows = read_jsonl(out / "train.jsonl")
    assert rows[0]["text"].startswith("<s>아래는") and len(rows[0]["input_ids"]) == len(
        rows[0]["labels"]
    )
    # train reads the prepared files as they are: the same token ids and labels.
    original = LoraLLMTask(
        make_config(
            tmp_path,
            "data.train_files=[sample:ko]",
            "data.max_length=64",
            "data.long_prompts=skip",
            "data.val_size=4",
        )
    )
    original.setup()
    again = LoraLLMTask(
        make_config(
            tmp_path,
            f"data.train_files=[{out / 'train.jsonl'}]",
            f"data.val_files=[{out / 'val.jsonl'}]",
            "data.max_length=64",
        )
    )
    again.setup()
    assert [e["input_ids"] for e in again.train_data.examples] == [
        e["input_ids"] for e in original.train_data.examples
    ]
    assert [e["labels"] for e in again.train_data.examples] == [
        e["labels"] for e in original.train_data.examples
    ]
    assert [e["input_ids"] for e in again.val_data.examples] == [
        e["input_ids"] for e in original.val_data.examples
    ]
    assert stats["val"]["samples"] + stats["val"]["long_prompts_skipped"] == 4
    # Its own folder again: replaced. A folder of someone else's files: refused, untouched.
    assert prepare(["-c", "tiny", "--data", "sample:ko", "--out", str(out)]) == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "train.jsonl").write_text("my data\n", encoding="utf-8")
    capsys.readouterr()
    assert prepare(["-c", "tiny", "--data", "sample:ko", "--out", str(mine)]) == 2
    assert "already holds files this command did not write (train.jsonl)" in capsys.readouterr().err
    assert (mine / "train.jsonl").read_text(encoding="utf-8") == "my data\n" and len(
        list(mine.iterdir())
    ) == 1


def test_dry_run_reports_parameters_and_memory_without_weights(capsys):
    assert train(["-c", "phi2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (
        "2,784,926,720 total, 5,242,880 trainable (0.188%)" in out
        and "8 GB GPU             fits" in out
    )
    assert (
        train(
            [
                "-c",
                "phi2",
                "--dry-run",
                "lora.r=64",
                "data.max_length=2048",
                "quant.bits=null",
                "model.gradient_checkpointing=false",
            ]
        )
        == 0
    )
    assert "does NOT fit" in capsys.readouterr().out


@pytest.mark.trains
def test_lora_settings_reach_the_adapter(run_tiny):
    result = run_tiny(
        "lora.r=4",
        "lora.alpha=8",
        "lora.target_modules=[all-linear]",
        "quant.bits=8",
        "trainer.max_steps=1",
        "trainer.max_epochs=null",
        "data.max_samples=24",
        "trainer.val_every_n_steps=null",
        "optim.name=adamw",
    )
    config = json.loads((result.run_dir / "final" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert {t.rsplit(".", 1)[-1] for t in config["target_modules"]} == {
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    }
    assert (
        json.loads((result.run_dir / "final" / "lora_llm.json").read_text())["quant"]["bits"] == 8
    )


class Terminal(io.StringIO):
    """A stdin that says it is a terminal."""

    def isatty(self) -> bool:
        """Always a terminal."""
        return True


@pytest.mark.trains
def test_infer_is_interactive_on_a_terminal_only(trained_run, monkeypatch, capsys):
    final = str(trained_run.run_dir / "final")
    lines = iter(["Name a color.", "Name a fruit.", ""])
    monkeypatch.setattr(sys, "stdin", Terminal())
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert infer(["--adapter", final, "--greedy", "--max-new-tokens", "4", "--quant", "none"]) == 0
    captured = capsys.readouterr()
    assert "an empty line quits" in captured.err and len(captured.out.splitlines()) == 2
    monkeypatch.setattr(sys, "stdin", io.StringIO())  # not a terminal, no prompt
    assert infer(["--adapter", final]) == 2
    assert "Give --prompt TEXT or --data FILE.jsonl" in capsys.readouterr().err
