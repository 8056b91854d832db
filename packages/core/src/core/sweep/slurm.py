"""Submitting the points of a sweep as one SLURM job array of the task's ``train.sbatch``.

Self-check: ``python -m core.sweep`` (runs this module's doctests).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from core.sweep.axes import Point
from core.sweep.folder import Sweep
from core.sweep.local import _say


def array_ranges(indices: Sequence[int]) -> str:
    """Compress array task ids for ``sbatch --array``.

    >>> array_ranges([0, 1, 2, 3])
    '0-3'
    >>> array_ranges([1, 3, 4, 5, 9])
    '1,3-5,9'
    """
    parts = []
    for _, run in itertools.groupby(enumerate(sorted(indices)), key=lambda p: p[1] - p[0]):
        ids = [i for _, i in run]
        parts.append(str(ids[0]) if len(ids) == 1 else f"{ids[0]}-{ids[-1]}")
    return ",".join(parts)


def sbatch_command(
    sweep: Sweep, todo: Sequence[Point], script: Path, sbatch_args: Sequence[str], parallel: int
) -> list[str]:
    """The ``sbatch`` command of a sweep's job array.

    Args:
        sweep: the sweep.
        todo: the points to run (their indices become the array task ids).
        script: the task's ``train.sbatch``.
        sbatch_args: the user's sbatch options (they win over the script's ``#SBATCH`` lines).
        parallel: at most this many array tasks at once (``%M``).

    Returns:
        The argument list; the point-specific arguments are read by ``launch.sh`` from
        ``<sweep>/slurm/<array task id>.args``.
    """
    cmd = ["sbatch", "--parsable", f"--array={array_ranges([p.index for p in todo])}%{parallel}"]
    if not any(a in ("-o", "--output") or a.startswith("--output=") for a in sbatch_args):
        cmd.append("--output=logs/%x_%A_%a.out")  # one log per array task: <job>_<array>_<index>
    return [*cmd, *sbatch_args, str(script), *sweep.spec.base_args]


def live_array_jobs(sweep: Sweep) -> list[str]:
    """Array jobs submitted for this sweep that SLURM still lists (queued or running)."""
    record = sweep.path / "slurm" / "submissions.jsonl"
    if not record.is_file() or shutil.which("squeue") is None:
        return []
    ids = {json.loads(line)["job_id"] for line in record.read_text().splitlines() if line.strip()}
    try:
        done = subprocess.run(
            ["squeue", "-h", "-o", "%F"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted(ids & set(done.stdout.split()))


def write_array_args(sweep: Sweep) -> Path:
    """Write ``<sweep>/slurm/<index>.args``, one ``train`` argument per line, for every point."""
    folder = sweep.path / "slurm"
    folder.mkdir(exist_ok=True)
    for point in sweep.points:
        text = "".join(arg + "\n" for arg in sweep.point_args(point))
        (folder / f"{point.index}.args").write_text(text, encoding="utf-8")
    return folder


def submit_array(
    sweep: Sweep, todo: Sequence[Point], script: Path, sbatch_args: Sequence[str], parallel: int
) -> int:
    """Submit the job array and record it in ``<sweep>/slurm/submissions.jsonl``.

    Returns:
        0 when sbatch accepted it, else sbatch's exit code.
    """
    args_dir = write_array_args(sweep)
    cmd = sbatch_command(sweep, todo, script, sbatch_args, parallel)
    if "--output=logs/%x_%A_%a.out" in cmd:
        # SLURM does not create the log's folder (a job whose log cannot be opened just fails);
        # it is relative to the job's working folder: --chdir / -D, else here.
        workdir = next((a.split("=", 1)[1] for a in sbatch_args if a.startswith("--chdir=")), None)
        if "-D" in sbatch_args[:-1]:
            workdir = sbatch_args[list(sbatch_args).index("-D") + 1]
        (Path(workdir or ".") / "logs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SWEEP_ARGS_DIR": str(args_dir.resolve())}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    if done.returncode != 0:
        print(done.stderr, end="", file=sys.stderr)
        _say(f"sbatch failed (exit code {done.returncode}); nothing was submitted")
        return done.returncode or 1
    job = done.stdout.strip().split(";")[0]
    with open(args_dir / "submissions.jsonl", "a", encoding="utf-8") as handle:
        record = {"job_id": job, "array": cmd[2], "time": time.time(), "command": cmd}
        handle.write(json.dumps(record) + "\n")
    _say(
        f"submitted job array {job} ({len(todo)} points, {cmd[2]}); logs in logs/ (one per array "
        f"task); watch with: squeue -j {job}; runs list {sweep.path}"
    )
    print(job)
    return 0


def find_sbatch_script(task_module: str | None, task: str) -> Path | None:
    """The task's ``train.sbatch``: ``packages/<task>/slurm/`` next to the task's sources in
    the workspace, else under the current folder."""
    candidates = []
    if task_module:
        module = sys.modules.get(task_module)
        if module is not None and getattr(module, "__file__", None):
            candidates.append(Path(module.__file__).resolve().parents[2] / "slurm" / "train.sbatch")
    candidates.append(Path.cwd() / "packages" / task / "slurm" / "train.sbatch")
    return next((c for c in candidates if c.is_file()), None)
