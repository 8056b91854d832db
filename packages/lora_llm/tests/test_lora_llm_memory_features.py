"""The memory and speed switches of lora_llm on the real loading code: the chunked loss gives the
plain loss and adapter gradients (QLoRA, LoRA on the head too), a padding-free micro-batch gives
every sample its own loss, DoRA trains and merges with the same logits, and the GPU-only paths
(flash-attention's variable-length kernel, Liger Kernel) are checked where a GPU is lent."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from core.commands.merge import merge_and_check
from core.nn.loss import head_loss, shift_targets
from core.task.base import IGNORE_INDEX, per_sample_loss
from core.task.batching import PackedDataset, flatten_batch
from core.task.batching import collate_causal as collate
from lora_llm.config import LoraSettings, ModelConfig, QuantConfig, TinyModelConfig
from lora_llm.model import add_adapter, build_tiny_base, load_base
from lora_llm.task import LoraLLMTask, call_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, tokenizer) -> Path:
    """The tiny Llama written with save_pretrained (loaded back by each test)."""
    return build_tiny_base(TinyModelConfig(), tokenizer, tmp_path_factory.mktemp("tiny") / "base")


def examples(tokenizer, n: int = 7, train_on_prompt: bool = False) -> list[dict]:
    """A few encoded instruction samples of different lengths."""
    from core.task.response_encoder import encode_records
    from lora_llm.data import Encoder, Record

    records = [
        Record(source=str(i), instruction=f"Count to {i}.", output=" ".join(["one"] * (2 * i + 1)))
        for i in range(n)
    ]
    encoder = Encoder(tokenizer, "alpaca", 96, train_on_prompt=train_on_prompt)
    return [{**e, "index": i} for i, e in enumerate(encode_records(records, encoder)[0])]


def adapter_model(folder: Path, bits: int | None, settings: LoraSettings, attn: str = "sdpa"):
    """Base (quantized or not) + adapter with non-zero ``lora_B`` (so the adapter matters)."""
    model = load_base(
        folder, ModelConfig(name=str(folder), attn_implementation=attn), QuantConfig(bits=bits), CPU
    )
    torch.manual_seed(0)
    model = add_adapter(model, settings, gradient_checkpointing=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return model


def step(task: LoraLLMTask, model, batch) -> tuple[float, int, dict[str, torch.Tensor]]:
    """One ``training_step`` + backward: loss sum, loss tokens, adapter gradients."""
    model.zero_grad(set_to_none=True)
    out = task.training_step(model, batch)
    out.loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(out.loss_sum.detach()), int(out.num_tokens), grads


@pytest.mark.parametrize(
    "bits, targets",
    [(4, ["q_proj", "k_proj", "v_proj", "o_proj"]), (None, ["q_proj", "v_proj", "lm_head"])],
    ids=["qlora", "lora-on-the-head"],
)
def test_chunked_loss_gives_the_plain_loss_and_gradients(
    tiny_base, tokenizer, make_config, tmp_path, bits, targets
):
    model = adapter_model(tiny_base, bits, LoraSettings(dropout=0.0, target_modules=targets))
    model.train()
    batch = collate(examples(tokenizer), tokenizer.pad_token_id)
    chunked_task = LoraLLMTask(make_config(tmp_path, "loss.chunk_tokens=16"))
    plain_task = LoraLLMTask(make_config(tmp_path, "loss.chunked=false"))
    assert chunked_task.cfg.loss.chunked  # the default
    loss, tokens, grads = step(chunked_task, model, batch)
    ref_loss, ref_tokens, ref_grads = step(plain_task, model, batch)
    assert tokens == ref_tokens and loss == pytest.approx(ref_loss, rel=1e-5)
    assert len(grads) == len(ref_grads) > 0
    assert max(float((grads[k] - ref_grads[k]).abs().max()) for k in grads) < 1e-5
    if "lm_head" in targets:
        assert any("lm_head.lora_B" in k and float(g.abs().sum()) > 0 for k, g in grads.items())
    model.eval()
    with torch.no_grad():
        sums, counts = chunked_task.sample_losses(model, batch)
        ref_sums, ref_counts = plain_task.sample_losses(model, batch)
    assert torch.allclose(sums, ref_sums, rtol=1e-5) and torch.equal(counts, ref_counts)


def per_sample_from_flat_row(model, flat: dict[str, torch.Tensor]) -> list[float]:
    """Per-sample loss sums of a flattened row: per-token losses split where positions restart."""
    with torch.no_grad(), head_loss(model, shift_targets(flat["labels"]), 8, reduction="none"):
        losses = call_model(model, flat).logits[0]  # (tokens,), 0 where no label
    starts = (flat["position_ids"][0] == 0).nonzero().squeeze(1).tolist() + [losses.shape[0]]
    return [float(losses[a:b].sum()) for a, b in zip(starts[:-1], starts[1:])]


@pytest.mark.parametrize("packed", [False, True], ids=["samples", "packed-rows"])
def test_a_padding_free_batch_gives_each_sample_its_own_loss(
    tiny_base, tokenizer, make_config, tmp_path, packed
):
    model = load_base(tiny_base, ModelConfig(name=str(tiny_base)), None, CPU).eval()
    samples = examples(tokenizer, train_on_prompt=True)  # every token trained: no label hides
    items = [
        {"index": i, **{k: e[k] for k in ("input_ids", "labels")}} for i, e in enumerate(samples)
    ]
    if packed:
        rows = PackedDataset(samples, 96)
        items = [rows[i] for i in range(len(rows))]
        order = [j for row in rows.rows for j in row]
    else:
        order = list(range(len(samples)))
    batch = collate(items, tokenizer.pad_token_id)
    flat = flatten_batch(batch)
    assert flat["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in samples))
    assert int(flat["attention_mask"].sum()) == int(batch["attention_mask"].sum())
    # Each sample alone (its first label is never a target, as in the flat row).
    alone = []
    for j in order:
        single = collate([{"index": 0, **samples[j]}], tokenizer.pad_token_id)
        with torch.no_grad():
            sums, _ = per_sample_loss(
                call_model(model, single).logits, single["labels"], shift=True
            )
        alone.append(float(sums[0]))
    got = per_sample_from_flat_row(model, flat)
    assert len(got) == len(alone)
    assert got == pytest.approx(alone, rel=1e-4)
    # Negative control: without restarting positions the samples see each other.
    leaky = {**flat, "position_ids": torch.arange(flat["input_ids"].shape[1])[None]}
    assert max(abs(a - b) for a, b in zip(per_sample_from_flat_row(model, leaky), alone)) > 1e-2
    # The training step of the padding-free batch: the padded batch's loss and token count.
    free = LoraLLMTask(make_config(tmp_path, "data.padding_free=true"))
    padded = LoraLLMTask(make_config(tmp_path))
    with torch.no_grad():
        a, b = free.training_step(model, batch), padded.training_step(model, batch)
    assert int(a.num_tokens) == int(b.num_tokens) == padded.count_loss_tokens(batch)
    assert float(a.loss_sum) == pytest.approx(float(b.loss_sum), rel=1e-4)


@pytest.mark.gpu
def test_padding_free_with_flash_attention_varlen_on_a_gpu(tiny_base, tokenizer):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: flash-attention's variable-length kernel runs on GPUs only")
    if importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed (pip install flash-attn on the GPU machine)")
    model = load_base(
        tiny_base,
        ModelConfig(name=str(tiny_base), attn_implementation="flash_attention_2", dtype="bfloat16"),
        None,
        torch.device("cuda"),
    ).eval()
    samples = examples(tokenizer, train_on_prompt=True)
    batch = collate([{"index": i, **s} for i, s in enumerate(samples)], tokenizer.pad_token_id)
    flat = {k: v.cuda() for k, v in flatten_batch(batch).items()}
    got = per_sample_from_flat_row(model, flat)
    alone = []
    for s in samples:
        single = {k: v.cuda() for k, v in collate([{"index": 0, **s}], 0).items()}
        with torch.no_grad():
            logits = call_model(model, single).logits
            alone.append(float(per_sample_loss(logits, single["labels"], shift=True)[0][0]))
    assert got == pytest.approx(alone, rel=2e-2)


@pytest.mark.parametrize("bits", [None, 4])
def test_dora_trains_its_magnitudes_and_merges_with_the_same_logits(tiny_base, tokenizer, bits):
    settings = LoraSettings(dropout=0.0, use_dora=True, use_rslora=True)
    model = adapter_model(tiny_base, bits, settings)
    magnitudes = [n for n, p in model.named_parameters() if "lora_magnitude" in n]
    assert len(magnitudes) == 2 * 4 and all(
        p.requires_grad for n, p in model.named_parameters() if n in magnitudes
    )
    model.train()
    ids = torch.tensor([tokenizer.encode("A sentence to train a DoRA adapter on, twice over.")])
    out = model(input_ids=ids).logits
    torch.nn.functional.cross_entropy(out[0, :-1], ids[0, 1:]).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if n in magnitudes}
    assert all(g is not None and float(g.abs().sum()) > 0 for g in grads.values())
    if bits is not None:
        return  # merging into 4-bit weights is refused by merge; the 32-bit case checks it
    model.eval()
    merged, numbers = merge_and_check(model, ids)
    assert numbers["adapter_effect"] > 1e-3  # the check is not met by an adapter doing nothing
    assert numbers["max_abs_diff"] < 1e-4, numbers
    assert not any("lora" in n for n, _ in merged.named_parameters())


@pytest.mark.trains
def test_a_dora_run_saves_its_adapter_and_merge_verifies_it_by_logits(run_tiny, tmp_path, capsys):
    import json

    from lora_llm.cli import merge

    result = run_tiny(
        "lora.use_dora=true",
        "quant.bits=null",
        "trainer.max_steps=1",
        "trainer.max_epochs=null",
        "data.max_samples=16",
        "trainer.val_every_n_steps=null",
    )
    final = result.run_dir / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    assert json.loads((final / "lora_llm.json").read_text())["lora"]["use_dora"] is True
    assert merge(["--adapter", str(final), "--out", str(tmp_path / "merged")]) == 0
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert report["ok"] and report["max_abs_diff"] < 1e-4 and report["adapter_effect"] > 0
    assert "verification passed" in capsys.readouterr().out


@pytest.mark.gpu
def test_liger_kernel_gives_the_same_loss_on_a_gpu(tiny_base, tokenizer, make_config, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: Liger Kernel's kernels are Triton GPU kernels")
    if importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("Liger Kernel is not installed (uv sync --extra liger)")
    batch = {k: v.cuda() for k, v in collate(examples(tokenizer), tokenizer.pad_token_id).items()}
    task = LoraLLMTask(make_config(tmp_path))
    losses = []
    for liger in (False, True):
        cfg = ModelConfig(name=str(tiny_base), dtype="float32", liger_kernel=liger)
        model = load_base(tiny_base, cfg, None, torch.device("cuda"))
        model = add_adapter(model, LoraSettings(dropout=0.0), gradient_checkpointing=False)
        losses.append(float(task.training_step(model.train(), batch).loss_sum.detach()))
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_liger_kernel_without_a_gpu_is_refused_by_name(tiny_base):
    from core.errors import UserError

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = ModelConfig(name=str(tiny_base), liger_kernel=True)
    with pytest.raises(UserError, match="model.liger_kernel=true needs"):
        load_base(tiny_base, cfg, None, CPU)


def test_first_label_of_every_row_is_masked_when_flattened(tokenizer):
    samples = examples(tokenizer, n=3, train_on_prompt=True)
    batch = collate([{"index": i, **s} for i, s in enumerate(samples)], tokenizer.pad_token_id)
    flat = flatten_batch(batch)
    starts = (flat["position_ids"][0] == 0).nonzero().squeeze(1)
    assert starts.tolist()[0] == 0 and len(starts) == 3
    assert (flat["labels"][0, starts] == IGNORE_INDEX).all()


def test_dry_run_shows_the_switches_and_divides_by_fsdp_ranks(capsys):
    import json

    from lora_llm.cli import train

    argv = ["-c", "tinyllama", "--dry-run", "--json", "quant.bits=null", "data.max_length=2048"]
    reports = {}
    for extra in ([], ["loss.chunked=false"], ["trainer.strategy=fsdp", "trainer.devices=4"]):
        assert train([*argv, *extra]) == 0
        reports[" ".join(extra)] = json.loads(capsys.readouterr().out)
    plain, chunked = reports["loss.chunked=false"]["bytes"], reports[""]["bytes"]
    assert chunked["logits"] < 0.2 * plain["logits"]
    sharded = reports["trainer.strategy=fsdp trainer.devices=4"]
    assert sharded["bytes"]["base_weights"] == pytest.approx(chunked["base_weights"] / 4)
    assert "over 4 ranks" in sharded["setup"]["strategy"]
    assert train(["-c", "phi2", "--dry-run", "lora.use_dora=true", "trainer.compile=true"]) == 0
    text = capsys.readouterr().out
    assert "lora.use_dora=true" in text and "trainer.compile=true (not modelled)" in text
    assert "8 GB GPU             fits" in text
