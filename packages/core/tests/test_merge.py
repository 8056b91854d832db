"""core.commands.merge: the ``merge`` a task declares with a MergeSpec, run on a tiny random Llama
with a random LoRA adapter (real peft merge, real save and reload)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from core.commands.merge import Loaded, MergeSpec, check_not_quantized_checkpoint, merge_dtype
from core.errors import UserError
from core.task.wordlevel import word_tokenizer


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    """``base/`` (a tiny Llama) and ``adapter/`` (a LoRA with random, non-zero B)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("merge")
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(LlamaForCausalLM(config), lora).save_pretrained(root / "adapter")
    return root


def load(args: argparse.Namespace) -> Loaded:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    check_not_quantized_checkpoint(args.base)
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(args.base), args.adapter)
    tokenizer = word_tokenizer(["merge me"], {"pad_token": "<pad>", "unk_token": "<unk>"})
    probe = torch.tensor([[1, 5, 7, 9]])
    dtype = merge_dtype(args.dtype, probe.device)
    return Loaded(model.eval(), tokenizer, probe, args.base, dtype)


SPEC = MergeSpec(prog="toy-merge", load=load, probe="hi", probe_help="a probe")


def test_merge_saves_reloads_and_reports(folders, capsys):
    out = folders / "merged"
    common = ["--model", str(folders / "adapter"), "--base", str(folders / "base")]
    assert SPEC.command([*common, "--out", str(out), "--device", "cpu"]) == 0
    report = json.loads((out / "merge_report.json").read_text())
    assert report["ok"] and report["dtype"] == "float32" and report["probe_tokens"] == 4
    assert report["max_abs_diff"] < 1e-4 and report["reloaded_max_abs_diff"] < 1e-5
    assert report["adapter_effect"] > 1e-3 and report["tolerance_relative"] == 1e-4
    assert "verification passed" in capsys.readouterr().out
    assert (out / "tokenizer.json").is_file() and (out / ".written-by.json").is_file()
    # never into the folder of an earlier merge; a tolerance nothing meets exits 1
    assert SPEC.command([*common, "--out", str(out)]) == 2
    assert "already holds a merged model" in capsys.readouterr().err
    assert SPEC.command([*common, "--out", str(folders / "m2"), "--tolerance", "-1"]) == 1
    assert "VERIFICATION FAILED" in capsys.readouterr().out


def test_merge_refuses_a_quantized_base_and_its_own_inputs(folders, capsys):
    quantized = folders / "quantized"
    quantized.mkdir()
    (quantized / "config.json").write_text('{"quantization_config": {"quant_method": "bnb"}}')
    with pytest.raises(UserError, match="is a quantized checkpoint \\(bnb\\)"):
        check_not_quantized_checkpoint(str(quantized))
    adapter = str(folders / "adapter")
    out = folders / "m3"
    assert SPEC.command(["--model", adapter, "--base", str(quantized), "--out", str(out)]) == 2
    assert "quantized checkpoint" in capsys.readouterr().err
    assert SPEC.command(["--model", adapter, "--out", adapter]) == 2
    assert "holds the input of --model" in capsys.readouterr().err
    assert merge_dtype("bfloat16", torch.device("cpu")) == "bfloat16"
