"""``new-task``: a fourth task package from one command, in a copy of this workspace.

The copy holds the tracked and untracked (not ignored) files of this checkout and its own
``.venv`` (``uv sync``: hard links from the uv cache, seconds). Right after ``new-task``, with
nothing edited, the package trains, evaluates, infers, sweeps, passes its own tests, lints, and
builds a wheel that trains outside the workspace; bad names and places exit 2 with nothing written.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from core.testing.workspace import clean_env, copy_workspace

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("uv") is None, reason="uv is not on PATH"),
]

REPO = Path(__file__).resolve().parents[1]


def run(
    *args: str, cwd: Path, expect: int | None = 0, timeout: int = 900
) -> subprocess.CompletedProcess:
    done = subprocess.run(
        list(args), cwd=cwd, capture_output=True, text=True, env=clean_env(), timeout=timeout
    )
    if expect is not None:
        assert done.returncode == expect, f"{' '.join(args)}\n{done.stdout}\n{done.stderr}"
    return done


def snapshot(root: Path) -> dict[str, bytes]:
    """The bytes of the files ``new-task`` may touch."""
    files = [root / "pyproject.toml", root / "uv.lock"]
    listing = sorted(p.name for p in (root / "packages").iterdir())
    return {str(p): p.read_bytes() for p in files} | {"packages/": "\n".join(listing).encode()}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_workspace(REPO, tmp_path_factory.mktemp("ws"))


@pytest.fixture(scope="module")
def intent(workspace: Path) -> dict:
    """``new-task intent`` (classification) and ``train -c tiny`` right after it."""
    start = time.monotonic()
    made = run("uv", "run", "new-task", "intent", "--kind", "classification", cwd=workspace)
    trained = run("uv", "run", "--package", "intent", "train", "-c", "tiny", cwd=workspace)
    seconds = time.monotonic() - start
    run_dir = workspace / trained.stderr.split("completed: ")[-1].splitlines()[0]
    print(f"new-task -> finished train -c tiny: {seconds:.0f} s")
    return {"made": made, "run": run_dir, "seconds": seconds}


@pytest.mark.parametrize(
    "name, message",
    [
        ("summarization", "packages/summarization exists already"),
        ("My-Task", "cannot name a task package"),
        ("2fast", "cannot name a task package"),
        ("import", "cannot name a task package"),
        ("torch", "would shadow it"),
        ("core", "exists already"),
        ("datasets", "would shadow it"),
        ("json", "would shadow it"),
    ],
)
def test_a_name_that_cannot_be_a_new_package_exits_2_with_nothing_written(
    workspace: Path, name: str, message: str
) -> None:
    before = snapshot(workspace)
    done = run(".venv/bin/new-task", name, cwd=workspace, expect=2)
    assert message in done.stderr, done.stderr
    assert snapshot(workspace) == before


def test_outside_the_workspace_root_exits_2_with_nothing_written(workspace: Path) -> None:
    before = snapshot(workspace)
    done = run(str(workspace / ".venv/bin/new-task"), "demo", cwd=workspace / "packages", expect=2)
    assert f"run it from {workspace}" in done.stderr, done.stderr
    elsewhere = workspace.parent / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    done = run(str(workspace / ".venv/bin/new-task"), "demo", cwd=elsewhere, expect=2)
    assert "is not the root of a workspace" in done.stderr
    assert snapshot(workspace) == before and not any(elsewhere.iterdir())


def test_dry_run_lists_the_files_and_writes_nothing(workspace: Path) -> None:
    before = snapshot(workspace)
    done = run(".venv/bin/new-task", "demo", "--dry-run", cwd=workspace)
    listed = done.stdout.splitlines()
    assert "packages/demo/src/demo/task.py" in listed and "packages/demo/pyproject.toml" in listed
    assert snapshot(workspace) == before


def test_classification_trains_right_after_new_task_and_learns(intent: dict) -> None:
    records = [
        json.loads(line)
        for line in (intent["run"] / "metrics.jsonl").read_text().splitlines()
        if "val/accuracy" in line
    ]
    first, last = records[0], records[-1]
    assert first["step"] == 0 and last["step"] > 0
    assert last["val/loss"] < first["val/loss"] and last["val/accuracy"] > first["val/accuracy"]
    summary = json.loads((intent["run"] / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert (intent["run"] / "final" / "tokenizer.json").is_file()


def test_the_new_package_evaluates_and_infers_on_its_final_model(
    workspace: Path, intent: dict
) -> None:
    final = intent["run"] / "final"
    done = run("uv", "run", "--package", "intent", "evaluate", "--model", str(final), cwd=workspace)
    scores = json.loads(done.stdout.strip().splitlines()[-1])
    assert scores["accuracy"] > 0.5 and 0 <= scores["macro_f1"] <= 1
    rows = (intent["run"] / "eval" / "dev.jsonl").read_text().splitlines()
    assert set(json.loads(rows[0])) == {"text", "label", "prediction"}
    done = run(
        "uv",
        "run",
        "--package",
        "intent",
        "infer",
        "--model",
        str(final),
        "--prompt",
        "play some jazz please",
        cwd=workspace,
    )
    assert done.stdout.strip() == "music"


def test_the_new_package_sweeps_and_its_runs_compare(workspace: Path, intent: dict) -> None:
    root = workspace / "sweep-runs"
    run(
        "uv",
        "run",
        "--package",
        "intent",
        "sweep",
        "-c",
        "tiny",
        "optim.lr=1e-3,2e-3",
        "trainer.max_steps=4",
        "trainer.val_every_n_steps=4",
        "trainer.val_at_start=false",
        f"run.root={root}",
        cwd=workspace,
    )
    runs = sorted(p for p in root.rglob("summary.json"))
    assert len(runs) == 2
    done = run(
        "uv", "run", "runs", "compare", *(str(p.parent) for p in runs), "--no-png", cwd=workspace
    )
    assert "optim.lr" in done.stdout, done.stdout


def test_the_new_package_passes_its_own_tests_and_self_checks_and_lints(
    workspace: Path, intent: dict
) -> None:
    run(
        "uv",
        "run",
        "--package",
        "intent",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "packages/intent/tests",
        cwd=workspace,
    )
    run("uv", "run", "ruff", "check", "packages/intent", cwd=workspace)
    run("uv", "run", "ruff", "format", "--check", "packages/intent", cwd=workspace)


def test_the_new_package_is_small(intent: dict) -> None:
    source = intent["run"].parents[1] / "packages" / "intent" / "src"
    lines = sum(len(p.read_text().splitlines()) for p in source.rglob("*.py"))
    print(f"classification package: {lines} lines of Python in src")
    assert lines < 600


@pytest.mark.release
def test_the_new_package_builds_a_wheel_that_trains_outside_the_workspace(
    workspace: Path, intent: dict, tmp_path: Path
) -> None:
    dist = tmp_path / "dist"
    for package in ("core", "intent"):
        run(
            "uv",
            "build",
            "--package",
            package,
            "--no-sources",
            "--wheel",
            "--out-dir",
            str(dist),
            cwd=workspace,
        )
    constraints = tmp_path / "constraints.txt"
    run(
        "uv",
        "export",
        "--frozen",
        "--package",
        "intent",
        "--no-emit-workspace",
        "--no-hashes",
        "--no-header",
        "--no-dev",
        "-o",
        str(constraints),
        cwd=workspace,
    )
    venv = tmp_path / "venv"
    run("uv", "venv", "--quiet", str(venv), cwd=tmp_path)
    run(
        "uv",
        "pip",
        "install",
        "--quiet",
        "--python",
        str(venv / "bin" / "python"),
        "-c",
        str(constraints),
        *(str(w) for w in dist.glob("*.whl")),
        cwd=tmp_path,
    )
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    run(
        str(venv / "bin" / "train"),
        "-c",
        "tiny",
        "trainer.max_steps=2",
        "trainer.val_at_start=false",
        "trainer.val_every_n_steps=null",
        f"run.root={outside / 'runs'}",
        cwd=outside,
    )
    (summary,) = (outside / "runs").glob("*/summary.json")
    assert json.loads(summary.read_text())["status"] == "completed"
    wheel = next(dist.glob("intent-*.whl"))
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    for needed in (
        "intent/presets/tiny.yaml",
        "intent/assets/train.jsonl",
        "intent/slurm/train.sbatch",
    ):
        assert needed in names, f"{wheel.name} lacks {needed}"


# -- the other kinds: seq2seq, causal-lm and vision-language ----------------------------------

OTHER_KINDS = {"seq2seq": "rewriter", "causal-lm": "responder", "vision-language": "shape_qa"}
"""Kind -> the package name it is generated as here."""

FINAL_FILES = {
    "seq2seq": ["config.json", "tokenizer.json"],
    "causal-lm": ["adapter_config.json", "tokenizer.json", "base/config.json"],
    "vision-language": ["config.json", "tokenizer.json", "preprocessor_config.json"],
}
"""What ``final/`` holds per kind (causal-lm: the adapter, and the random tiny base beside it)."""

INFER = {
    "seq2seq": ("wake me up at 7 am tomorrow", {"alarm"}),
    "causal-lm": ("text anna that i am late", {"sending"}),
    "vision-language": ("what colour is the shape?", {"red", "green", "blue", "yellow"}),
}
"""A prompt per kind and the first words its trained tiny model may answer with (vision-language:
a question about a drawn blue square, :func:`infer_image`; the tiny model answers with a colour,
not necessarily the right one)."""

METRIC = {"seq2seq": "exact_match", "causal-lm": "perplexity", "vision-language": "accuracy"}
"""A validation metric per kind besides the loss."""


def infer_image(kind: str, folder: Path) -> list[str]:
    """The ``--image`` argument of ``infer`` for a kind that reads images: a drawn blue square
    (``core.task.shapes``, like the examples the tiny model trained on)."""
    if kind != "vision-language":
        return []
    import random

    from core.task.shapes import draw

    path = folder / "blue_square.png"
    draw("square", "blue", 56, random.Random(0)).save(path)
    return ["--image", str(path)]


@pytest.fixture(scope="module", params=sorted(OTHER_KINDS))
def generated(request: pytest.FixtureRequest, workspace: Path) -> dict:
    """``new-task NAME --kind KIND`` and ``train -c tiny`` right after it."""
    kind, name = request.param, OTHER_KINDS[request.param]
    start = time.monotonic()
    run("uv", "run", "new-task", name, "--kind", kind, cwd=workspace)
    trained = run("uv", "run", "--package", name, "train", "-c", "tiny", cwd=workspace)
    seconds = time.monotonic() - start
    # train names its run folder on stderr: "completed: runs/..."
    done = [line for line in trained.stderr.splitlines() if line.startswith("completed: ")]
    assert done, trained.stderr[-2000:]
    run_dir = workspace / done[-1].split(": ", 1)[1]
    print(f"{kind}: new-task -> finished train -c tiny: {seconds:.0f} s")
    return {"kind": kind, "name": name, "run": run_dir, "seconds": seconds}


def validation_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "val/loss" in r]


def test_other_kinds_train_right_after_new_task_and_learn(generated: dict) -> None:
    records = validation_records(generated["run"])
    first, last = records[0], records[-1]
    assert first["step"] == 0 and last["step"] > 0
    assert last["val/loss"] < 0.9 * first["val/loss"], records
    summary = json.loads((generated["run"] / "summary.json").read_text())
    assert summary["status"] == "completed"
    for name in FINAL_FILES[generated["kind"]]:
        assert (generated["run"] / "final" / name).is_file(), name


def test_other_kinds_evaluate_and_infer_on_their_final_model(
    workspace: Path, generated: dict
) -> None:
    name, final = generated["name"], generated["run"] / "final"
    done = run("uv", "run", "--package", name, "evaluate", "--model", str(final), cwd=workspace)
    scores = json.loads(done.stdout.strip().splitlines()[-1])
    # final/ is the model of the last step, validated on the same file: the same loss.
    assert scores["loss"] == pytest.approx(validation_records(generated["run"])[-1]["val/loss"])
    assert METRIC[generated["kind"]] in scores
    assert (generated["run"] / "eval" / "dev.jsonl").is_file()
    prompt, first_words = INFER[generated["kind"]]
    done = run(
        "uv",
        "run",
        "--package",
        name,
        "infer",
        "--model",
        str(final),
        "--prompt",
        prompt,
        *infer_image(generated["kind"], generated["run"]),
        cwd=workspace,
    )
    assert done.stdout.split()[0] in first_words, done.stdout


def test_other_kinds_pass_their_tests_lint_and_self_checks_and_are_small(
    workspace: Path, generated: dict
) -> None:
    name = generated["name"]
    tests = f"packages/{name}/tests"
    run(
        "uv",
        "run",
        "--package",
        name,
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        tests,
        cwd=workspace,
    )
    run("uv", "run", "ruff", "check", f"packages/{name}", cwd=workspace)
    run("uv", "run", "ruff", "format", "--check", f"packages/{name}", cwd=workspace)
    source = workspace / "packages" / name / "src"
    lines = sum(len(p.read_text().splitlines()) for p in source.rglob("*.py"))
    print(f"{generated['kind']} package: {lines} lines of Python in src")
    assert lines < 600
