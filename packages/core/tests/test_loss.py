"""Memory and speed switches of the engine: the chunked cross-entropy (``core.nn.loss``) gives the
plain loss and gradients (in one process and under FSDP2 on 2 CPU ranks), activation offloading
gives the same gradients, ``trainer.compile`` trains to the same losses, and the switches a CPU
cannot use are refused or skipped by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from core.config.loader import load_config
from core.config.schema import TrainConfig
from core.errors import ConfigError
from core.nn.acceleration import offload_saved_tensors
from core.nn.loss import IGNORE_INDEX, check_plain_logits, head_loss, linear_cross_entropy
from core.task.base import (
    chunked_per_sample_loss,
    chunked_token_loss_sum,
    per_sample_loss,
    token_loss_sum,
)
from core.testing.toy import script_result, train_losses


def plain_sum(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference: full float32 logits, then PyTorch's summed cross-entropy."""
    logits = head(hidden).float()
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def grads_of(loss: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of ``loss`` with respect to ``tensors`` (fresh, not accumulated)."""
    for t in tensors:
        t.grad = None
    loss.backward()
    return [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
@pytest.mark.parametrize("trained_head", [True, False], ids=["trained-head", "frozen-head"])
def test_chunked_loss_and_gradients_equal_the_plain_path(chunk, trained_head):
    torch.manual_seed(0)
    head = nn.Linear(16, 301, bias=True)
    head.requires_grad_(trained_head)
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    labels = torch.randint(0, 301, (3, 11))
    labels[0, :5] = IGNORE_INDEX
    labels[2] = IGNORE_INDEX  # a row without any label
    params = [hidden, head.weight, head.bias] if trained_head else [hidden]
    expected_loss = plain_sum(head, hidden, labels)
    expected = grads_of(expected_loss, *params)
    loss = linear_cross_entropy(head, head.forward, hidden, labels, chunk, "sum")
    got = grads_of(loss * 3.0, *params)  # the incoming gradient scales the stored ones
    assert float(loss.detach()) == pytest.approx(float(expected_loss.detach()), rel=1e-6)
    for e, g in zip(expected, got):
        assert torch.allclose(3.0 * e, g, atol=1e-5), float((3.0 * e - g).abs().max())
    assert float(hidden.grad[2].abs().max()) == 0.0  # unlabelled positions get no gradient


def test_a_batch_without_labels_gives_zero_loss_and_zero_gradients():
    head = nn.Linear(8, 40)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    labels = torch.full((2, 5), IGNORE_INDEX)
    loss = linear_cross_entropy(head, head.forward, hidden, labels, 4, "sum")
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert all(float(t.abs().max()) == 0.0 for t in (hidden.grad, head.weight.grad, head.bias.grad))


def test_chunked_loss_under_bf16_autocast_stays_close_and_keeps_float32_gradients():
    torch.manual_seed(0)
    head = nn.Linear(32, 500, bias=False)
    hidden = torch.randn(2, 40, 32, requires_grad=True)
    labels = torch.randint(0, 500, (2, 40))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_loss = plain_sum(head, hidden, labels)
        loss = linear_cross_entropy(head, head.forward, hidden, labels, 16, "sum")
    expected = grads_of(expected_loss, hidden, head.weight)
    got = grads_of(loss, hidden, head.weight)
    assert float(loss.detach()) == pytest.approx(float(expected_loss.detach()), rel=2e-3)
    assert head.weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32
    for e, g in zip(expected, got):
        assert float((e - g).abs().max()) < 2e-2 * float(e.abs().max())


def test_per_token_losses_and_any_head_module():
    torch.manual_seed(0)
    linear = nn.Linear(8, 50)
    hidden = torch.randn(2, 9, 8, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[1, 3:] = IGNORE_INDEX
    expected = F.cross_entropy(
        linear(hidden).transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    with torch.no_grad():
        got = linear_cross_entropy(linear, linear.forward, hidden, labels, 4, "none")
    assert torch.allclose(got, expected, atol=1e-5)
    # A head that is not a plain nn.Linear goes through its own forward, one checkpointed chunk
    # at a time: same loss and gradients.
    wrapped = nn.Sequential(linear)
    expected_grads = grads_of(plain_sum(wrapped, hidden, labels), hidden, linear.weight)
    loss = linear_cross_entropy(wrapped, wrapped.forward, hidden, labels, 4, "sum")
    got_grads = grads_of(loss, hidden, linear.weight)
    assert all(torch.allclose(e, g, atol=1e-5) for e, g in zip(expected_grads, got_grads))


def tiny_llama(tied: bool) -> nn.Module:
    """A 2-layer Llama with a 300-token vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_the_model_head_computes_the_loss_inside_its_own_forward(tied):
    model = tiny_llama(tied)
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :4] = IGNORE_INDEX
    params = [p for p in model.parameters()]
    plain = token_loss_sum(model(input_ids=ids).logits, labels, shift=True)
    expected = grads_of(plain.loss_sum, *params)
    chunked = chunked_token_loss_sum(model, lambda: model(input_ids=ids), labels, True, 3)
    got = grads_of(chunked.loss_sum, *params)
    assert int(chunked.num_tokens) == int(plain.num_tokens)
    assert float(chunked.loss_sum) == pytest.approx(float(plain.loss_sum), rel=1e-6)
    assert max(float((e - g).abs().max()) for e, g in zip(expected, got)) < 1e-5
    with torch.no_grad():
        sums, counts = chunked_per_sample_loss(model, lambda: model(input_ids=ids), labels, True, 3)
        ref_sums, ref_counts = per_sample_loss(model(input_ids=ids).logits, labels, shift=True)
    assert torch.allclose(sums, ref_sums, atol=1e-4) and torch.equal(counts, ref_counts)
    # Outside the block the head is the plain module again; the state dict never changed.
    assert model(input_ids=ids).logits.shape == (2, 10, 300)
    assert "forward" not in vars(model.lm_head)
    with head_loss(model, labels, 3):
        assert sorted(model.state_dict()) == sorted(tiny_llama(tied).state_dict())


def test_models_that_change_their_logits_after_the_head_are_refused():
    from transformers import Gemma2Config

    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        check_plain_logits(Gemma2Config(final_logit_softcapping=30.0))
    check_plain_logits(tiny_llama(False).config)


@pytest.mark.slow
def test_chunked_loss_under_fsdp2_takes_the_unsharded_plain_step():
    result = script_result(Path(__file__).with_name("fsdp_loss_check.py"))
    # Two AdamW steps of lr 1e-2: any gradient error would move weights by about 1e-2.
    names = ("tied", "untied", "tied_activation_checkpointing", "lora_on_head")
    for name in (*names, "compiled_activation_checkpointing"):
        assert result[name] < 1e-4, (name, result[name])
        assert result[f"{name}:loss"] < 1e-3, (name, result[f"{name}:loss"])
        assert result[f"{name}:keys"] >= 20, name
    assert result["compiled_activation_checkpointing:compiled"] == 2  # the two units
    assert result["tied_activation_checkpointing:compiled"] == 0


def test_offloaded_activations_give_the_same_gradients_with_checkpointed_blocks():
    torch.manual_seed(0)
    blocks = nn.ModuleList(nn.Sequential(nn.Linear(256, 256), nn.GELU()) for _ in range(3))
    x = torch.randn(1100, 256, requires_grad=True)

    def run(offload: bool) -> tuple[list[torch.Tensor], dict[str, int]]:
        counts: dict[str, int] = {}
        if offload:
            with offload_saved_tensors(pin_memory=False) as counts:
                h = x
                for block in blocks:
                    h = checkpoint(block, h, use_reentrant=False)
        else:
            h = x
            for block in blocks:
                h = checkpoint(block, h, use_reentrant=False)
        return grads_of(h.square().sum(), x, *blocks.parameters()), counts

    plain, _ = run(False)
    offloaded, counts = run(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, offloaded))
    # What moved: each checkpointed block's input (1100 x 256 float32 = 1.07 MiB), not the
    # activations inside the blocks (recomputed) and not the parameters.
    assert counts["tensors"] == 3 and counts["bytes"] == 3 * 1100 * 256 * 4


def test_switches_this_machine_cannot_run_are_refused_by_name():
    from core.parallel.strategy import check_machine

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: activation offloading is allowed here")
    cfg = load_config(TrainConfig, overrides=["trainer.offload_activations=true"])
    with pytest.raises(ConfigError, match="trainer.offload_activations.*CPU memory already"):
        check_machine(cfg.trainer)
    with pytest.raises(ConfigError, match="loss.chunk_tokens' must be at least 1"):
        from core.config.schema import LossConfig

        LossConfig(chunk_tokens=0)


def has_compiler() -> bool:
    """Inductor compiles C++ on the CPU: a compiler must exist."""
    import shutil

    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.mark.slow
@pytest.mark.skipif(not has_compiler(), reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_blocks_train_to_the_same_losses(run_toy):
    # No dropout: compiled code draws its random masks from another generator than eager.
    common = ["trainer.max_steps=4", "trainer.log_every_n_steps=1", "model.dropout=0.0"]
    eager = train_losses(run_toy(*common, root="eager").run_dir)
    compiled = run_toy(*common, "trainer.compile=true", root="compiled")
    log = (compiled.run_dir / "train.log").read_text()
    assert "trainer.compile: 2 blocks compiled" in log
    losses = train_losses(compiled.run_dir)
    assert losses.keys() == eager.keys()
    assert max(abs(losses[k] - eager[k]) for k in eager) < 1e-4, (eager, losses)


@pytest.mark.gpu
def test_activation_offloading_on_a_gpu_gives_the_same_losses(run_toy):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: activation offloading moves GPU memory to the CPU")
    common = ["trainer.max_steps=4", "trainer.log_every_n_steps=1", "trainer.accelerator=cuda"]
    common += ["trainer.precision=32-true", "fsdp.activation_checkpointing=false"]
    plain = train_losses(run_toy(*common, root="plain").run_dir)
    offloaded = train_losses(run_toy(*common, "trainer.offload_activations=true", root="o").run_dir)
    assert max(abs(plain[k] - offloaded[k]) for k in plain) < 1e-5
