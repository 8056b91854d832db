"""What the task packages do alike with a transformers model: the dtype choice, activation
checkpointing, quiet loading, parameter counts.

- dtypes: :data:`DTYPES` (config names), :func:`auto_dtype` (``auto`` is bfloat16 on a GPU that
  has it, float16 on an older GPU, float32 on the CPU), :func:`precision_dtype` (what every
  parameter is under a Fabric precision) and :func:`check_dtypes`, :func:`default_dtype`
  (torch's default dtype for a block).
- :func:`enable_checkpointing`: transformers' non-reentrant activation checkpointing (the
  transformers 5 name, or the older one), the KV cache off.
- :func:`liger_kernel`: Liger Kernel's fused kernels, a refusal as a user error (exit code 2).
- :func:`transformers_errors_only`: hide transformers' info and warning output while loading.
- :func:`block_classes`: a model class's transformer blocks (the FSDP units).
- :func:`real_numel` / :func:`parameter_counts`: counts with packed 4-bit weights at their size.

Self-check: ``python -m core.nn.models``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from core.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The dtype names a config or flag may give."""


def cuda_dtype() -> torch.dtype:
    """bfloat16 on GPUs that support it, else float16."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def auto_dtype(choice: str, device_type: str) -> torch.dtype:
    """The dtype of a ``float32`` / ``bfloat16`` / ``float16`` / ``auto`` setting.

    Args:
        choice: the setting; ``auto`` is :func:`cuda_dtype` on ``cuda``, else float32.
        device_type: where the model computes (``cuda`` or ``cpu``).
    """
    if choice != "auto":
        return DTYPES[choice]
    return cuda_dtype() if device_type == "cuda" else torch.float32


def precision_dtype(precision: str) -> torch.dtype:
    """The dtype every parameter has under a Fabric precision (``-true``: that dtype; mixed:
    float32)."""
    return {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}.get(
        precision, torch.float32
    )


def check_dtypes(model: nn.Module, expected: torch.dtype) -> None:
    """Fail when any floating parameter has another dtype than ``expected`` (e.g. after a resume).

    Raises:
        RuntimeError: with the first offending parameter names.
    """
    wrong = [
        f"{n} ({p.dtype})"
        for n, p in model.named_parameters()
        if p.is_floating_point() and p.dtype != expected
    ]
    if wrong:
        raise RuntimeError(
            f"{len(wrong)} parameters are not {expected}: {wrong[:5]}; every tensor must share "
            "one dtype."
        )


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Temporarily set torch's default dtype (the trainer's ``init_module`` may have changed it)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of a transformers model, KV cache off (useless in
    training and in conflict with checkpointing)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # pragma: no cover - older transformers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


@contextmanager
def transformers_errors_only() -> Iterator[None]:
    """Hide transformers' info and warning output (its weight "load report" table) while loading;
    a mismatch that matters becomes one error paragraph from the task's own checks."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def block_classes(model: type | nn.Module) -> set[type[nn.Module]]:
    """The transformer block classes of a transformers model (its ``_no_split_modules``), the
    units FSDP wraps.

    Args:
        model: a model class (the names are looked up in its module), or a built model (the
            classes of its modules that any of them names: a wrapper such as peft's included).
    """
    if isinstance(model, nn.Module):
        names = {n for m in model.modules() for n in getattr(m, "_no_split_modules", None) or []}
        return {type(m) for m in model.modules() if type(m).__name__ in names}
    import sys

    module = sys.modules[model.__module__]
    return {
        getattr(module, name)
        for name in (getattr(model, "_no_split_modules", None) or [])
        if hasattr(module, name)
    }


def liger_kernel(model: nn.Module) -> None:
    """``model.liger_kernel``: :func:`core.nn.acceleration.apply_liger_kernel`, its refusal (no
    GPU, not installed, no kernels for the model type) a :class:`~core.errors.UserError`."""
    from core.nn.acceleration import apply_liger_kernel

    try:
        apply_liger_kernel(model, "model.liger_kernel")
    except ValueError as err:
        raise UserError(str(err)) from None


def real_numel(param: torch.Tensor) -> int:
    """Number of weights a parameter stands for (a packed 4-bit tensor holds two per byte)."""
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return int(torch.Size(quant_state.shape).numel())
    return param.numel()


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameters (a tied tensor once), 4-bit weights at their real size."""
    trainable = total = 0
    for param in model.parameters():
        n = real_numel(param)
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


if __name__ == "__main__":  # self-check: python -m core.nn.models
    assert auto_dtype("bfloat16", "cpu") == torch.bfloat16
    assert auto_dtype("auto", "cpu") == torch.float32
    assert precision_dtype("bf16-true") == torch.bfloat16
    assert precision_dtype("bf16-mixed") == torch.float32
    with default_dtype(torch.float64):
        layer = nn.Linear(3, 2)
    assert layer.weight.dtype == torch.float64 and torch.get_default_dtype() == torch.float32
    layer.bias.requires_grad_(False)
    assert parameter_counts(layer) == (6, 8)
    try:
        check_dtypes(layer, torch.float32)
        raise AssertionError("a float64 layer passed")
    except RuntimeError as err:
        print("refused:", err)
    with transformers_errors_only():
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1,
        )  # fmt: skip
        model = LlamaForCausalLM(config)
    assert {c.__name__ for c in block_classes(type(model))} == {"LlamaDecoderLayer"}
    enable_checkpointing(model)
    assert model.is_activation_checkpointing and not model.config.use_cache
    print("core.nn.models: ok")
