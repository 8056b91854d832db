"""Memory and speed switches that work on any task's model: compiled blocks, activation
offloading to CPU memory, and Liger Kernel's fused Triton kernels.

- :func:`compile_blocks` (``trainer.compile``): ``torch.compile`` with dynamic shapes of each
  block's ``forward`` (the task's transformer layers). Only the forward function is replaced, as
  an instance attribute, so the module tree, the state dict, activation checkpointing (which
  calls the module) and FSDP2's hooks (which run around ``forward``) are untouched.
- :func:`offload_saved_tensors` (``trainer.offload_activations``): saved-tensor hooks that move
  every tensor autograd saves in the forward pass (1 MiB or more, not a parameter) to pinned CPU
  memory and bring it back when backward needs it. Non-reentrant activation checkpointing saves
  only each block's input outside its own hooks (and recomputes the rest), so with checkpointing
  exactly the checkpointed blocks' inputs move to the CPU.
- :func:`apply_liger_kernel` (``model.liger_kernel`` of lora_llm / qwen_vl): Liger Kernel's
  RMSNorm, RoPE and SwiGLU kernels patched into a supported model (Llama, Qwen2, Qwen2.5-VL, ...);
  its fused linear cross-entropy is left off, since ``loss.chunked`` computes the loss.

Self-check: ``python -m core.nn.acceleration`` (offloading gives the same gradients, on the CPU).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

OFFLOAD_MIN_BYTES = 2**20
"""Saved tensors smaller than this stay where they are (copying them costs more than they hold)."""


def compile_blocks(model: nn.Module, classes: set[type[nn.Module]]) -> int:
    """Compile the ``forward`` of every block of ``model`` with ``torch.compile(dynamic=True)``.

    Args:
        model: the task's model (before DDP / FSDP2 wrap it).
        classes: the block classes (the task's ``fsdp_wrap_classes``).

    Returns:
        The number of blocks compiled.

    Raises:
        ValueError: no block of these classes in the model.
    """
    blocks = [m for m in model.modules() if classes and isinstance(m, tuple(classes))]
    if not blocks:
        raise ValueError(
            "trainer.compile=true needs the task's block classes (fsdp.auto_wrap or the task's "
            f"transformer layers); none of {sorted(c.__name__ for c in classes)} is in the model"
        )
    for block in blocks:
        # An instance attribute shadows the class's forward: Module.__call__ (and with it
        # hooks, checkpoint wrappers and FSDP2) still runs eagerly around the compiled function.
        block.forward = torch.compile(block.forward, dynamic=True)
    return len(blocks)


@contextlib.contextmanager
def offload_saved_tensors(
    pin_memory: bool = True, min_bytes: int = OFFLOAD_MIN_BYTES
) -> Iterator[dict[str, int]]:
    """Tensors saved for backward inside the block live in CPU memory until backward needs them.

    Args:
        pin_memory: copy into page-locked memory (asynchronous copies on a GPU); False on a
            machine without CUDA (the self-check and the CPU tests).
        min_bytes: smaller tensors are kept where they are.

    Yields:
        Counters ``{"tensors", "bytes"}`` of what was offloaded (for logs and tests).
    """
    counts = {"tensors": 0, "bytes": 0}

    def pack(tensor: torch.Tensor) -> Any:
        size = tensor.numel() * tensor.element_size()
        # Parameters (and FSDP2's gathered ones) are not activations: they stay in memory anyway.
        if isinstance(tensor, nn.Parameter) or size < min_bytes or tensor.is_sparse:
            return tensor
        cpu = torch.empty(
            tensor.size(),
            dtype=tensor.dtype,
            layout=tensor.layout,
            pin_memory=pin_memory and tensor.is_cuda,
        )
        # Same stream: the copy is ordered before any later kernel that reuses the GPU memory.
        cpu.copy_(tensor, non_blocking=tensor.is_cuda)
        counts["tensors"] += 1
        counts["bytes"] += size
        return (tensor.device, cpu)

    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        device, cpu = packed
        return cpu.to(device, non_blocking=cpu.is_pinned())

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield counts


LIGER_KERNELS = {"rope": True, "rms_norm": True, "swiglu": True, "layer_norm": True, "geglu": True}
"""The Liger kernels applied; cross-entropy stays with ``loss.chunked`` (core.nn.loss)."""


def apply_liger_kernel(model: nn.Module, key: str) -> list[str]:
    """Patch Liger Kernel's fused Triton kernels into a transformers model instance.

    Args:
        model: the transformers model (before peft wraps it).
        key: the config key that asked for it (for messages).

    Returns:
        The kernels applied (their ``apply_liger_kernel_to_*`` keyword names).

    Raises:
        ValueError: Liger Kernel is not installed, there is no CUDA GPU, or it has no kernels for
            this model type.
    """
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        raise ValueError(
            f"{key}=true needs Liger Kernel: install the extra (uv sync --all-packages --extra "
            "liger, or pip install 'core[liger]')"
        )
    if not torch.cuda.is_available():
        raise ValueError(f"{key}=true needs a CUDA GPU (Liger's kernels are written in Triton)")
    import inspect

    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply is None:
        raise ValueError(
            f"{key}=true: Liger Kernel has no kernels for model type {model_type!r} (it has "
            f"{', '.join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))})"
        )
    accepted = inspect.signature(apply).parameters
    kwargs = {k: v for k, v in LIGER_KERNELS.items() if k in accepted}
    for off in ("cross_entropy", "fused_linear_cross_entropy"):
        if off in accepted:
            kwargs[off] = False
    apply(model=model, **kwargs)
    applied = sorted(k for k, v in kwargs.items() if v)
    log.info("Liger Kernel on %s: %s", model_type, ", ".join(applied))
    return applied


if __name__ == "__main__":  # self-check: python -m core.nn.acceleration
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    blocks = nn.ModuleList(nn.Sequential(nn.Linear(512, 512), nn.GELU()) for _ in range(3))
    x = torch.randn(600, 512, requires_grad=True)

    def run(offload: bool) -> list[torch.Tensor]:
        x.grad = None
        for p in blocks.parameters():
            p.grad = None
        context = offload_saved_tensors(pin_memory=False) if offload else contextlib.nullcontext()
        with context as counts:
            h = x
            for block in blocks:
                h = checkpoint(block, h, use_reentrant=False)
            loss = h.square().sum()
        loss.backward()
        if offload:
            print(f"offloaded {counts['tensors']} tensors, {counts['bytes'] / 2**20:.1f} MiB")
        return [x.grad.clone()] + [p.grad.clone() for p in blocks.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(run(False), run(True)))
    print("core.nn.acceleration: ok")
