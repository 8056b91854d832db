"""Benchmark 9: per-rank training state and step time, FSDP2 against DDP, on 2 CPU processes.

A 134M-parameter Llama (hidden 768, 12 layers, vocabulary 32,000, untied head) takes AdamW steps on
random
tokens under Fabric with ``trainer.strategy``-equivalent set-ups: DDP (every rank holds the whole
model, gradients and Adam moments) and core's FSDP2 (``fully_shard`` per decoder layer, then the
root). Per rank it reports:

- **state bytes**: parameters + gradients + optimizer state that the rank holds, counted from the
  tensors themselves (``DTensor.to_local()`` under FSDP2), after a step;
- **peak RSS**: the process's peak resident memory (``ru_maxrss``), which also holds the
  activations, the transiently gathered layers and the Python / torch runtime;
- **step time**: the median over the measured steps.

Run::

    uv run python bench/fsdp_memory.py --steps 6 --out docs/benchmarks.md

The script launches itself once per strategy (Fabric starts the second rank).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, report, table  # noqa: E402

MIB = 2**20


def local_bytes(tensors) -> int:
    """Bytes of the tensors as this rank holds them (the local shard of a DTensor)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def worker(strategy: str, steps: int, seq: int, batch: int) -> None:
    """One measurement (every rank runs this; rank 0 prints ``RESULT {json}``)."""
    import torch
    from lightning.fabric import Fabric
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from core.config.schema import FSDPConfig
    from core.parallel.fsdp import FSDP2Strategy, parallelize
    from core.parallel.strategy import destroy_process_group_at_exit

    if strategy == "fsdp":
        import functools

        fn = functools.partial(
            parallelize,
            cfg=FSDPConfig(),
            wrap_classes={LlamaDecoderLayer},
            precision="32-true",
            devices_per_node=2,
        )
        fabric_strategy = FSDP2Strategy(parallelize_fn=fn)
    else:
        fabric_strategy = "ddp"
    fabric = Fabric(accelerator="cpu", devices=2, strategy=fabric_strategy, precision="32-true")
    destroy_process_group_at_exit()
    fabric.launch()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=seq,
    )
    with fabric.init_module():
        module = LlamaForCausalLM(config)
    parameters = sum(p.numel() for p in module.parameters())
    model = fabric.setup_module(module)
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=1e-4))
    gen = torch.Generator().manual_seed(fabric.global_rank)
    times = []
    for _ in range(steps):
        ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        fabric.backward(loss)
        state = {
            "params": local_bytes(module.parameters()),
            "grads": local_bytes(p.grad for p in module.parameters() if p.grad is not None),
        }
        optimizer.step()
        optimizer.zero_grad(
            set_to_none=False
        )  # keep the gradient buffers: they are part of the state
        fabric.barrier()
        times.append(time.perf_counter() - start)
    state["optimizer"] = local_bytes(
        v
        for s in optimizer.optimizer.state.values()
        for v in s.values()
        if torch.is_tensor(v) and v.dim() > 0
    )
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    mine = {
        "rank": fabric.global_rank,
        "state": state,
        "peak_rss": peak_rss,
        "step_seconds": statistics.median(times[1:]),
    }
    from core.parallel.collectives import gather_objects

    everyone = gather_objects(mine)
    if fabric.global_rank == 0:
        print(
            "RESULT "
            + json.dumps({"strategy": strategy, "parameters": parameters, "ranks": everyone}),
            flush=True,
        )


def measure(strategy: str, steps: int, seq: int, batch: int) -> dict:
    """Run :func:`worker` in fresh processes for one strategy."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            __file__,
            "--worker",
            strategy,
            "--steps",
            str(steps),
            "--seq",
            str(seq),
            "--batch",
            str(batch),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
    )
    if done.returncode != 0:
        raise SystemExit(done.stdout[-2000:] + done.stderr[-4000:])
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=6, help="optimizer steps per strategy (the first is not timed)"
    )
    parser.add_argument("--seq", type=int, default=128, help="tokens per sample")
    parser.add_argument("--batch", type=int, default=2, help="samples per rank")
    parser.add_argument("--worker", choices=["ddp", "fsdp"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="append the section to this Markdown file")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.seq, args.batch)
        return
    results = {s: measure(s, args.steps, args.seq, args.batch) for s in ("ddp", "fsdp")}
    rows = []
    totals = {}
    for name, result in results.items():
        for r in result["ranks"]:
            total = sum(r["state"].values())
            totals.setdefault(name, []).append(total)
            rows.append(
                [
                    "DDP" if name == "ddp" else "FSDP2",
                    r["rank"],
                    f"{r['state']['params'] / MIB:.0f}",
                    f"{r['state']['grads'] / MIB:.0f}",
                    f"{r['state']['optimizer'] / MIB:.0f}",
                    f"{total / MIB:.0f}",
                    f"{r['peak_rss'] / MIB:.0f}",
                    f"{r['step_seconds']:.2f}",
                ]
            )
    ratio = max(totals["fsdp"]) / max(totals["ddp"])
    rss = max(r["peak_rss"] for r in results["fsdp"]["ranks"]) / max(
        r["peak_rss"] for r in results["ddp"]["ranks"]
    )
    step = statistics.median(
        r["step_seconds"] for r in results["fsdp"]["ranks"]
    ) / statistics.median(r["step_seconds"] for r in results["ddp"]["ranks"])
    body = (
        f"Llama with {results['ddp']['parameters'] / 1e6:.1f}M parameters (fp32, AdamW), batch "
        f"{args.batch} x {args.seq} tokens per rank, "
        f"2 CPU processes over gloo, {args.steps} steps (the first not timed). MiB per rank:\n\n"
        + table(
            [
                "strategy",
                "rank",
                "params",
                "grads",
                "optimizer",
                "state total",
                "peak RSS",
                "step s",
            ],
            rows,
        )
        + f"\n\nFSDP2 / DDP: per-rank state **{ratio:.3f}x** (target at most 0.55x), peak RSS "
        f"{rss:.2f}x, step time {step:.2f}x.\n"
    )
    emit(
        report(
            "FSDP2 against DDP: per-rank memory and step time (benchmark 9)",
            f"uv run python bench/fsdp_memory.py --steps {args.steps}",
            body,
        ),
        args.out,
    )


if __name__ == "__main__":
    main()
