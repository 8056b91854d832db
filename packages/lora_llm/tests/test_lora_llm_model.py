"""Models through the real loading code: packing correctness, 4/8-bit LoRA gradients, checkpointing,
the memory estimate, FSDP wrap classes and the Hub presets failing fast offline."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from core.commands.estimate import decoder_activation_bytes as activation_bytes
from core.config.loader import load_config
from core.errors import UserError
from core.task.base import token_loss_sum
from core.task.batching import PackedDataset
from core.task.batching import collate_causal as collate
from core.task.response_encoder import encode_records
from lora_llm.cli import PRESETS
from lora_llm.config import LoraLLMConfig, LoraSettings, ModelConfig, QuantConfig, TinyModelConfig
from lora_llm.data import Encoder, Record
from lora_llm.memory import estimate
from lora_llm.model import add_adapter, build_tiny_base, load_base, parameter_counts
from lora_llm.task import LoraLLMTask, call_model, check_packing

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, tokenizer) -> Path:
    """The tiny Llama written with save_pretrained (loaded back by each test)."""
    return build_tiny_base(TinyModelConfig(), tokenizer, tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer GPT-2 (Conv1D layers, learned positions) with the tiny tokenizer, saved to a
    folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=256,
            n_embd=64,
            n_layer=2,
            n_head=4,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
        )
    )
    folder = tmp_path_factory.mktemp("gpt2") / "base"
    model.save_pretrained(folder)
    return folder


def encoded(tokenizer, n: int = 7) -> list[dict]:
    """A few encoded samples of different lengths."""
    records = [
        Record(
            source=str(i), instruction=f"Repeat {i} words.", output=" ".join(["word"] * (3 * i + 1))
        )
        for i in range(n)
    ]
    return encode_records(records, Encoder(tokenizer, "alpaca", 96))[0]


@pytest.mark.parametrize(
    "arch, attn, bits",
    [
        ("llama", "sdpa", None),
        ("llama", "eager", None),
        ("llama", "sdpa", 4),
        ("gpt2", "sdpa", None),
    ],
)
def test_packed_samples_never_see_each_other(tokenizer, tiny_base, tiny_gpt2, arch, attn, bits):
    folder = tiny_base if arch == "llama" else tiny_gpt2
    model = load_base(
        folder, ModelConfig(name=str(folder), attn_implementation=attn), QuantConfig(bits=bits), CPU
    )
    model.eval()
    examples = encoded(tokenizer)
    packed = PackedDataset(examples, 96)
    assert any(len(row) > 1 for row in packed.rows)
    batch = collate([packed[i] for i in range(len(packed))], tokenizer.pad_token_id)
    with torch.no_grad():
        logits = call_model(model, batch).logits
        worst = 0.0
        for r, row in enumerate(packed.rows):
            offset = 0
            for j in row:
                n = len(examples[j]["input_ids"])
                alone = model(
                    input_ids=torch.tensor([examples[j]["input_ids"]]), use_cache=False
                ).logits[0]
                worst = max(worst, float((logits[r, offset : offset + n] - alone).abs().max()))
                offset += n
        # Negative control: the same rows as plain causal sequences (no position restart) leak.
        leaky = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
    assert worst < 1e-4, worst
    assert float((leaky - logits).abs().max()) > 1e-2
    # With a KV cache transformers skips the packed-sequence mask: call_model must not use one.
    with torch.no_grad():
        cached = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True
        ).logits
    assert float((cached - logits).abs().max()) > 1e-2
    # The loss of the packed batch is the loss of the samples on their own.
    packed_loss = token_loss_sum(logits, batch["labels"], shift=True)
    singles = [
        collate(
            [{"index": 0, **{k: e[k] for k in ("input_ids", "labels")}}], tokenizer.pad_token_id
        )
        for e in examples
    ]
    with torch.no_grad():
        parts = [
            token_loss_sum(call_model(model, b).logits, b["labels"], shift=True) for b in singles
        ]
    assert int(packed_loss.num_tokens) == sum(int(p.num_tokens) for p in parts)
    assert float(packed_loss.loss_sum) == pytest.approx(
        sum(float(p.loss_sum) for p in parts), rel=1e-4
    )
    assert check_packing(model, tokenizer.pad_token_id) < 1e-3


def lora_grads(
    tiny_base: Path,
    tokenizer,
    *,
    bits: int | None,
    checkpointing: bool,
    eval_first: bool = False,
    bnb_cpu_kernel: bool = False,
) -> dict[str, torch.Tensor]:
    """Adapter gradients of one backward pass on the tiny model (LoRA B initialised non-zero).

    ``bnb_cpu_kernel=True`` undoes :func:`lora_llm.model.cpu_4bit_inference_kernel` (bitsandbytes'
    default).
    """
    model = load_base(tiny_base, ModelConfig(name=str(tiny_base)), QuantConfig(bits=bits), CPU)
    if bnb_cpu_kernel:
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = True
    torch.manual_seed(0)  # LoRA A is initialised from the global RNG
    model = add_adapter(model, LoraSettings(dropout=0.0), gradient_checkpointing=checkpointing)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    ids = torch.tensor(
        [tokenizer.encode("A short sentence to compute gradients with, twice over.")]
    )
    if eval_first:  # what a validation pass does before training continues
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
    model.train()
    token_loss_sum(model(input_ids=ids).logits, ids, shift=True).loss_sum.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_qlora_gradients_reach_every_adapter_and_survive_a_validation_pass(tiny_base, tokenizer):
    plain = lora_grads(tiny_base, tokenizer, bits=4, checkpointing=False)
    assert len(plain) == 2 * 4 * 2  # A and B of q/k/v/o in 2 layers
    assert all(float(g.abs().sum()) > 0 for g in plain.values())
    # bitsandbytes would switch to a kernel without backward after an eval pass on AVX512-BF16 CPUs.
    after_eval = lora_grads(tiny_base, tokenizer, bits=4, checkpointing=False, eval_first=True)
    assert max(float((plain[k] - after_eval[k]).abs().max()) for k in plain) == 0.0
    from bitsandbytes.functional import has_avx512bf16

    if (
        has_avx512bf16()
    ):  # negative control: bitsandbytes' default loses gradients after the eval pass
        with pytest.warns(UserWarning, match="gemv_4bit: an autograd kernel was not registered"):
            broken = lora_grads(
                tiny_base,
                tokenizer,
                bits=4,
                checkpointing=False,
                eval_first=True,
                bnb_cpu_kernel=True,
            )
        assert max(float((plain[k] - broken[k]).abs().max()) for k in plain) > 1e-3


@pytest.mark.parametrize("bits", [None, 4])
def test_gradient_checkpointing_with_a_frozen_base_gives_the_same_gradients(
    tiny_base, tokenizer, bits
):
    plain = lora_grads(tiny_base, tokenizer, bits=bits, checkpointing=False)
    checkpointed = lora_grads(tiny_base, tokenizer, bits=bits, checkpointing=True)
    assert max(float((plain[k] - checkpointed[k]).abs().max()) for k in plain) < 1e-5


def test_8bit_base_trains_adapters(tiny_base, tokenizer):
    grads = lora_grads(tiny_base, tokenizer, bits=8, checkpointing=True)
    assert grads and all(float(g.abs().sum()) > 0 for g in grads.values())


def test_all_linear_and_bad_target_modules(tiny_base):
    model = load_base(tiny_base, ModelConfig(name=str(tiny_base)), None, CPU)
    wide = add_adapter(
        model, LoraSettings(target_modules=["all-linear"]), gradient_checkpointing=False
    )
    adapted = {n.split(".")[-4] for n, _ in wide.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    with pytest.raises(UserError, match=r"does not fit this model.*down_proj, gate_proj, k_proj"):
        add_adapter(
            load_base(tiny_base, ModelConfig(name=str(tiny_base)), None, CPU),
            LoraSettings(target_modules=["c_attn"]),
            False,
        )


def test_parameter_counts_of_the_presets_without_weights():
    counts = {}
    for preset in ("gpt2", "tinyllama", "phi2", "tiny"):
        report = estimate(load_config(LoraLLMConfig, preset, [], PRESETS))
        counts[preset] = (
            report["parameters"] - report["trainable_parameters"],
            report["trainable_parameters"],
        )
        assert report["bytes"]["total"] > 0
    # The published sizes of the base models, built on the meta device from their architectures.
    assert counts["gpt2"][0] == 124_439_808
    assert counts["tinyllama"][0] == 1_100_048_384
    assert counts["phi2"][0] == 2_779_683_840
    # LoRA r=8 on q/k/v/dense of 32 phi-2 layers: 8 x (2560 + 2560) x 4 x 32.
    assert counts["phi2"][1] == 8 * 5120 * 4 * 32
    phi2 = estimate(load_config(LoraLLMConfig, "phi2", [], PRESETS))
    assert 2.0 < phi2["bytes"]["total"] / 2**30 < 4.0 and phi2["trainable_share"] < 0.01


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_activation_estimate_matches_what_autograd_saves(autocast):
    """The activation and logit terms against the tensors autograd keeps for backward (no
    checkpointing)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = add_adapter(LlamaForCausalLM(config), LoraSettings(), gradient_checkpointing=False)
    model.train()
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        """Count the bytes of a tensor autograd saves (parameters excluded)."""
        if not (t.is_leaf and t.requires_grad) and not isinstance(t, torch.nn.Parameter):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, 1024, (2, 96))
    with (
        torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t),
        torch.autocast("cpu", torch.bfloat16, enabled=autocast),
    ):
        logits = model(input_ids=ids).logits
        layers = sum(saved.values())
        token_loss_sum(logits, ids, shift=True)
    # What the loss keeps (its float32 log-softmax) plus the logits themselves, alive until
    # backward.
    loss_part = sum(saved.values()) - layers + logits.numel() * logits.element_size()
    e = 2 if autocast else 4
    predicted = activation_bytes(config, 2, 96, e, checkpointing=False, lora_targets=4, eager=False)
    ratio = predicted["activations"] / layers
    print(f"activations: estimate / measured = {ratio:.3f}")
    assert 0.8 < ratio < 1.25, ratio
    # The logit term is e + 4 bytes kept in forward plus 8 transient bytes in backward per logit.
    assert loss_part == pytest.approx(2 * 96 * 1024 * (e + 4), rel=0.05)
    assert predicted["logits"] == 2 * 96 * 1024 * (e + 12)


def test_fsdp_wraps_the_decoder_layer_class(make_config, tmp_path):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from transformers.models.phi.modeling_phi import PhiDecoderLayer

    assert LoraLLMTask(make_config(tmp_path)).fsdp_wrap_classes() == {LlamaDecoderLayer}
    phi2 = load_config(LoraLLMConfig, "phi2", ["quant.bits=null"], PRESETS)
    assert LoraLLMTask(phi2).fsdp_wrap_classes() == {PhiDecoderLayer}


@pytest.mark.parametrize("preset", ["phi2", "tinyllama", "gpt2"])
def test_hub_presets_fail_fast_and_clearly_offline(preset, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(LoraLLMConfig, preset, [f"run.root={tmp_path}"], PRESETS)
    start = time.time()
    with pytest.raises(UserError, match=r"Hub is not reachable.*-c tiny"):
        LoraLLMTask(cfg).setup()
    assert time.time() - start < 10
    assert not any(tmp_path.iterdir())


def test_trainable_share_is_reported(tiny_base):
    model = add_adapter(
        load_base(tiny_base, ModelConfig(name=str(tiny_base)), QuantConfig(bits=4), CPU),
        LoraSettings(),
        False,
    )
    trainable, total = parameter_counts(model)
    # 4-bit weights are counted at their real size (not the packed bytes).
    plain = add_adapter(
        load_base(tiny_base, ModelConfig(name=str(tiny_base)), None, CPU), LoraSettings(), False
    )
    assert (trainable, total) == parameter_counts(plain)
    assert trainable == 2 * (8 * (64 + 64) * 2 + 8 * (64 + 32) * 2)
