"""Fixtures of the lora_llm tests: the shipped tiny tokenizer, tiny-preset configs and runs, all
offline."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from core.config.loader import load_config
from core.engine.trainer import FitResult, Trainer
from lora_llm.cli import PRESETS
from lora_llm.config import LoraLLMConfig, ModelConfig
from lora_llm.model import TINY, load_tokenizer
from lora_llm.task import LoraLLMTask

FAST = ["logger.progress_bar=false", "logger.plot=false", "trainer.accelerator=cpu"]
"""Overrides every in-process run gets: no progress bar or plot, CPU."""


@pytest.fixture(scope="session", autouse=True)
def offline() -> Iterator[None]:
    """Nothing in these tests may reach the Hugging Face Hub (tiny models only, built from
    configs)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="session")
def tokenizer():
    """The tokenizer shipped for the ``tiny`` preset (byte-level BPE, bos/eos/pad/unk)."""
    return load_tokenizer(ModelConfig(name=TINY))


def tiny_config(root: Path, *overrides: str) -> LoraLLMConfig:
    """The ``tiny`` preset with ``run.root=root`` and the given overrides."""
    return load_config(LoraLLMConfig, "tiny", [f"run.root={root}", *FAST, *overrides], PRESETS)


def fit(root: Path, *overrides: str) -> FitResult:
    """Train the tiny preset in this process (QLoRA on the CPU through the real loading code)."""
    cfg = tiny_config(root, *overrides)
    return Trainer(cfg, LoraLLMTask(cfg), argv=["pytest", *overrides]).fit()


@pytest.fixture
def make_config() -> Callable[..., LoraLLMConfig]:
    """``make_config(root, *overrides)``: the tiny preset's config (see :func:`tiny_config`)."""
    return tiny_config


@pytest.fixture
def run_tiny(tmp_path: Path) -> Callable[..., FitResult]:
    """``run_tiny(*overrides, root="runs")``: train the tiny preset into ``tmp_path/root``."""

    def run(*overrides: str, root: str = "runs") -> FitResult:
        """Fit the tiny preset with ``overrides`` into ``tmp_path/root``."""
        return fit(tmp_path / root, *overrides)

    return run


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> FitResult:
    """One short QLoRA run of the tiny preset, shared by the infer / merge / bad-adapter tests."""
    root = tmp_path_factory.mktemp("trained")
    return fit(
        root,
        "trainer.max_steps=8",
        "trainer.max_epochs=null",
        "data.max_samples=96",
        "optim.lr=5e-3",
        "trainer.log_every_n_steps=2",
        "trainer.val_every_n_steps=4",
    )
