"""``runs list`` and ``runs compare`` on toy runs trained in this process: the differing keys,
the best metric against ``summary.json``, the formats, the seed groups, and the PNG."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

import pytest
from PIL import Image

from core.report import PNG_MARK, main

SHORT = ("trainer.max_steps=4", "trainer.val_every_n_steps=2", "logger.plot=false")


def runs(capsys, *args: str) -> tuple[int, str, str]:
    """``runs ARGS`` in this process: ``(exit code, stdout, stderr)``."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def best(run: Path) -> float:
    """The best monitored value that the run's ``summary.json`` records."""
    return json.loads((run / "summary.json").read_text())["best"]["value"]


@pytest.fixture
def two_runs(run_toy) -> tuple[Path, Path]:
    """Two toy runs that differ in exactly two keys: optim.lr and trainer.seed."""
    a = run_toy(*SHORT, "optim.lr=1e-3").run_dir
    b = run_toy(*SHORT, "optim.lr=3e-4", "trainer.seed=7").run_dir
    return a, b


@pytest.mark.trains
def test_compare_two_runs_names_exactly_the_keys_they_differ_in_and_draws_them(two_runs, capsys):
    a, b = two_runs
    code, out, _ = runs(capsys, "compare", str(a), str(b), "--format", "json")
    assert code == 0
    report = json.loads(out)
    assert sorted(report["differing_keys"]) == ["optim.lr", "trainer.seed"]
    assert report["metric"] == "val/loss" and report["mode"] == "min"
    by_path = {r["path"]: r for r in report["runs"]}
    assert by_path[str(a)]["config"] == {"optim.lr": 1e-3, "trainer.seed": 42}
    assert by_path[str(b)]["config"] == {"optim.lr": 3e-4, "trainer.seed": 7}
    for run in (a, b):
        assert by_path[str(run)]["best"] == best(run) and by_path[str(run)]["status"] == "completed"
    ranked = sorted((a, b), key=best)
    assert [r["path"] for r in report["runs"]] == [str(p) for p in ranked], "best first"

    png = Path(report["png"])
    assert png == a.parent / "compare_001_002.png" and png.is_file()
    with Image.open(png) as image:
        assert image.format == "PNG" and image.info["Software"] == PNG_MARK
        assert image.size[0] > 600 and image.size[1] > 500  # two panels: train/loss, val/loss

    code, out, _ = runs(capsys, "compare", str(a), str(b), "--format", "md", "--no-png")
    header = out.splitlines()[0]
    assert header.startswith("| # | run | status | steps | best val/loss | best step | wall |")
    assert header.endswith("| trainer.seed | optim.lr |") and "curves:" not in out  # config order
    code, out, _ = runs(capsys, "compare", str(a), str(b), "--format", "csv", "--no-png")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [float(r["best val/loss"]) for r in rows] == pytest.approx(sorted(map(best, (a, b))))
    assert {r["trainer.seed"] for r in rows} == {"42", "7"}


@pytest.mark.trains
def test_list_has_one_row_per_run_with_steps_best_wall_and_differing_keys(two_runs, capsys):
    a, b = two_runs
    code, out, _ = runs(capsys, "list", str(a.parent))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "#",
        "run",
        "status",
        "steps",
        "best",
        "val/loss",
        "best",
        "step",
        "wall",
        "trainer.seed",
        "optim.lr",
    ]
    assert lines[2].split()[:4] == ["001", a.name, "completed", "4/4"]
    assert lines[2].split()[4] == f"{best(a):.4f}" and lines[2].split()[-2:] == ["42", "0.001"]
    assert lines[3].split()[0] == "002" and lines[3].split()[-2:] == ["7", "0.0003"]
    assert len(lines) == 4


@pytest.mark.trains
def test_compare_groups_seeds_with_mean_and_std(run_toy, capsys, tmp_path):
    folders = {
        (lr, seed): run_toy(*SHORT, f"optim.lr={lr}", f"trainer.seed={seed}").run_dir
        for lr in ("1e-3", "3e-4")
        for seed in (1, 2)
    }
    code, out, _ = runs(capsys, "compare", *map(str, folders.values()), "--format", "json")
    report = json.loads(out)
    assert code == 0 and sorted(report["differing_keys"]) == ["optim.lr", "trainer.seed"]
    groups = {g["config"]["optim.lr"]: g for g in report["groups"]}
    for lr, value in (("1e-3", 1e-3), ("3e-4", 3e-4)):
        values = [best(folders[(lr, s)]) for s in (1, 2)]
        assert groups[value]["n"] == 2
        assert groups[value]["mean"] == pytest.approx(statistics.fmean(values))
        assert groups[value]["std"] == pytest.approx(statistics.stdev(values))
    assert report["groups"][0]["mean"] <= report["groups"][1]["mean"]
    code, out, _ = runs(capsys, "compare", *map(str, folders.values()), "--no-png")
    assert "over seeds:" in out and " ± " in out


@pytest.mark.trains
def test_bad_paths_and_foreign_png_exit_2_and_touch_nothing(two_runs, capsys, tmp_path):
    a, b = two_runs
    code, _, err = runs(capsys, "compare", str(a), str(tmp_path / "nope"))
    assert code == 2 and "does not exist" in err and err.count("\n") == 1
    code, _, err = runs(capsys, "list", str(tmp_path / "nope"))
    assert code == 2 and "is not a folder of runs" in err
    mine = tmp_path / "figure.png"
    mine.write_bytes(b"the user's own figure")
    code, _, err = runs(capsys, "compare", str(a), str(b), "--png", str(mine))
    assert code == 2 and "does not overwrite files it did not create" in err
    assert mine.read_bytes() == b"the user's own figure"
    code, _, err = runs(capsys, "compare", str(a), str(b), "--png", str(a / "metrics.jsonl"))
    assert code == 2 and "writing there would destroy it" in err
    # Its own plot it replaces.
    assert runs(capsys, "compare", str(a), str(b), "--png", str(tmp_path / "c.png"))[0] == 0
    assert runs(capsys, "compare", str(a), str(b), "--png", str(tmp_path / "c.png"))[0] == 0
