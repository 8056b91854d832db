"""Shared fixtures of the engine tests: run the toy task in this process."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from core.config.loader import load_config
from core.engine.trainer import FitResult, Trainer
from core.testing.toy import ToyConfig, ToyTask


@pytest.fixture
def run_toy(tmp_path: Path) -> Callable[..., FitResult]:
    """``run_toy(*overrides, root="name")``: train the toy task in-process into
    ``tmp_path/root``."""

    def run(*overrides: str, root: str = "runs") -> FitResult:
        cfg = load_config(
            ToyConfig,
            overrides=[
                f"run.root={tmp_path / root}",
                "logger.progress_bar=false",
                "trainer.accelerator=cpu",
                *overrides,
            ],
        )
        return Trainer(cfg, ToyTask(cfg), argv=["pytest", *overrides]).fit()

    return run
