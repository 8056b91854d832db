"""Seeding, deterministic algorithms and RNG state for exact resume.

Self-check: ``python -m core.parallel.seeding``.
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.seed import seed_everything


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device) with ``seed``.

    Data order does not depend on these generators (the batch sampler has its own), and data
    loader workers are seeded from the loader's own generator
    (:func:`core.engine.sampler.build_dataloader`).
    """
    seed_everything(seed, workers=False, verbose=False)


def set_deterministic(mode: bool | str) -> None:
    """Turn deterministic algorithms on (``True``), on with warnings only (``"warn"``), or leave
    them.

    Must run before CUDA is initialised: cuBLAS reads ``CUBLAS_WORKSPACE_CONFIG`` once.

    Args:
        mode: ``trainer.deterministic``.
    """
    if not mode:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=(mode == "warn"))
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def rng_state() -> dict[str, Any]:
    """This process's RNG states (Python, NumPy, torch CPU, torch CUDA) as picklable objects."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states saved by :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


if __name__ == "__main__":  # self-check: python -m core.parallel.seeding
    seed_all(7)
    saved = rng_state()
    first = (random.random(), float(np.random.rand()), torch.rand(2).tolist())
    set_rng_state(saved)
    again = (random.random(), float(np.random.rand()), torch.rand(2).tolist())
    assert first == again, (first, again)
    print("RNG states round-trip:", first[0])
    print("core.parallel.seeding: ok")
