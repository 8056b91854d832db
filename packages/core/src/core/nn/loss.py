"""Cross-entropy over a large vocabulary without the ``(batch, seq, vocab)`` logits.

A causal LM's last step is ``logits = lm_head(hidden)`` followed by a cross-entropy. With
Qwen's 151,936-token vocabulary one 4,096-token sample's float32 logits take 2.5 GB, and the
plain path keeps several tensors of that size alive (the logits, their float32 copy, the
log-softmax saved for backward, its gradient). Here the loss is computed from the hidden states
in chunks of ``chunk_tokens`` *labelled* tokens: each chunk's logits ``(chunk, vocab)`` are made,
reduced to their loss, turned into their gradient, and freed before the next chunk.

- **Plain ``nn.Linear`` head** (Llama, Qwen, Phi, GPT-2; tied or not, with or without bias):
  :class:`LinearCrossEntropy` computes the gradients of the hidden states and of the head's
  weight (and bias) chunk by chunk *in the forward pass* and hands them out in backward, scaled
  by the incoming gradient. The head's matrix products are the plain path's three (forward,
  input gradient, weight gradient; two with a frozen head): no recomputation.
- **Any other head module** (peft's LoRA wrapper on ``lm_head``, a quantized head): each chunk is
  a non-reentrant activation checkpoint through the module's own forward, recomputed in backward
  (one more forward of the head, same memory bound).

Only positions with a label (not ``IGNORE_INDEX``) are computed at all, so prompt, padding and
vision tokens cost nothing in the head.

**Where it runs.** :func:`head_loss` swaps the output head's ``forward`` for the duration of one
model call, so the loss is computed *inside the model's own forward* and comes back in the
output's ``logits`` field. That matters under FSDP2: the head's weight is a ``DTensor`` shard
outside the root module's forward and the gathered tensor only inside it; running there, the
gradient reaches the gathered weight and FSDP2 reduce-scatters it like any other (tested on 2 CPU
ranks). Tied embeddings need nothing special: both uses of the one parameter accumulate into its
gradient. Models whose forward changes the logits after the head (Gemma-2's soft-capping,
Cohere's logit scale, Granite's logit scaling) are refused by :func:`check_plain_logits`.

Self-check: ``python -m core.nn.loss`` (chunked against plain: loss and gradients).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
"""Label value that the loss ignores (the same as ``core.task.base.IGNORE_INDEX``)."""

LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")
"""Model config attributes that make a model's forward change the logits after its head."""


def output_head(model: nn.Module) -> nn.Module:
    """The output head (``lm_head``) of a transformers model, through Fabric / DDP / peft wrappers.

    Args:
        model: the model as the task sees it (possibly wrapped).

    Returns:
        The head module (an ``nn.Linear`` for most causal LMs).

    Raises:
        ValueError: the model has no output embeddings.
    """
    module: Any = model
    for _ in range(8):  # Fabric module -> DDP -> model: a few levels at most
        getter = getattr(module, "get_output_embeddings", None)
        head = getter() if callable(getter) else None
        if isinstance(head, nn.Module):
            return head
        inner = getattr(module, "module", None)
        if not isinstance(inner, nn.Module) or inner is module:
            break
        module = inner
    raise ValueError(f"{type(model).__name__} has no output head (get_output_embeddings)")


def check_plain_logits(config: Any) -> None:
    """Refuse models whose forward changes the logits after the head (chunked loss cannot apply).

    Args:
        config: the model's transformers config (a vision-language model's text config is
            looked at too).

    Raises:
        ValueError: naming the config attribute.
    """
    configs = [config, getattr(config, "text_config", None)]
    for cfg in (c for c in configs if c is not None):
        for name in LOGIT_POSTPROCESSING:
            value = getattr(cfg, name, None)
            if value is not None and value not in (1, 1.0):
                raise ValueError(
                    f"the model's forward changes the logits after its head ({name}={value}), "
                    "which a loss computed inside the head would skip"
                )


def shift_targets(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the positions that predict them (causal LM: position ``t`` predicts
    label ``t+1``), so the hidden states need no slicing.

    Args:
        labels: ``(batch, seq)``.

    Returns:
        ``(batch, seq)``: ``labels[:, 1:]`` followed by one ``IGNORE_INDEX`` column.
    """
    pad = labels.new_full((labels.shape[0], 1), IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


def compute_dtype_of(weight: torch.Tensor) -> torch.dtype:
    """dtype the head's matrix products run in: autocast's when it is on, else the weight's."""
    device = weight.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias`` against ``targets``, in chunks, with
    the gradients made in the forward pass (see the module docstring).

    Forward args:
        hidden: ``(M, h)`` hidden states of labelled positions only.
        weight: ``(V, h)`` head weight; bias: ``(V,)`` or None.
        targets: ``(M,)`` token ids in ``[0, V)`` (no ``IGNORE_INDEX``).
        chunk_tokens: rows per chunk.
        dtype: dtype of the matrix products (autocast's dtype, or the weight's).

    Returns:
        A float32 scalar: the summed loss.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk_tokens: int,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.empty_like(weight) if need_w else None  # the first chunk writes it
            grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk_tokens):
                h = hidden[start : start + chunk_tokens].to(dtype)  # (c, h)
                y = targets[start : start + chunk_tokens]  # (c,)
                # (c, V) float32 log-probabilities: with the logits, the only vocabulary-sized
                # tensors, and the logits are freed as soon as this line is done.
                logp = F.linear(h, w, b).float().log_softmax(dim=-1)
                total -= logp.gather(1, y[:, None]).sum()
                if not (need_h or need_w or need_b):
                    continue
                # d(sum of losses)/d(logits) = softmax - one_hot, built in place.
                grad = logp.exp_()
                grad[torch.arange(y.shape[0], device=y.device), y] -= 1.0
                g = grad.to(dtype)
                if need_h:
                    grad_h[start : start + chunk_tokens] = g @ w
                if need_w:
                    # A float32 master weight under 16-bit autocast accumulates the chunks in
                    # float32 (a 16-bit partial product per chunk would be a (V, h) temporary and
                    # lose bits at every addition).
                    lhs, rhs = (g.T, h) if weight.dtype == dtype else (grad.T, h.float())
                    if start == 0:
                        torch.mm(lhs, rhs, out=grad_w)
                    else:
                        grad_w.addmm_(lhs, rhs)
                if need_b:
                    grad_b += grad.sum(0)
            if need_w and hidden.shape[0] == 0:  # no labelled token: no chunk wrote it
                grad_w.zero_()
        ctx.grads = (grad_h, grad_w, grad_b.to(bias.dtype) if need_b else None)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        """Scale the stored gradients by the incoming gradient of the summed loss (a scalar)."""
        if ctx.grads is None:
            raise RuntimeError("LinearCrossEntropy: backward can run only once per forward")
        grads = tuple(None if g is None else g.mul_(grad_out.to(g.dtype)) for g in ctx.grads)
        ctx.grads = None
        return (*grads, None, None, None)


def _chunk_losses(
    head_forward: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int,
) -> torch.Tensor:
    """Per-token losses through any head module, chunk by chunk, each chunk an activation
    checkpoint when gradients are needed (its logits are recomputed in backward, never kept).

    Args:
        head_forward: the head module's own forward, ``(c, h) -> (c, V)``.
        hidden: ``(M, h)``; targets: ``(M,)`` token ids.
        chunk_tokens: rows per chunk.

    Returns:
        ``(M,)`` float32 losses.
    """
    from torch.utils.checkpoint import checkpoint

    def chunk_loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head_forward(h).float(), y, reduction="none")

    parts = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, y = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(checkpoint(chunk_loss, h, y, use_reentrant=False))
        else:
            parts.append(chunk_loss(h, y))
    if not parts:
        return hidden.new_zeros((0,), dtype=torch.float32)
    return torch.cat(parts)


def linear_cross_entropy(
    head: nn.Module,
    head_forward: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int,
    reduction: str,
) -> torch.Tensor:
    """Cross-entropy of ``head(hidden)`` against ``targets`` without the full logits.

    Args:
        head: the head module (a plain ``nn.Linear`` takes the fast path).
        head_forward: its original forward (used for any other module).
        hidden: ``(..., h)`` hidden states.
        targets: ``(...)`` token ids, ``IGNORE_INDEX`` where no loss is taken.
        chunk_tokens: labelled tokens per chunk.
        reduction: ``sum`` (a float32 scalar) or ``none`` (float32 losses shaped like
            ``targets``, 0 at ignored positions).

    Returns:
        The loss (see ``reduction``).
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"hidden states {tuple(hidden.shape)} and targets {tuple(targets.shape)} do not match"
        )
    flat = hidden.reshape(-1, hidden.shape[-1])  # (N, h)
    labels = targets.reshape(-1).to(hidden.device)  # (N,)
    keep = (labels != IGNORE_INDEX).nonzero().squeeze(1)  # (M,)
    selected = flat.index_select(0, keep)  # (M, h); backward scatters into (N, h)
    wanted = labels.index_select(0, keep)  # (M,)
    plain = type(head) is nn.Linear
    if reduction == "sum":
        if plain:
            return LinearCrossEntropy.apply(
                selected,
                head.weight,
                head.bias,
                wanted,
                chunk_tokens,
                compute_dtype_of(head.weight),
            )
        return _chunk_losses(head_forward, selected, wanted, chunk_tokens).sum()
    if reduction != "none":
        raise ValueError(f"reduction must be 'sum' or 'none', got {reduction!r}")
    per_token = _chunk_losses(head_forward, selected, wanted, chunk_tokens)  # (M,)
    out = torch.zeros(labels.shape[0], dtype=torch.float32, device=hidden.device)
    return out.index_put((keep,), per_token).reshape(targets.shape)


@contextlib.contextmanager
def head_loss(
    model: nn.Module, targets: torch.Tensor, chunk_tokens: int, reduction: str = "sum"
) -> Iterator[None]:
    """Within the block, the model's output head returns the loss instead of logits.

    Use it around exactly one forward call of the model; the model output's ``logits`` field
    then holds the loss (see :func:`linear_cross_entropy`). Outside the block the head is the
    plain module again (generation, saving, everything else).

    Args:
        model: the (possibly wrapped) model.
        targets: ``(batch, K)`` token ids aligned with the hidden states the head receives
            (``K`` = sequence length, or the positions kept by ``logits_to_keep``).
        chunk_tokens: labelled tokens per chunk.
        reduction: ``sum`` or ``none``.
    """
    head = output_head(model)
    original = head.forward

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(head, original, hidden, targets, chunk_tokens, reduction)

    head.forward = forward  # an instance attribute: state dict and hooks stay untouched
    try:
        yield
    finally:
        del head.forward


if __name__ == "__main__":  # self-check: python -m core.nn.loss
    torch.manual_seed(0)
    vocab, hidden_size, tokens = 1000, 32, 300
    head = nn.Linear(hidden_size, vocab, bias=True)
    hidden = torch.randn(2, tokens // 2, hidden_size, requires_grad=True)
    labels = torch.randint(0, vocab, (2, tokens // 2))
    labels[:, :20] = IGNORE_INDEX
    plain = F.cross_entropy(
        head(hidden).float().reshape(-1, vocab),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    plain.backward()
    expected = hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()
    hidden.grad = head.weight.grad = head.bias.grad = None
    chunked = linear_cross_entropy(head, head.forward, hidden, labels, 64, "sum")
    chunked.backward()
    got = hidden.grad, head.weight.grad, head.bias.grad
    print(f"loss plain {plain.item():.6f} chunked {chunked.item():.6f}")
    assert torch.allclose(plain, chunked, rtol=1e-5)
    for e, g in zip(expected, got):
        assert torch.allclose(e, g, atol=1e-5), float((e - g).abs().max())
    print("core.nn.loss: ok")
