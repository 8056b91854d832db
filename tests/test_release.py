"""Independent release: every package builds a wheel and an sdist with `--no-sources`, the wheel
ships what the package needs at run time, and a task's wheel plus core's wheel install into a
fresh virtual environment outside the workspace and train the `tiny` preset there."""

from __future__ import annotations

import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.release,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("uv") is None, reason="uv is not on PATH"),
]

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["core", "summarization", "lora_llm", "qwen_vl"]
TASKS = PACKAGES[1:]
# What each wheel must carry besides code (glob patterns inside the wheel).
WHEEL_DATA = {
    "core": ["core/config/schema.py", "core/slurm/env.sh", "core/slurm/launch.sh"],
    "summarization": [
        "summarization/presets/tiny.yaml",
        "summarization/slurm/train.sbatch",
        "summarization/assets/*",
    ],
    "lora_llm": ["lora_llm/presets/tiny.yaml", "lora_llm/slurm/train.sbatch", "lora_llm/assets/*"],
    "qwen_vl": ["qwen_vl/presets/tiny.yaml", "qwen_vl/slurm/train.sbatch", "qwen_vl/assets/*"],
}


def _uv(
    *args: str, cwd: Path = REPO, env: dict | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    done = subprocess.run(
        ["uv", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env or os.environ.copy(),
        timeout=timeout,
    )
    assert done.returncode == 0, f"uv {' '.join(args)}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    for package in PACKAGES:
        _uv("build", "--package", package, "--no-sources", "--out-dir", str(out))
    return out


@pytest.mark.parametrize("package", PACKAGES)
def test_wheel_and_sdist_ship_the_runtime_files(dist, package):
    wheels = list(dist.glob(f"{package}-*.whl"))
    sdists = list(dist.glob(f"{package}-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list(dist.iterdir())
    names = zipfile.ZipFile(wheels[0]).namelist()
    import fnmatch

    for pattern in WHEEL_DATA[package]:
        assert fnmatch.filter(names, pattern), f"{wheels[0].name} lacks {pattern}"
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheels[0]).read(metadata).decode()
    if package != "core":
        requires = [line for line in text.splitlines() if line.startswith("Requires-Dist: core")]
        assert requires and all("<0.2" in r and ">=0.1" in r for r in requires), requires


@pytest.mark.parametrize("task", TASKS)
def test_task_wheel_installs_and_trains_outside_the_workspace(dist, tmp_path, task):
    # The locked versions of the task's dependencies: reuses the uv cache, no re-resolution.
    constraints = tmp_path / "constraints.txt"
    _uv(
        "export",
        "--frozen",
        "--package",
        task,
        "--no-emit-workspace",
        "--no-hashes",
        "--no-header",
        "--no-dev",
        "-o",
        str(constraints),
    )
    venv = tmp_path / "venv"
    _uv("venv", "--quiet", str(venv), cwd=tmp_path)
    python = venv / "bin" / "python"
    wheels = [str(next(dist.glob("core-*.whl"))), str(next(dist.glob(f"{task}-*.whl")))]
    _uv(
        "pip",
        "install",
        "--quiet",
        "--python",
        str(python),
        "-c",
        str(constraints),
        *wheels,
        cwd=tmp_path,
    )

    env = {
        k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CORE_TASK", "PYTHONPATH")
    }
    env.update({"HF_HUB_OFFLINE": "1", "PATH": f"{venv / 'bin'}:{env['PATH']}"})
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    help_run = subprocess.run(
        [str(venv / "bin" / "train"), "--help"],
        cwd=outside,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert help_run.returncode == 0, help_run.stderr
    assert "tiny" in help_run.stdout, "the presets ship in the wheel"
    if task == "qwen_vl":  # its tiny preset draws the built-in counting data into this cache
        env["QWEN_VL_CACHE"] = str(tmp_path / "qwen-vl-cache")
    train = subprocess.run(
        [
            str(venv / "bin" / "train"),
            "-c",
            "tiny",
            "trainer.max_steps=2",
            "trainer.val_every_n_steps=null",
            "trainer.accelerator=cpu",
            "logger.progress_bar=false",
            f"run.root={outside / 'runs'}",
        ],
        cwd=outside,
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-4000:]
    runs = [p for p in (outside / "runs").iterdir() if not p.name.startswith(".")]
    assert len(runs) == 1 and (runs[0] / "final").is_dir() and (runs[0] / "summary.json").is_file()
