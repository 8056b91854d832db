"""Benchmarks 5 and 6 — GPU memory, throughput and MFU of real-size architectures (random
weights built from their public configuration values: nothing is downloaded), through our
trainer and through the Hugging Face Trainer.

- LoRA (bf16 base) and QLoRA (NF4 base, double quantisation, bf16 compute) on GPT-2 124M,
  TinyLlama-1.1B and Phi-2 2.7B at sequence length 512 (packed Alpaca records), micro-batch 1
  and 4, gradient checkpointing, ``paged_adamw_8bit`` — lora_llm's own code path;
- Qwen2.5-VL-3B full fine-tuning in bf16 with gradient checkpointing on counting images —
  qwen_vl's code path;
- the same LoRA / QLoRA workloads through ``transformers.Trainer`` for the ratio.

MFU uses the 6·N·tokens convention (forward 2N, input gradients 2N, recomputation 2N with
checkpointing) against the bf16 matmul peak *measured* on the device (a large GEMM), not the
datasheet number. Peak memory is ``torch.cuda.max_memory_allocated`` of each run.

    uv run python bench/gpu.py --steps 30 --out docs/benchmarks.md

Without a CUDA device it prints why it skipped and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch
from common import REPO, emit, report, table, train_run

LORA_TOKENIZER = REPO / "packages" / "lora_llm" / "src" / "lora_llm" / "assets" / "tiny_tokenizer"
SEQ = 512

# Public configuration values of the real models (their config.json on the Hub).
ARCHS = {
    "gpt2": (
        "GPT2Config",
        dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
        ["c_attn", "c_proj"],
    ),
    "tinyllama": (
        "LlamaConfig",
        dict(
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            max_position_embeddings=2048,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
        ),
        ["q_proj", "k_proj", "v_proj", "o_proj"],
    ),
    "phi2": (
        "PhiConfig",
        dict(
            vocab_size=51200,
            hidden_size=2560,
            intermediate_size=10240,
            num_hidden_layers=32,
            num_attention_heads=32,
            partial_rotary_factor=0.4,
            max_position_embeddings=2048,
            layer_norm_eps=1e-5,
            rope_theta=10000.0,
        ),
        ["q_proj", "k_proj", "v_proj", "dense"],
    ),
}
QWEN_3B = dict(
    text_config=dict(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        max_position_embeddings=128000,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
    ),
    vision_config=dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=2048,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
    ),
)


def measured_bf16_peak(n: int = 8192, reps: int = 20) -> float:
    """bf16 GEMM throughput of this device in FLOP/s (median of ``reps`` n x n x n products)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    return 2 * n**3 / times[len(times) // 2]


def random_checkpoint(arch: str, root: Path) -> Path:
    """Save a randomly initialised bf16 model of ``arch`` (plus the small shipped tokenizer)."""
    import transformers

    folder = root / arch
    if (folder / "config.json").is_file():
        return folder
    cls_name, values, _ = ARCHS[arch]
    config = getattr(transformers, cls_name)(**values)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    for item in LORA_TOKENIZER.iterdir():
        shutil.copy(item, folder / item.name)
    return folder


def lora_config(
    folder: Path,
    arch: str,
    bits: int | None,
    batch: int,
    steps: int,
    root: Path,
    seq: int = SEQ,
    extra: tuple[str, ...] = (),
):
    """lora_llm's config for one workload; ``extra`` overrides come last (the switches)."""
    from core.config.loader import load_config
    from lora_llm.cli import PRESETS
    from lora_llm.config import LoraLLMConfig

    targets = ARCHS[arch][2]
    return load_config(
        LoraLLMConfig,
        "tiny",
        [
            f"run.root={root}",
            f"model.name={folder}",
            f"model.tokenizer={LORA_TOKENIZER}",
            "model.gradient_checkpointing=true",
            f"lora.target_modules=[{','.join(targets)}]",
            f"quant.bits={bits if bits else 'null'}",
            "quant.compute_dtype=bfloat16",
            "data.train_files=[sample:en]",
            "data.packing=true",
            f"data.max_length={seq}",
            "data.val_size=0",
            f"trainer.batch_size={batch}",
            "trainer.accumulate_grad_batches=1",
            f"trainer.max_steps={steps}",
            f"trainer.log_every_n_steps={max(1, steps // 3)}",
            "trainer.val_every_n_steps=null",
            "trainer.val_at_end=false",
            "trainer.accelerator=cuda",
            "trainer.devices=1",
            "trainer.precision=bf16-mixed",
            "trainer.group_by_length=false",
            "optim.name=paged_adamw_8bit",
            "logger.progress_bar=false",
            "logger.plot=false",
            *extra,
        ],
        PRESETS,
    )


def ours(cfg, peak: float) -> dict[str, float]:
    """Train with core's Trainer; tokens/s of the last logging interval, peak memory, MFU (6N)."""
    from lora_llm.task import LoraLLMTask

    summary, records = train_run(cfg, LoraLLMTask(cfg))
    last = [r for r in records if "train/loss" in r][-1]
    params = summary["parameters"]["total"]
    tokens = last["throughput/tokens_per_sec"]
    return {
        "tokens_per_sec": tokens,
        "peak_gb": max(r.get("memory/peak_allocated_gb", 0) for r in records),
        "mfu": 6 * params * tokens / peak,
    }


def hf_trainer(cfg, steps: int) -> dict[str, float]:
    """The same model, adapter, data and optimizer through transformers.Trainer."""
    from transformers import Trainer, TrainingArguments

    from lora_llm.model import add_adapter, load_base
    from lora_llm.task import LoraLLMTask

    task = LoraLLMTask(cfg)
    task.setup()
    torch.cuda.reset_peak_memory_stats()
    base = load_base(
        cfg.model.name, cfg.model, cfg.quant if cfg.quant.bits else None, torch.device("cuda")
    )
    model = add_adapter(base, cfg.lora, cfg.model.gradient_checkpointing)

    def collate(samples):
        batch = task.collate(samples)
        batch.pop("index", None)
        return batch

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=cfg.trainer.batch_size,
            max_steps=steps,
            learning_rate=cfg.optim.lr,
            optim="paged_adamw_8bit",
            bf16=True,
            logging_steps=max(1, steps // 3),
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            disable_tqdm=True,
            remove_unused_columns=False,
            lr_scheduler_type="cosine",
        )
        out = Trainer(
            model=model, args=args, train_dataset=task.train_dataset(), data_collator=collate
        ).train()
    seconds = float(out.metrics["train_runtime"])
    return {
        "tokens_per_sec": steps * cfg.trainer.batch_size * SEQ / seconds,
        "peak_gb": torch.cuda.max_memory_allocated() / 2**30,
    }


def qwen_full_finetune(
    root: Path, steps: int, peak: float, extra: tuple[str, ...] = ()
) -> dict[str, float]:
    """Qwen2.5-VL-3B (random weights) full fine-tuning in bf16 with gradient checkpointing;
    ``extra`` overrides come last (the switches)."""
    import subprocess
    import sys

    from transformers import AutoConfig, AutoModelForImageTextToText

    from core.config.loader import load_config
    from qwen_vl.cli import PRESETS_DIR
    from qwen_vl.config import QwenVLConfig
    from qwen_vl.task import QwenVLTask

    processor = REPO / "packages" / "qwen_vl" / "src" / "qwen_vl" / "assets" / "tiny_processor"
    folder = root / "qwen2_5_vl_3b"
    if not (folder / "config.json").is_file():
        config = AutoConfig.for_model("qwen2_5_vl", **QWEN_3B)
        with torch.device("cuda"):
            model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(folder)
        del model
        torch.cuda.empty_cache()
    data = root / "counting"
    if not (data / "train.jsonl").is_file():
        subprocess.run(
            [
                str(Path(sys.executable).parent / "make-data"),
                "--out",
                str(data),
                "--n",
                "256",
                "--size",
                "448",
            ],
            check=True,
            capture_output=True,
        )
    cfg = load_config(
        QwenVLConfig,
        "tiny",
        [
            f"run.root={root / 'runs'}",
            f"model.name={folder}",
            f"model.processor={processor}",
            "model.gradient_checkpointing=true",
            "model.train_vision=true",
            f"data.train_file={data / 'train.jsonl'}",
            f"data.val_file={data / 'dev.jsonl'}",
            "data.max_pixels=200704",
            f"trainer.max_steps={steps}",
            "trainer.batch_size=4",
            f"trainer.log_every_n_steps={max(1, steps // 3)}",
            "trainer.val_every_n_steps=null",
            "trainer.val_at_end=false",
            "trainer.accelerator=cuda",
            "trainer.devices=1",
            "trainer.precision=bf16-true",
            "optim.name=adafactor",
            "logger.progress_bar=false",
            *extra,
        ],
        PRESETS_DIR,
    )
    summary, records = train_run(cfg, QwenVLTask(cfg))
    last = [r for r in records if "train/loss" in r][-1]
    params = summary["parameters"]["total"]
    tokens = last["throughput/tokens_per_sec"]
    return {
        "tokens_per_sec": tokens,
        "peak_gb": max(r.get("memory/peak_allocated_gb", 0) for r in records),
        "mfu": 6 * params * tokens / peak,
    }


SWITCHES = {
    "defaults (loss.chunked)": (),
    "loss.chunked=false": ("loss.chunked=false",),
    "trainer.offload_activations": ("trainer.offload_activations=true",),
    "trainer.compile": ("trainer.compile=true",),
    "lora.use_dora": ("lora.use_dora=true",),
    "padding-free + flash-attention": (
        "data.padding_free=true",
        "model.attn_implementation=flash_attention_2",
    ),
    "model.liger_kernel": ("model.liger_kernel=true",),
}
"""Issue 16's switches, each on its own over the defaults (lora_llm names; qwen_vl takes the ones
that exist for it)."""
QWEN_SWITCHES = {
    "defaults (loss.chunked)",
    "loss.chunked=false",
    "trainer.offload_activations",
    "trainer.compile",
    "model.liger_kernel",
}


def switch_rows(root: Path, steps: int, peak: float) -> list[list[str]]:
    """Peak memory and tokens/s with each switch on: Phi-2 QLoRA NF4 at 512 and 2,048 tokens
    (targets: under 4 GB and inside 8 GB), TinyLlama for Liger Kernel (it has no Phi kernels),
    and Qwen2.5-VL-3B full fine-tuning in bf16 with activation checkpointing."""
    import importlib.util

    rows = []

    def run(label: str, measure) -> None:
        try:
            result = measure()
            rows.append(
                [
                    label,
                    f"{result['peak_gb']:.2f}",
                    f"{result['tokens_per_sec']:,.0f}",
                    f"{100 * result['mfu']:.1f}%",
                ]
            )
        except Exception as err:  # one failing switch must not hide the others
            rows.append([label, f"failed: {type(err).__name__}: {str(err)[:80]}", "", ""])
        torch.cuda.empty_cache()
        print(rows[-1], flush=True)

    flash = importlib.util.find_spec("flash_attn") is not None
    for seq in (512, 2048):
        for name, extra in SWITCHES.items():
            arch = "tinyllama" if name == "model.liger_kernel" else "phi2"
            if "flash" in name and not flash:
                rows.append([f"{arch} QLoRA {seq}: {name}", "skipped: no flash-attn", "", ""])
                continue
            folder = random_checkpoint(arch, root / "models")
            cfg = lora_config(folder, arch, 4, 1, steps, root / "runs", seq, extra)
            run(f"{arch} QLoRA NF4 b1 {seq}: {name}", lambda c=cfg: ours(c, peak))
    for name, extra in SWITCHES.items():
        if name in QWEN_SWITCHES:
            run(
                f"Qwen2.5-VL-3B full FT b4: {name}",
                lambda e=extra: qwen_full_finetune(root, steps, peak, e),
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--archs", default="gpt2,tinyllama,phi2")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument(
        "--no-hf", action="store_true", help="skip the Hugging Face Trainer comparison"
    )
    parser.add_argument("--no-qwen", action="store_true", help="skip Qwen2.5-VL-3B")
    parser.add_argument(
        "--switches",
        action="store_true",
        help="instead: each memory / speed switch on and off (Phi-2 QLoRA at 512 and 2,048 "
        "tokens, Qwen2.5-VL-3B)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    command = "uv run python bench/gpu.py " + " ".join(
        f"--{k.replace('_', '-')} {v}"
        for k, v in (("steps", args.steps), ("archs", args.archs), ("batches", args.batches))
    )
    if not torch.cuda.is_available():
        text = report(
            "GPU memory and throughput", command, "Skipped: no CUDA device on this machine."
        )
        print(text)
        return
    logging.disable(logging.WARNING)
    peak = measured_bf16_peak()
    root = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    if args.switches:
        body = (
            f"{args.steps} steps per run, micro-batch 1 (Qwen: 4), gradient checkpointing; each "
            "row turns one switch on over the defaults. Targets: Phi-2 QLoRA at 512 tokens under "
            "4 GB peak, at 2,048 tokens inside 8 GB.\n\n"
            + table(
                ["workload: switch", "peak memory GB", "tokens/s", "MFU"],
                switch_rows(root, args.steps, peak),
            )
        )
        emit(report("GPU memory and speed switches", command + " --switches", body), args.out)
        shutil.rmtree(root, ignore_errors=True)
        return
    rows = []
    for arch in args.archs.split(","):
        folder = random_checkpoint(arch, root / "models")
        for bits in (None, 4):
            for batch in (int(b) for b in args.batches.split(",")):
                label = f"{arch} {'QLoRA NF4' if bits else 'LoRA bf16'} b{batch}"
                try:
                    cfg = lora_config(folder, arch, bits, batch, args.steps, root / "runs")
                    mine = ours(cfg, peak)
                    torch.cuda.empty_cache()
                    theirs = (
                        None
                        if args.no_hf
                        else hf_trainer(
                            lora_config(folder, arch, bits, batch, args.steps, root / "runs"),
                            args.steps,
                        )
                    )
                    torch.cuda.empty_cache()
                except Exception as err:  # one failing configuration must not hide the others
                    rows.append(
                        [label, f"failed: {type(err).__name__}: {str(err)[:80]}", "", "", "", ""]
                    )
                    continue
                rows.append(
                    [
                        label,
                        f"{mine['peak_gb']:.2f}",
                        f"{mine['tokens_per_sec']:,.0f}",
                        f"{100 * mine['mfu']:.1f}%",
                        f"{theirs['tokens_per_sec']:,.0f} / {theirs['peak_gb']:.2f} GB"
                        if theirs
                        else "—",
                        f"{mine['tokens_per_sec'] / theirs['tokens_per_sec']:.2f}"
                        if theirs
                        else "—",
                    ]
                )
                print(rows[-1], flush=True)
    if not args.no_qwen:
        try:
            q = qwen_full_finetune(root, args.steps, peak)
            rows.append(
                [
                    "Qwen2.5-VL-3B full FT bf16 b4",
                    f"{q['peak_gb']:.2f}",
                    f"{q['tokens_per_sec']:,.0f}",
                    f"{100 * q['mfu']:.1f}%",
                    "—",
                    "—",
                ]
            )
        except Exception as err:
            rows.append(
                [
                    "Qwen2.5-VL-3B full FT bf16 b4",
                    f"failed: {type(err).__name__}: {str(err)[:80]}",
                    "",
                    "",
                    "",
                    "",
                ]
            )
    body = (
        f"Sequence {SEQ} (packed), {args.steps} steps per run, gradient checkpointing, paged "
        "AdamW 8-bit (Adafactor for Qwen). "
        f"Measured bf16 GEMM peak: {peak / 1e12:.0f} TFLOP/s; MFU = 6·N·tokens/s / that peak.\n\n"
        + table(
            [
                "workload",
                "peak memory GB",
                "tokens/s (ours)",
                "MFU",
                "HF Trainer tokens/s / peak",
                "ours / HF",
            ],
            rows,
        )
    )
    text = report("GPU memory and throughput", command, body)
    emit(text, args.out)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
