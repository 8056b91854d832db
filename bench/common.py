"""Shared helpers of the benchmarks: repeated timing with median and spread, machine facts,
Markdown tables."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def machine() -> str:
    """One line: CPU, cores, GPU (if any), date, versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
        cpu = model
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    versions = ", ".join(
        f"{p} {version(p)}" for p in ("torch", "lightning", "transformers", "peft") if _has(p)
    )
    return (
        f"{cpu}, {os.cpu_count()} cores, {gpu}; {datetime.now():%Y-%m-%d}; Python "
        f"{sys.version.split()[0]}, {versions}"
    )


def _has(package: str) -> bool:
    try:
        version(package)
        return True
    except Exception:
        return False


def git_commit() -> str:
    """Short commit of the checkout (with + when dirty)."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return sha + ("+" if dirty else "")
    except OSError:
        return "?"


def repeat(variants: dict[str, Callable[[], float]], repetitions: int) -> dict[str, list[float]]:
    """Run each variant ``repetitions`` times, interleaved (a, b, c, a, b, c, ...) so slow phases
    of a noisy machine hit every variant alike.

    Args:
        variants: ``{name: function returning one measurement}``.

    Returns:
        ``{name: [measurements]}``.
    """
    out: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(repetitions):
        for name, run in variants.items():
            value = run()
            out[name].append(value)
            print(f"  rep {rep + 1}/{repetitions} {name}: {value:.4g}", file=sys.stderr, flush=True)
    return out


def median_spread(values: Sequence[float]) -> tuple[float, float, float]:
    """``(median, min, max)``."""
    return statistics.median(values), min(values), max(values)


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def train_run(cfg, task) -> tuple[dict, list[dict]]:
    """Train ``task`` with core's Trainer under ``cfg``.

    Returns:
        ``(summary, records)``: the run's ``summary.json`` and the rows of its ``metrics.jsonl``.
    """
    import json

    from core.engine.trainer import Trainer

    run_dir = Trainer(cfg, task, argv=["bench"]).fit().run_dir
    records = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    return json.loads((run_dir / "summary.json").read_text()), records


def cpu_timed_trainer() -> type:
    """core's Trainer, adding up the CPU seconds of its training loop in ``cpu_seconds`` (model
    loading, tokenisation and the final save outside it): on a shared machine the steadier
    figure than wall time."""
    import time

    from core.engine.trainer import Trainer

    class CpuTimedTrainer(Trainer):
        cpu_seconds = 0.0

        def train_loop(self, stop):
            start = time.process_time()
            try:
                return super().train_loop(stop)
            finally:
                self.cpu_seconds += time.process_time() - start

    return CpuTimedTrainer


def report(title: str, command: str, body: str) -> str:
    """A section for docs/benchmarks.md."""
    return (
        f"## {title}\n\nMachine: {machine()}; commit {git_commit()}.\nCommand: "
        f"`{command}`\n\n{body}\n"
    )


def emit(text: str, out: str | Path | None) -> None:
    """Print a section and, with ``--out FILE``, append it to that file."""
    print(text)
    if out:
        with open(out, "a", encoding="utf-8") as handle:
            handle.write("\n" + text)


def mean_std(values: Sequence[float], digits: int) -> str:
    """``mean ± std`` over seeds (just the mean for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def peer_rows(
    runs: dict[str, list[dict]], reference: str, seconds: str = "train_seconds"
) -> list[list[str]]:
    """Rows ``[run, seeds, held-out loss, train s, loss vs ref, speed vs ref, steps]`` of a
    study whose runs (per variant, one dict per seed with ``val_loss``, ``seconds`` (wall:
    ``train_seconds``; CPU: ``cpu_seconds``), ``steps``) are compared with the ``reference``
    variant's means."""
    ref = runs.get(reference)
    rows = []
    for variant, results in runs.items():
        loss = [r["val_loss"] for r in results]
        times = [r[seconds] for r in results]
        row = [variant, str(len(results)), mean_std(loss, 4), mean_std(times, 1)]
        if ref:
            ref_loss = statistics.fmean(r["val_loss"] for r in ref)
            ref_time = statistics.fmean(r[seconds] for r in ref)
            row += [
                f"{100 * (statistics.fmean(loss) / ref_loss - 1):+.2f}%",
                f"{ref_time / statistics.fmean(times):.2f}x",
            ]
        else:
            row += ["", ""]
        rows.append(row + [str(results[0]["steps"])])
    return rows


PEER_HEADER = [
    "run",
    "seeds",
    "held-out loss",
    "train wall s",
    "loss vs ref",
    "speed vs ref",
    "steps",
]
PEER_HEADER_CPU = [*PEER_HEADER[:3], "train CPU s", *PEER_HEADER[4:]]


def cached_runs(
    results: Path,
    prefix: str,
    variants: Sequence[str],
    seeds: int,
    train: Callable[[str, int], dict],
    only_seeds: Sequence[int] | None = None,
    report_only: bool = False,
) -> dict[str, list[dict]]:
    """Every (variant, seed) result of a study, trained by ``train(variant, seed)`` unless cached
    as ``results/<prefix>-<variant>-seed<seed>.json``; seeds outermost, so a slow phase of the
    machine hits every variant alike. ``only_seeds`` / ``report_only`` train fewer (the others
    are read from the cache if there)."""
    import json

    runs: dict[str, list[dict]] = {}
    for seed in range(seeds):
        for variant in variants:
            path = results / f"{prefix}-{variant}-seed{seed}.json"
            if not path.is_file():
                if report_only or (only_seeds and seed not in only_seeds):
                    continue
                path.write_text(json.dumps(train(variant, seed)))
            out = json.loads(path.read_text())
            print(f"  {prefix} {variant} seed {seed}: {out}", flush=True)
            runs.setdefault(variant, []).append(out)
    return runs
