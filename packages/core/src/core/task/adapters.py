"""A saved LoRA adapter (peft) and the base model under it, for every task that trains one: read
the folder (:func:`read_adapter_config`), find its base (:func:`resolve_base`), put it on a loaded
base checked to fit (:func:`attach_adapter`), and name the layers LoRA can target
(:func:`linear_module_names`). A mistake the user can fix is a :class:`~core.errors.UserError`.

Self-check: ``python -m core.task.adapters``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from core.errors import UserError


@contextmanager
def peft_quietly() -> Iterator[None]:
    """Hide the deprecation warning peft 0.21 triggers in transformers 5
    (``is_gradient_checkpointing``), and its missing-keys warning (:func:`attach_adapter` turns
    a mismatch into an error)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning
        )
        warnings.filterwarnings(
            "ignore", message="Found missing adapter keys", category=UserWarning
        )
        yield


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct last name parts of the linear layers (candidates for LoRA's ``target_modules``):
    ``nn.Linear``, GPT-2's ``Conv1D`` and bitsandbytes' 4/8-bit layers."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ in (
            "Conv1D",
            "Linear4bit",
            "Linear8bitLt",
        ):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """``adapter_config.json`` of an adapter folder.

    Raises:
        UserError: the folder does not exist or is not a peft adapter (no config or weights).
    """
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise UserError(
            f"Adapter folder '{adapter_dir}' does not exist; give a run's final/ folder "
            "(runs/NNN_.../final)."
        )
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file() or not any(adapter_dir.glob("adapter_model.*")):
        raise UserError(
            f"'{adapter_dir}' is not a LoRA adapter folder: it needs adapter_config.json and "
            "adapter_model.safetensors "
            "(what train writes to <run>/final)."
        )
    return json.loads(config_file.read_text(encoding="utf-8"))


def resolve_base(adapter_dir: Path, adapter_config: dict[str, Any], base: str | None) -> str:
    """The base model of an adapter: ``base`` (``--base``), else the adapter's
    ``base_model_name_or_path`` when it is a folder here, else a ``base/`` folder beside the
    adapter's (a moved run whose random base was saved there), else the name as a Hub id.

    Raises:
        UserError: no base is known.
    """
    if base:
        return str(base)
    named = adapter_config.get("base_model_name_or_path")
    if named and Path(named).is_dir():
        return named
    sibling = Path(adapter_dir).resolve().parent / "base"
    if (sibling / "config.json").is_file():
        return str(sibling)
    if named and not Path(named).is_absolute():
        return named
    raise UserError(
        f"The adapter in '{adapter_dir}' names base model '{named}', which is not here; pass "
        "--base NAME_OR_DIR."
    )


def attach_adapter(model: nn.Module, adapter_dir: Path, base: str) -> nn.Module:
    """The saved adapter of ``adapter_dir`` on the loaded base ``model``, checked to fit.

    Args:
        model: the base model (named ``base`` in messages).
        adapter_dir: the adapter folder.
        base: the base's name or folder.

    Returns:
        The ``PeftModel``, in eval mode.

    Raises:
        UserError: the adapter does not match the base (missing layers, other shapes, other
            depth: fewer LoRA places than saved LoRA tensors).
    """
    from peft import PeftModel
    from safetensors import safe_open

    try:
        with peft_quietly():
            model = PeftModel.from_pretrained(model, str(adapter_dir))
    except (ValueError, RuntimeError, KeyError) as err:
        raise UserError(
            f"The adapter in '{adapter_dir}' does not match the base model '{base}': "
            f"{' '.join(str(err).split())[:400]}"
        ) from None
    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as handle:
            saved = len(list(handle.keys()))
        present = sum(1 for name, _ in model.named_parameters() if "lora_" in name)
        if saved != present:
            raise UserError(
                f"The adapter in '{adapter_dir}' does not match the base model '{base}': it holds "
                f"{saved} LoRA tensors, "
                f"the base has places for {present} (another depth or other layer names). Pass "
                "the base it was trained on with --base."
            )
    return model.eval()


if __name__ == "__main__":  # self-check: python -m core.task.adapters
    import tempfile

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    def _llama(layers: int) -> LlamaForCausalLM:
        return LlamaForCausalLM(
            LlamaConfig(
                vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                num_attention_heads=2, num_key_value_heads=1,
            )
        )  # fmt: skip

    assert {"q_proj", "down_proj", "lm_head"} <= set(linear_module_names(_llama(1)))
    with tempfile.TemporaryDirectory() as tmp:
        _llama(2).save_pretrained(f"{tmp}/run/base")
        lora = LoraConfig(r=2, target_modules=["q_proj"])
        get_peft_model(_llama(2), lora).save_pretrained(f"{tmp}/run/final")
        config = read_adapter_config(Path(f"{tmp}/run/final"))
        base = resolve_base(Path(f"{tmp}/run/final"), config, None)
        assert base == str(Path(f"{tmp}/run/base").resolve()), base
        model = attach_adapter(LlamaForCausalLM.from_pretrained(base), f"{tmp}/run/final", base)
        assert not model.training and any("lora_" in n for n, _ in model.named_parameters())
        for bad in (lambda: read_adapter_config(Path(tmp)), lambda: attach_adapter(
            _llama(1), f"{tmp}/run/final", "one layer")):  # fmt: skip
            try:
                bad()
                raise AssertionError("a bad adapter passed")
            except UserError as err:
                print("refused:", str(err)[:90])
    print("core.task.adapters: ok")
