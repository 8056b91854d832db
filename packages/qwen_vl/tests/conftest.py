"""Shared fixtures of the qwen_vl tests: the shipped tiny processor, drawn counting data, a tiny
run."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from core.config.loader import load_config
from qwen_vl.config import QwenVLConfig
from qwen_vl.synth import SynthSettings, write_dataset

# Fast tiny settings every in-process run shares (CPU, no progress bar, few steps).
TINY_FAST = [
    "trainer.accelerator=cpu",
    "logger.progress_bar=false",
    "logger.plot=false",
    "trainer.batch_size=4",
    "trainer.eval_batch_size=8",
    "trainer.log_every_n_steps=1",
    "generation.max_new_tokens=3",
]


@pytest.fixture(scope="session", autouse=True)
def drawn_data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in counting data (``builtin:counting``) is drawn into a temporary cache, not into
    the user's ``~/.cache``; subprocesses inherit the variable."""
    import os

    folder = tmp_path_factory.mktemp("qwen-vl-cache")
    old = os.environ.get("QWEN_VL_CACHE")
    os.environ["QWEN_VL_CACHE"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("QWEN_VL_CACHE", None)
    else:
        os.environ["QWEN_VL_CACHE"] = old


@pytest.fixture(scope="session")
def processor() -> Any:
    """The tiny processor shipped in the package, loaded with ``AutoProcessor``."""
    from transformers import AutoProcessor

    from qwen_vl.model import TINY_PROCESSOR_DIR

    return AutoProcessor.from_pretrained(TINY_PROCESSOR_DIR)


@pytest.fixture
def encoder(processor: Any) -> Any:
    """An encoder with the tiny preset's pixel limits (3136..12544: 4..16 vision tokens)."""
    from qwen_vl.data import Encoder

    return Encoder(processor, min_pixels=3136, max_pixels=12544)


@pytest.fixture(scope="session")
def counting_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small drawn counting set with many text-only and two-turn records (``train.jsonl``,
    ``dev.jsonl``)."""
    out = tmp_path_factory.mktemp("counting")
    write_dataset(
        out, SynthSettings(n_train=48, n_dev=12, seed=5, text_share=0.25, multi_turn_share=0.25)
    )
    return out


@pytest.fixture
def write_records(tmp_path: Path) -> Callable[..., Path]:
    """``write_records(rows, name="d.jsonl")``: a JSONL file in ``tmp_path`` with a red ``a.png``
    (300x200) beside it."""
    Image.new("RGB", (300, 200), (200, 30, 30)).save(tmp_path / "a.png")

    def write(rows: list[Any], name: str = "d.jsonl") -> Path:
        path = tmp_path / name
        path.write_text(
            "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
            encoding="utf-8",
        )
        return path

    return write


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., QwenVLConfig]:
    """``tiny_config(*overrides)``: the tiny preset with the fast test settings and
    ``overrides``."""
    from qwen_vl.cli import PRESETS_DIR

    def make(*overrides: str) -> QwenVLConfig:
        return load_config(QwenVLConfig, "tiny", [*TINY_FAST, *overrides], PRESETS_DIR)

    return make
