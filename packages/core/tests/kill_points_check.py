"""Run by ``test_faults_kill.py``: trains the toy task and SIGKILLs itself at a chosen point of
writing the run's files (what a node failure, the OOM killer or ``kill -9`` does).

    python kill_points_check.py ROOT POINT [POINT ...] -- [key=value ...]

Imports torch once, then forks one child per point (and first one uninterrupted reference run,
``none``), each training into ``ROOT/<point>`` with the same settings. A child that reaches its
point writes what it was writing only in part, flushes it to disk and kills itself with SIGKILL;
one that trains to the end without reaching its point exits 3. Prints one line
``RESULT {point: {"pid", "signal", "exit"}}`` (the child's pid, the signal that ended it or
None, its exit code or None).

Points (checkpoints every 2 steps, the kill at the second one, step 4, unless said otherwise):
    state_half    half of the checkpoint's ``state`` file written
    before_meta   ``state`` complete, ``meta.json`` (the manifest, written last) not begun
    final_half    the first files of the ``final/`` export and half of ``model.safetensors``
    summary_half  half of the ``completed`` summary written (to where the trainer writes it)
    prune_mid     step 2's folder partly deleted by the prune at step 4 (keep_last=1)

The patches find each write by what is written rather than by its temporary name, so that a
writer that writes in place is caught too (and fails the test).
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import shutil
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

import core.parallel.checkpoint as checkpoint
from core.testing.toy import train

KILL_STEP = 4
POINTS = ("state_half", "before_meta", "final_half", "summary_half", "prune_mid")
NOT_REACHED = 3
STATUS_DONE = json.dumps({"status": "completed"})[1:-1]  # as in the summary: "status": "completed"


def die() -> None:
    """SIGKILL this process: no handler, no ``finally``, no flush of anything not yet flushed."""
    os.kill(os.getpid(), signal.SIGKILL)


def write_part(path: Path, data: bytes) -> None:
    """Write the first half of ``data`` to ``path``, on disk, then die."""
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
        handle.flush()
        os.fsync(handle.fileno())
    die()


def arm(point: str) -> None:
    """Patch the writer of ``point`` so that this process dies there."""
    doomed_tmp = f".tmp-step-{KILL_STEP:07d}"
    if point == "state_half":
        write_torch_file = checkpoint.write_torch_file

        def write(obj: Any, path: Path) -> tuple[int, str]:
            if f"step-{KILL_STEP:07d}" in Path(path).parent.name:
                buffer = io.BytesIO()
                torch.save(obj, buffer)
                write_part(Path(path), buffer.getvalue())
            return write_torch_file(obj, path)

        checkpoint.write_torch_file = write
    elif point in ("before_meta", "summary_half"):
        write_text = pathlib.Path.write_text

        def text(self: Path, data: str, *args: Any, **kwargs: Any) -> int:
            if point == "before_meta" and (self.parent.name, self.name) == (
                doomed_tmp,
                "meta.json",
            ):
                assert (self.parent / "state").is_file()
                die()
            summary = self.name in ("summary.json.tmp", "summary.json")  # wherever it goes
            if point == "summary_half" and summary and STATUS_DONE in data:
                write_part(self, data.encode())
            return write_text(self, data, *args, **kwargs)

        pathlib.Path.write_text = text
    elif point == "final_half":
        import safetensors.torch
        import transformers.modeling_utils

        def save_file(tensors: dict[str, torch.Tensor], filename: str, metadata: Any = None):
            path = Path(filename)  # the only save_pretrained of a run: its final export
            assert any(path.parent.iterdir()), f"{path} is not the export's second file"
            write_part(path, safetensors.torch.save(tensors, metadata=metadata))

        transformers.modeling_utils.safe_save_file = save_file
    elif point == "prune_mid":
        rmtree = shutil.rmtree

        def remove(path: Any, *args: Any, **kwargs: Any) -> None:
            path = Path(path)
            if path.parent.name == "checkpoints" and path.name.endswith("step-0000002"):
                (path / "state").unlink()  # the first file is gone, meta.json not yet
                die()
            rmtree(path, *args, **kwargs)

        shutil.rmtree = remove
    elif point != "none":
        raise SystemExit(f"unknown kill point {point!r}; known: {', '.join(POINTS)}")


def child(root: Path, point: str, overrides: list[str]) -> int:
    arm(point)
    code = train([f"run.root={root / point}", *overrides])
    return code if point == "none" else NOT_REACHED


def main() -> None:
    args = sys.argv[1:]
    split = args.index("--") if "--" in args else len(args)
    root, points, overrides = Path(args[0]), args[1:split], args[split + 1 :]
    results: dict[str, dict[str, Any]] = {}
    for point in ["none", *points]:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            try:
                code = child(root, point, overrides)
            except BaseException:
                traceback.print_exc()
                code = 4
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        results[point] = {
            "pid": pid,
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        }
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
