"""The workspace as users drive it: `uv run --package X train` always runs X's trainer, in any
order of calls and after any sync; sibling version ranges admit the current core."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
TASKS = ["summarization", "lora_llm", "qwen_vl"]
HELP_MARKER = {"summarization": "DialogSum", "lora_llm": "LoRA / QLoRA", "qwen_vl": "Qwen2.5-VL"}
"""A phrase only that task's ``train --help`` prints: proof that the right trainer answered."""
UV = shutil.which("uv")


def pyproject(package: str) -> dict:
    return tomllib.loads((REPO / "packages" / package / "pyproject.toml").read_text())


def package_version(package: str) -> Version:
    init = (REPO / "packages" / package / "src" / package / "__init__.py").read_text()
    line = next(x for x in init.splitlines() if x.startswith("__version__"))
    return Version(line.split("=", 1)[1].strip().strip('"'))


@pytest.mark.parametrize("task", TASKS)
def test_task_depends_on_core_with_a_range_that_admits_the_current_core(task):
    core_version = package_version("core")
    requirements = [Requirement(r) for r in pyproject(task)["project"]["dependencies"]]
    core_reqs = [r for r in requirements if r.name == "core"]
    assert len(core_reqs) == 1, "exactly one requirement on core"
    spec = core_reqs[0].specifier
    assert any(s.operator in ("<", "<=", "~=", "==") for s in spec) and any(
        s.operator in (">", ">=", "~=", "==") for s in spec
    ), f"{task} needs a bounded range on core, got '{spec}'"
    assert spec.contains(core_version), (
        f"{task} requires core{spec}, which does not admit core {core_version}"
    )


def test_only_core_declares_the_shared_command_names():
    shared = {"train", "evaluate", "infer"}
    assert shared <= set(pyproject("core")["project"]["scripts"])
    for task in TASKS:
        scripts = set(pyproject(task)["project"].get("scripts", {}))
        assert not scripts & shared, (
            f"{task} must not declare {scripts & shared}: core's launcher dispatches them"
        )
        assert pyproject(task)["project"]["entry-points"]["core.tasks"] == {task: f"{task}.cli"}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CORE_TASK", "VIRTUAL_ENV")}
    env.update({"HF_HUB_OFFLINE": "1", **extra})
    return env


def _help(task: str, env: dict[str, str], command: str = "train") -> str:
    done = subprocess.run(
        [UV, "run", "--frozen", "--package", task, command, "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.slow
@pytest.mark.skipif(UV is None, reason="uv is not on PATH")
def test_uv_run_package_train_runs_that_tasks_trainer_in_any_order_and_after_any_sync(tmp_path):
    """A private venv (UV_PROJECT_ENVIRONMENT) so that exact syncs cannot disturb the test run."""
    env = _env(UV_PROJECT_ENVIRONMENT=str(tmp_path / "venv"))
    done = subprocess.run(
        [UV, "sync", "--frozen", "--all-packages"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    for task in [*TASKS, *reversed(TASKS)]:
        assert HELP_MARKER[task] in _help(task, env), task
    # An exact sync of one member uninstalls the others (and, with per-member scripts, their
    # shared bin/train); the remaining member must still work, and the others come back.
    done = subprocess.run(
        [UV, "sync", "--frozen", "--package", "lora_llm"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert HELP_MARKER["lora_llm"] in _help("lora_llm", env)
    assert HELP_MARKER["summarization"] in _help("summarization", env)
    assert "qwen" in _help("qwen_vl", env, "evaluate").lower()


@pytest.mark.slow  # three console-script processes (a torch import each)
def test_shared_command_needs_a_task_when_several_are_installed(tmp_path):
    train = Path(sys.executable).parent / "train"
    done = subprocess.run(
        [str(train), "--help"], cwd=tmp_path, capture_output=True, text=True, env=_env()
    )
    assert done.returncode == 2
    assert (
        "is shared by several task packages" in done.stderr
        and "uv run --package <task> train" in done.stderr
    )
    done = subprocess.run(
        [str(train), "--task", "nope", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert (
        done.returncode == 2
        and "Task 'nope' (from --task) is not an installed task package" in done.stderr
    )
    done = subprocess.run(
        [str(train), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=_env(CORE_TASK="lora_llm"),
    )
    assert done.returncode == 0 and "lora" in done.stdout.lower()
    done = subprocess.run(
        [str(train), "--help"],
        cwd=REPO / "packages" / "qwen_vl",
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert done.returncode == 0 and "qwen" in done.stdout.lower(), (
        "the member folder picks the task"
    )
    done = subprocess.run(
        [str(Path(sys.executable).parent / "evaluate"), "--task", "lora_llm"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=_env(),
    )
    # Every task has evaluate now (lora_llm's takes --quant): the usage error is lora_llm's own.
    assert done.returncode == 2 and "--quant" in done.stderr and "required: --model" in done.stderr
