"""Benchmark 11 — peak memory and time of the loss step, chunked against plain cross-entropy.

The loss step is the forward and backward of the language-model head and the loss: hidden
states ``(1, seq, hidden)`` -> head ``(vocab, hidden)`` -> summed token cross-entropy -> gradients
of the hidden states (and of the head's weight when it trains). Defaults: Qwen2.5's vocabulary
151,936, sequence 2,048, hidden 2,048, float32 on the CPU, every position labelled.

- ``plain``: ``core.task.base.token_loss_sum`` on the head's full ``(1, seq, vocab)`` logits, what
  the
  tasks did before ``loss.chunked``.
- ``chunked C``: ``core.nn.loss.linear_cross_entropy`` with ``C`` labelled tokens per chunk, what
  the
  tasks run with ``loss.chunked=true`` (``loss.chunk_tokens=C``).

**How memory is measured.** Each variant runs in a fresh process. After the weights and hidden
states exist the process reads its resident set size (``/proc/self/statm``); after the steps it
reads its peak resident set size (``getrusage``'s ``ru_maxrss``, the kernel's high-water mark).
The difference is the loss step's peak. On the CPU PyTorch takes large tensors from glibc with
``mmap`` and gives them back on free, so resident memory follows the live tensors; the figure
includes what the step leaves behind (the gradients) and every transient. Peak RSS was chosen over
``tracemalloc`` (which does not see PyTorch's allocator) and the profiler's memory events (which
need a timeline reconstruction).

    uv run python bench/loss_memory.py --steps 2 --reps 2
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

from common import emit, median_spread, report, table

MIB = 2**20


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(args: argparse.Namespace) -> dict:
    """One variant in this process: ``{"peak_mib", "seconds": [per step], "loss"}``."""
    import torch
    from torch import nn

    from core.nn.loss import linear_cross_entropy
    from core.task.base import token_loss_sum

    torch.manual_seed(0)
    head = nn.Linear(args.hidden, args.vocab, bias=False)
    head.weight.requires_grad_(args.head == "trained")
    hidden = (torch.randn(1, args.seq, args.hidden) * 0.5).requires_grad_(True)
    labels = torch.randint(0, args.vocab, (1, args.seq))
    before = rss_bytes()
    seconds, loss = [], None
    for _ in range(args.steps):
        hidden.grad = head.weight.grad = None
        start = time.perf_counter()
        if args.variant == "plain":
            loss = token_loss_sum(head(hidden), labels, shift=True).loss_sum
        else:
            targets = torch.cat([labels[:, 1:], torch.full((1, 1), -100)], dim=1)
            loss = linear_cross_entropy(head, head.forward, hidden, targets, args.chunk, "sum")
        loss.backward()
        seconds.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_mib": (peak - before) / MIB, "seconds": seconds, "loss": float(loss)}


def run_variant(variant: str, chunk: int, head: str, args: argparse.Namespace) -> dict:
    """Run one variant in a fresh process and return its :func:`measure` result."""
    command = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--chunk",
        str(chunk),
        "--head",
        head,
        "--steps",
        str(args.steps),
        "--vocab",
        str(args.vocab),
        "--seq",
        str(args.seq),
        "--hidden",
        str(args.hidden),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"  {variant} {chunk} {head}: {result['peak_mib']:.0f} MiB, "
        f"{[round(s, 2) for s in result['seconds']]} s",
        file=sys.stderr,
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--chunks", default="256,1024", help="chunk sizes to measure")
    parser.add_argument("--heads", default="frozen,trained", help="frozen (LoRA), trained (full)")
    parser.add_argument("--steps", type=int, default=2, help="steps per process (first excluded)")
    parser.add_argument("--reps", type=int, default=2, help="processes per variant, interleaved")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=1024, help=argparse.SUPPRESS)
    parser.add_argument("--head", default="frozen", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.variant = args.child
        print(json.dumps(measure(args)))
        return
    chunks = [int(c) for c in args.chunks.split(",")]
    heads = args.heads.split(",")
    variants = [(h, "plain", 0) for h in heads] + [(h, "chunked", c) for h in heads for c in chunks]
    results: dict[tuple, list[dict]] = {v: [] for v in variants}
    for _ in range(args.reps):
        for head, variant, chunk in variants:
            results[(head, variant, chunk)].append(run_variant(variant, chunk, head, args))
    rows = []
    for head, variant, chunk in variants:
        runs = results[(head, variant, chunk)]
        plain = results[(head, "plain", 0)]
        peak = statistics.median(r["peak_mib"] for r in runs)
        plain_peak = statistics.median(r["peak_mib"] for r in plain)
        # The first step of a process pays one-time costs (first-touch of the weights' pages).
        times = [s for r in runs for s in (r["seconds"][1:] or r["seconds"])]
        plain_times = [s for r in plain for s in (r["seconds"][1:] or r["seconds"])]
        med, lo, hi = median_spread(times)
        rows.append(
            [
                "frozen (LoRA)" if head == "frozen" else "trained (full fine-tuning)",
                "plain" if variant == "plain" else f"chunked, {chunk} tokens",
                f"{peak:,.0f}",
                f"{peak / plain_peak:.2f}",
                f"{med:.2f} ({lo:.2f} – {hi:.2f})",
                f"{med / statistics.median(plain_times):.2f}",
                f"{statistics.median(r['loss'] for r in runs):.4f}",
            ]
        )
    body = (
        f"Vocabulary {args.vocab:,}, sequence {args.seq:,}, hidden {args.hidden:,}, batch 1, "
        f"float32 on the CPU, all positions labelled; peak resident memory of the loss step "
        f"above the weights and hidden states (fresh process per run, median of {args.reps}); "
        f"seconds per forward + backward, median over runs (first step of each process "
        f"excluded) with min – max.\n\n"
        + table(
            [
                "head",
                "loss",
                "peak MiB",
                "x plain",
                "seconds per step",
                "x plain",
                "loss sum",
            ],
            rows,
        )
    )
    command = "uv run python bench/loss_memory.py " + " ".join(sys.argv[1:])
    emit(report("Chunked cross-entropy: memory and time of the loss step", command, body), args.out)


if __name__ == "__main__":
    main()
