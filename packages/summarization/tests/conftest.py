"""Shared fixtures of the summarization tests: one short ``tiny`` training run for the whole
session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

# Short, quiet, CPU-only settings for runs of the tiny preset inside tests.
QUICK = [
    "trainer.accelerator=cpu",
    "logger.progress_bar=false",
    "logger.plot=false",
    "trainer.log_every_n_steps=5",
    "data.max_train_samples=96",
    "data.max_val_samples=12",
    "generation.max_new_tokens=24",
]


def _only_run(root: Path) -> Path:
    """The single run folder under ``root``."""
    runs = [p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tokenised-data cache for the whole session (keeps ~/.cache clean)."""
    return tmp_path_factory.mktemp("token-cache")


@pytest.fixture
def train_cli(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture
) -> Callable[..., tuple[int, str, Path]]:
    """``train_cli(*args)``: run the real ``train`` command in-process into ``tmp_path/runs``.

    Returns:
        ``(exit code, stderr, run root)``.
    """
    from summarization.cli import train

    def run(*args: str) -> tuple[int, str, Path]:
        """Run ``train`` with ``args`` plus the quick test settings."""
        root = tmp_path / "runs"
        preset = list(args[:2]) if args[:1] == ("-c",) else []
        # the test's own overrides come after the quick settings, so they win
        code = train(
            [
                *preset,
                *QUICK,
                *args[len(preset) :],
                f"run.root={root}",
                f"data.cache_dir={cache_dir}",
            ]
        )
        return code, capsys.readouterr().err, root

    return run


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """A finished run of the ``tiny`` preset (30 steps, validation every 15) on the shipped
    sample."""
    from summarization.cli import train

    root = tmp_path_factory.mktemp("tiny-runs")
    code = train(
        [
            "-c",
            "tiny",
            f"run.root={root}",
            f"data.cache_dir={cache_dir}",
            *QUICK,
            "trainer.max_steps=30",
            "trainer.val_every_n_steps=15",
            "trainer.batch_size=8",
        ]
    )
    assert code == 0
    return _only_run(root)
