"""``merge`` written once for every task that trains a LoRA adapter (peft): the adapter merged
into its 16/32-bit base with ``merge_and_unload``, saved with ``save_pretrained`` (+ tokenizer),
and checked by logits on a probe input, in memory and reloaded from ``--out``. A task declares a
:class:`MergeSpec` (its script name, how to load base + adapter and the probe) and gets::

    <prog> --model DIR --out DIR [--base NAME_OR_DIR] [--dtype ...] [--device ...]
           [--probe TEXT] [--tolerance X]

The report goes to stdout and ``--out/merge_report.json``. A target without room for the merged
weights is refused before anything is written; a full or read-only disk met while writing
removes what was written; the folder's marker is written last, so a marked folder always holds a
whole model. Exit codes: 0 when the logits match within the tolerance, 1 when they do not or the
disk is full or read-only, 2 for a user mistake.

Self-check: ``python -m core.commands.merge`` (a tiny Llama with a random adapter, merged twice).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.commands.infer import add_device_argument
from core.commands.model_io import removed_if_half_made
from core.errors import UserError, user_errors_exit_2
from core.run.outputs import guard_folder, mark_folder, write_text
from core.run.storage import check_free_space, check_writable, storage_errors


@dataclass(frozen=True)
class Loaded:
    """What a task's loader hands to ``merge``.

    Attributes:
        model: the peft model (adapter on a 16/32-bit base), eval mode, on its device.
        tokenizer: saved next to the merged model (a tokenizer or processor).
        probe: ``(1, seq)`` token ids on the model's device, whose logits are compared.
        base: the base model's name or folder, for the report.
        dtype: the dtype name of the base and the merged model.
    """

    model: Any
    tokenizer: Any
    probe: Any
    base: str
    dtype: str


@dataclass(frozen=True)
class MergeSpec:
    """A task's ``merge`` (see the module docstring).

    Attributes:
        prog: the script name (``lora-llm-merge``); also the marker's command.
        load: ``args -> Loaded``, called after ``--out`` is checked (raises ``UserError``).
        probe: the default of ``--probe``; ``probe_help``: its help.
        base_help: the help of ``--base``.
    """

    prog: str
    load: Callable[[argparse.Namespace], Loaded]
    probe: str
    probe_help: str
    base_help: str = "base model (Hub id or folder); default: the one the adapter was trained on"

    def command(self, argv: Sequence[str] | None = None) -> int:
        """``merge`` of this task: see :func:`merge_command`."""
        return merge_command(self, argv)


def merge_parser(spec: MergeSpec) -> argparse.ArgumentParser:
    """Arguments of ``merge``."""
    parser = argparse.ArgumentParser(
        prog=spec.prog,
        description="Merge a LoRA adapter into its 16/32-bit base model and save the result "
        "(save_pretrained).",
        epilog=f"example: {spec.prog} --model runs/001_x/final --out merged/ --dtype bfloat16",
    )
    parser.add_argument(
        "--model",
        "--adapter",
        dest="adapter",
        required=True,
        type=Path,
        help="adapter folder (a run's final/)",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        help="new folder for the merged model (must not exist or be empty)",
    )
    parser.add_argument("--base", help=spec.base_help)
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="dtype of the base and the merged model; auto: float32 on the CPU, bfloat16/float16 "
        "on a GPU",
    )
    add_device_argument(parser, choices=("auto", "cpu", "cuda"))
    parser.add_argument("--probe", default=spec.probe, help=spec.probe_help)
    parser.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="largest allowed |merged - adapter| logit difference relative to the largest logit "
        "(default 1e-4 in float32, 2e-2 in 16 bits)",
    )
    return parser


def merge_dtype(choice: str, device: Any) -> str:
    """The dtype name of ``--dtype``: ``auto`` is float32 on the CPU, else
    :func:`core.nn.models.cuda_dtype` (bfloat16, or float16 on an older GPU)."""
    from core.nn.models import cuda_dtype

    if choice != "auto":
        return choice
    return "float32" if device.type == "cpu" else str(cuda_dtype()).removeprefix("torch.")


def check_not_quantized_checkpoint(base: str) -> None:
    """Refuse a base folder saved in 4/8 bits (merging into it would corrupt the weights).

    Raises:
        UserError: ``config.json`` of the folder has a bitsandbytes ``quantization_config``.
    """
    config_file = Path(base) / "config.json"
    if config_file.is_file():
        quant = json.loads(config_file.read_text(encoding="utf-8")).get("quantization_config")
        if quant:
            raise UserError(
                f"The base '{base}' is a quantized checkpoint "
                f"({quant.get('quant_method', 'bitsandbytes')}); merging an adapter into "
                "4/8-bit weights corrupts them. Give the original 16/32-bit base with --base."
            )


def merge_and_check(model: Any, probe: Any) -> tuple[Any, dict[str, float]]:
    """Merge the adapter into the (16/32-bit) base and compare logits on a probe input.

    Args:
        model: a ``PeftModel`` on an unquantized base, eval mode.
        probe: ``(1, seq)`` token ids.

    Returns:
        ``(merged model, numbers)`` with ``max_abs_diff`` (merged vs adapter logits),
        ``max_abs_logit`` and ``adapter_effect`` (adapter vs plain base logits: shows the check is
        not trivially met by an adapter that changes nothing).
    """
    import torch

    with torch.no_grad():
        with model.disable_adapter():
            plain = model(input_ids=probe).logits.float()
        adapted = model(input_ids=probe).logits.float()
        merged = model.merge_and_unload()
        after = merged(input_ids=probe).logits.float()
    return merged, {
        "max_abs_diff": float((after - adapted).abs().max()),
        "max_abs_logit": float(adapted.abs().max()),
        "adapter_effect": float((adapted - plain).abs().max()),
    }


def check_merge_target(args: argparse.Namespace, prog: str) -> None:
    """Never into a folder of other files or of an earlier merge, nor onto the adapter or the
    base it reads; a target that cannot be written is refused before minutes of loading."""
    guard_folder(
        args.out,
        "--out",
        prog,
        inputs=[(args.adapter, "--model"), *([(Path(args.base), "--base")] if args.base else [])],
    )
    if args.out.is_dir() and any(args.out.iterdir()):
        raise UserError(
            f"--out '{args.out}' already holds a merged model; merge writes a new "
            "folder: choose another --out."
        )
    check_writable(args.out, "the merged model")


def save_merged(merged: Any, tokenizer: Any, out: Path) -> None:
    """``save_pretrained`` of the merged model and its tokenizer into ``out``; refused before a
    byte lands when the weights (most of what is written) cannot fit."""
    needed = sum(t.numel() * t.element_size() for t in merged.state_dict().values())
    check_free_space(out, needed, "the merged model")
    with storage_errors("the merged model", out, needed):
        out.mkdir(parents=True, exist_ok=True)
        merged.save_pretrained(out)
        tokenizer.save_pretrained(out)


def reload_difference(merged: Any, out: Path, loaded: Loaded) -> float:
    """Largest ``|reloaded - merged|`` logit on the probe, the model reloaded from ``out`` (by
    the merged model's own class) in the merge's dtype, on the probe's device."""
    import torch

    from core.nn.models import DTYPES

    reloaded = type(merged).from_pretrained(
        out, dtype=DTYPES[loaded.dtype], device_map={"": loaded.probe.device}
    )
    with torch.no_grad():
        again = reloaded(input_ids=loaded.probe).logits.float()
        reference = merged(input_ids=loaded.probe).logits.float()
    return float((again - reference).abs().max())


def merge_verdict(report: dict[str, Any], args: argparse.Namespace) -> str:
    """The lines ``merge`` prints: what was merged, the probe's logit differences, the verdict."""
    scale = max(report["max_abs_logit"], 1.0)
    return (
        f"merged {args.adapter} into {report['base']} ({report['dtype']}) -> {args.out}\n"
        f"probe logits: max |merged - adapter| = {report['max_abs_diff']:.3e}, max |reloaded - "
        f"merged| = {report['reloaded_max_abs_diff']:.3e} "
        f"(largest logit {report['max_abs_logit']:.2f}; the adapter itself moves logits by up to "
        f"{report['adapter_effect']:.3e})\n"
        + (
            "verification passed"
            if report["ok"]
            else f"VERIFICATION FAILED: difference above {report['tolerance_relative']:g} x "
            f"{scale:.2f}"
        )
    )


def merge_report(args: argparse.Namespace, loaded: Loaded, numbers: dict[str, float]) -> dict:
    """``merge_report.json``: the inputs, the tolerance (``--tolerance``, else 1e-4 in float32
    and 2e-2 in 16 bits, relative to the largest logit), the verdict ``ok`` and the numbers."""
    tolerance = (
        args.tolerance
        if args.tolerance is not None
        else (1e-4 if loaded.dtype == "float32" else 2e-2)
    )
    scale = max(numbers["max_abs_logit"], 1.0)
    ok = (
        numbers["max_abs_diff"] <= tolerance * scale
        and numbers["reloaded_max_abs_diff"] <= tolerance * scale
    )
    return {
        "adapter": str(args.adapter),
        "base": loaded.base,
        "dtype": loaded.dtype,
        "probe_tokens": loaded.probe.shape[1],
        "tolerance_relative": tolerance,
        "ok": ok,
        **numbers,
    }


@user_errors_exit_2
def merge_command(spec: MergeSpec, argv: Sequence[str] | None = None) -> int:
    """``merge --model DIR --out DIR [...]`` of a task: check ``--out``, load (the task's
    :attr:`MergeSpec.load`), merge and compare, save, reload and compare, report, mark.

    Returns:
        Exit code (see the module docstring).
    """
    import sys

    from core.run.logs import transformers_quiet

    args = merge_parser(spec).parse_args(sys.argv[1:] if argv is None else argv)
    transformers_quiet()
    check_merge_target(args, spec.prog)
    loaded = spec.load(args)
    merged, numbers = merge_and_check(loaded.model, loaded.probe)
    # A full or read-only disk met while writing removes what was written.
    with removed_if_half_made(args.out):
        save_merged(merged, loaded.tokenizer, args.out)
        numbers["reloaded_max_abs_diff"] = reload_difference(merged, args.out, loaded)
        report = merge_report(args, loaded, numbers)
        write_text(args.out / "merge_report.json", json.dumps(report, indent=1), "the merge report")
        # Marked last: a folder with the marker is a whole merged model, never a half-made one.
        mark_folder(args.out, spec.prog)
    print(merge_verdict(report, args))
    return 0 if report["ok"] else 1


if __name__ == "__main__":  # self-check: python -m core.commands.merge
    import contextlib
    import io
    import tempfile

    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from core.nn.models import transformers_errors_only
    from core.task.wordlevel import word_tokenizer

    tok = word_tokenizer(["merge the adapter"], {"pad_token": "<pad>", "unk_token": "<unk>"})
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
    )  # fmt: skip

    def _load(args: argparse.Namespace) -> Loaded:
        with transformers_errors_only():
            base = LlamaForCausalLM.from_pretrained(args.base)
        model = PeftModel.from_pretrained(base, str(args.adapter)).eval()
        return Loaded(
            model, tok, torch.tensor([tok.encode("merge the adapter")]), args.base, "float32"
        )

    spec = MergeSpec(prog="toy-merge", load=_load, probe="hi", probe_help="a probe")
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(f"{tmp}/base")
        lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(LlamaForCausalLM(config), lora).save_pretrained(f"{tmp}/adapter")
        common = ["--model", f"{tmp}/adapter", "--base", f"{tmp}/base", "--device", "cpu"]
        printed, said = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(said):
            assert spec.command([*common, "--out", f"{tmp}/merged"]) == 0
            assert spec.command([*common, "--out", f"{tmp}/merged"]) == 2
            assert spec.command([*common, "--out", f"{tmp}/m2", "--tolerance", "-1"]) == 1
        report = json.loads(Path(f"{tmp}/merged/merge_report.json").read_text())
    assert report["ok"] and report["adapter_effect"] > 0, report
    assert "verification passed" in printed.getvalue(), printed.getvalue()
    assert "VERIFICATION FAILED" in printed.getvalue(), printed.getvalue()
    assert "already holds a merged model" in said.getvalue(), said.getvalue()
    print("core.commands.merge: ok")
