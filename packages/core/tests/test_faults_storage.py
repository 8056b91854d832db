"""Storage and integrity faults of training: a full disk (tmpfs as the run root), read-only
mounts, a tiny ``$TMPDIR``, damaged checkpoints, a changed model or changed data at resume.

Each case runs the toy task in this process through the ``train`` command (exit code and the
one-paragraph message a user sees); tmpfs and bind mounts need root and are skipped without it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.config.schema import CheckpointConfig
from core.parallel.checkpoint import CheckpointManager, verify_checkpoint
from core.testing.toy import (
    CountingData,
    ToyTask,
    child_env,
    final_weights,
    max_weight_diff,
    train_losses,
)
from core.testing.toy import train as toy_command

pytestmark = pytest.mark.faults  # the fault suite (issue 20): uv run pytest -m faults

COMMON = ["logger.progress_bar=false", "trainer.accelerator=cpu"]
EXACT = [
    "trainer.max_steps=8",
    "trainer.ckpt_every_n_steps=2",
    "checkpoint.keep_last=10",
    "trainer.log_every_n_steps=1",
    "trainer.deterministic=true",
]


def toy_train(*args: str, make_task: type = ToyTask) -> int:
    """The toy ``train`` command in this process; returns its exit code."""
    return toy_command([*args, *COMMON], make_task=make_task)


def error_of(capsys: pytest.CaptureFixture) -> tuple[str, str]:
    """``(the 'error:' paragraph, all of stderr)`` of the command that just ran."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0], err


def only_run(root: Path) -> Path:
    runs = [p for p in root.iterdir() if p.is_dir() and p.name[:1].isdigit()]
    assert len(runs) == 1, runs
    return runs[0]


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:07d}"


class Mounts:
    """tmpfs and read-only bind mounts for one test, all unmounted at its end."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.made: list[Path] = []

    def _mount(self, target: Path, *args: str) -> Path:
        target.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", *args], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount here: {done.stderr.strip()}")
        self.made.append(target)
        return target

    def tmpfs(self, name: str, size: str = "4m", inodes: int | None = None) -> Path:
        options = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
        target = self.base / name
        return self._mount(target, "-t", "tmpfs", "-o", options, "tmpfs", str(target))

    def read_only(self, source: Path, name: str) -> Path:
        target = self._mount(self.base / name, "--bind", str(source), str(self.base / name))
        done = subprocess.run(
            ["mount", "-o", "remount,bind,ro", str(target)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {done.stderr.strip()}")
        return target

    def unmount_all(self) -> None:
        for target in reversed(self.made):
            subprocess.run(["umount", "-l", str(target)], capture_output=True)


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[Mounts]:
    if os.geteuid() != 0:
        pytest.skip("tmpfs and bind mounts need root")
    helper = Mounts(tmp_path / "mnt")
    try:
        yield helper
    finally:
        helper.unmount_all()


@pytest.fixture(scope="module")
def exact_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One deterministic 8-step run with checkpoints at 2, 4, 6, 8 (tests copy it)."""
    root = tmp_path_factory.mktemp("exact")
    assert toy_train(f"run.root={root}", *EXACT) == 0
    return only_run(root)


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


# -- the checkpoint's own folder, not $TMPDIR ---------------------------------------------------


@pytest.mark.trains
def test_checkpoints_never_pass_through_a_small_tmpdir(mounts, tmp_path, monkeypatch, capsys):
    """$TMPDIR on a 4 KiB tmpfs: checkpoints (400 KB) are written in their own folder anyway,
    and carry a manifest of their files."""
    tiny = mounts.tmpfs("tiny_tmp", size="4k")
    monkeypatch.setenv("TMPDIR", str(tiny))
    monkeypatch.setattr(tempfile, "tempdir", None)  # tempfile caches the folder it chose
    assert tempfile.gettempdir() == str(tiny)
    code = toy_train(
        f"run.root={tmp_path / 'runs'}", "trainer.max_steps=2", "trainer.ckpt_every_n_steps=1"
    )
    assert code == 0, capsys.readouterr().err
    run = only_run(tmp_path / "runs")
    info = CheckpointManager(run / "checkpoints", CheckpointConfig()).latest()
    assert info.step == 2 and set(info.files) == {"state"}
    assert info.files["state"]["bytes"] == (info.path / "state").stat().st_size
    assert verify_checkpoint(info) is None
    assert not list(tiny.iterdir())


# -- a full disk -------------------------------------------------------------------------------


@pytest.mark.trains
def test_disk_full_at_a_checkpoint_is_refused_before_writing_it(mounts, capsys):
    """A 1000 KiB run root: two 390 KiB checkpoints fit, the third does not. Exit 1 with the
    path and the space; no partial folder; the earlier checkpoints intact; summary failed."""
    root = mounts.tmpfs("full", size="1000k")
    code = toy_train(
        f"run.root={root}",
        "trainer.max_steps=10",
        "trainer.ckpt_every_n_steps=1",
        "checkpoint.keep_last=10",
    )
    assert code == 1
    message, _ = error_of(capsys)
    run = only_run(root)
    manager = CheckpointManager(run / "checkpoints", CheckpointConfig())
    steps = [c.step for c in manager.list()]
    assert len(steps) >= 1 and steps == list(range(1, len(steps) + 1))
    failed_at = ckpt(run, steps[-1] + 1).name
    assert f"checkpoint {failed_at}" in message and str(run / "checkpoints") in message
    assert "needed" in message and "free there" in message
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert all(verify_checkpoint(c) is None for c in manager.list())
    record = summary(run)
    assert record["status"] == "failed" and "Not enough space" in record["error"]


class FillingTask(ToyTask):
    """The toy task, with another process's file filling the disk (``ballast``) just before the
    optimizer step ``fill_at``: all bytes, or all inodes but ``free_inodes``."""

    ballast: Path
    fill_at: int
    free_inodes: int | None = None

    def training_step(self, model, batch):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == self.fill_at:
            self.fill()
        return super().training_step(model, batch)

    def fill(self) -> None:
        """Fill the disk of ``ballast`` (bytes, or inodes but ``free_inodes``)."""
        self.ballast.mkdir()
        if self.free_inodes is None:
            with open(self.ballast / "bytes", "wb", buffering=0) as handle:
                try:
                    while True:
                        handle.write(b"\0" * 4096)
                except OSError as err:
                    assert err.errno == errno.ENOSPC
        else:
            made = []
            try:
                while True:
                    made.append(self.ballast / str(len(made)))
                    made[-1].touch()
            except OSError as err:
                assert err.errno == errno.ENOSPC
            for path in made[-1 - self.free_inodes : -1]:
                path.unlink()


def filling(**attrs) -> type:
    return type("Filling", (FillingTask,), attrs)


class FullAfterFinal(FillingTask):
    """The disk fills right after final/ is written: only the summary (rewritten in place),
    metrics.csv and curves.png are left to write."""

    fill_at = 0

    def save_final(self, model, state_dict, out):
        super().save_final(model, state_dict, out)
        self.fill()


@pytest.mark.trains
def test_a_full_disk_after_final_costs_only_the_plot(mounts, capsys):
    """Everything that matters is written when the disk fills: the run is completed (exit 0),
    the plot is skipped with a warning and no half PNG is left."""
    root = mounts.tmpfs("after_final", size="4m")
    task = type("Full", (FullAfterFinal,), {"ballast": root / "ballast"})
    assert toy_train(f"run.root={root}", "trainer.max_steps=2", make_task=task) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" not in err, err
    run = only_run(root)
    assert summary(run)["status"] == "completed"
    assert (run / "final" / "config.json").is_file() and not (run / "curves.png").exists()
    assert "curves.png" in err and "The run itself is complete" in err


@pytest.mark.trains
def test_disk_full_mid_run_stops_at_the_metrics_write_without_a_torn_line(mounts, capsys):
    """The disk fills during step 3; the metrics records fill the last page of metrics.jsonl a
    few steps later: exit 1 naming metrics.jsonl, every line of it whole (the short write is
    undone), summary failed (written in place on the full disk)."""
    root = mounts.tmpfs("midrun", size="2m")
    task = filling(ballast=root / "ballast", fill_at=3)
    code = toy_train(
        f"run.root={root}",
        "trainer.max_steps=60",
        "trainer.log_every_n_steps=1",
        "trainer.ckpt_every_n_steps=50",  # none before the metrics write fails
        make_task=task,
    )
    assert code == 1
    message, err = error_of(capsys)
    run = only_run(root)
    assert f"'{run / 'metrics.jsonl'}'" in message and "the disk is full" in message
    steps = sorted(train_losses(run))  # parses every line: none is torn
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > 3
    record = summary(run)
    assert record["status"] == "failed" and "metrics.jsonl" in record["error"]
    assert not (run / "checkpoints").exists()


@pytest.mark.trains
@pytest.mark.parametrize(
    "free_inodes, fill_at, partial",
    [(1, 2, ".tmp-step-0000002"), (2, 2, ".tmp-step-0000002"), (4, 4, "final.tmp")],
    ids=["no-room-for-state", "no-room-for-meta", "no-room-for-final"],
)
def test_disk_full_while_writing_removes_the_partial_output(
    mounts, capsys, free_inodes, fill_at, partial
):
    """No file can be created after the first few of a checkpoint (state or meta.json) or of
    final/: exit 1 naming the path, the half-written folder removed, the earlier checkpoints
    intact, summary failed; once there is room, the same command finishes the run."""
    root = mounts.tmpfs("inodes", size="8m", inodes=64)
    args = [
        f"run.root={root}",
        "trainer.max_steps=4",
        "trainer.ckpt_every_n_steps=1" if fill_at == 2 else "trainer.ckpt_every_n_steps=2",
        "checkpoint.keep_last=10",
        "logger.plot=false",
    ]
    ballast = root / "ballast"
    task = filling(ballast=ballast, fill_at=fill_at, free_inodes=free_inodes)
    assert toy_train(*args, make_task=task) == 1
    message, _ = error_of(capsys)
    run = only_run(root)
    assert partial in message and "the disk is full" in message
    assert not (run / partial).exists() and not (run / "checkpoints" / partial).exists()
    manager = CheckpointManager(run / "checkpoints", CheckpointConfig())
    assert all(verify_checkpoint(c) is None for c in manager.list())
    assert summary(run)["status"] == "failed"
    shutil.rmtree(ballast)
    assert toy_train(f"run.dir={run}") == 0
    assert summary(run)["status"] == "completed" and (run / "final" / "config.json").is_file()


# -- read-only mounts --------------------------------------------------------------------------


def test_a_read_only_run_root_is_refused_before_training(mounts, tmp_path, capsys):
    """run.root on a read-only mount: exit 1 naming the folder, before any model is built."""
    (tmp_path / "ro_source").mkdir()
    root = mounts.read_only(tmp_path / "ro_source", "ro_root")
    assert toy_train(f"run.root={root / 'runs'}", "trainer.max_steps=2") == 1
    message, err = error_of(capsys)
    assert str(root / "runs") in message and "read-only" in message
    assert "Parameters:" not in err  # no model was built
    assert toy_train(f"run.dir={root / 'mine'}", "trainer.max_steps=2") == 1
    message, _ = error_of(capsys)
    assert str(root / "mine") in message and "read-only" in message


@pytest.mark.trains
def test_resuming_a_run_on_a_read_only_mount_says_so(mounts, exact_run, capsys):
    """A finished run seen through a read-only mount: resuming it exits 1 with the path and how
    to go on (a writable copy); nothing in it changes."""
    ro = mounts.read_only(exact_run.parent, "ro_runs")
    before = (exact_run / "summary.json").read_bytes()
    assert toy_train(f"run.dir={ro / exact_run.name}", "trainer.max_steps=10") == 1
    message, _ = error_of(capsys)
    assert str(ro / exact_run.name) in message and "read-only" in message
    assert "copy" in message
    assert (exact_run / "summary.json").read_bytes() == before


# -- damaged checkpoints -----------------------------------------------------------------------


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):  # inside the tensor data
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated-state": lambda c: truncate(c / "state"),
    "flipped-bytes": lambda c: flip(c / "state"),
    "torn-meta": lambda c: truncate(c / "meta.json"),
    "invalid-meta": lambda c: (c / "meta.json").write_text('{"metrics": {}}'),
}


@pytest.mark.trains
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_skipped_and_resume_falls_back_bit_identically(
    exact_run, tmp_path, capsys, damage
):
    """The newest checkpoint damaged: resume warns naming the bad file, continues from the
    previous one and ends with the uninterrupted run's weights and losses."""
    run = copy_run(exact_run, tmp_path / "run")
    DAMAGE[damage](ckpt(run, 8))
    assert toy_train(f"run.dir={run}") == 0
    err = capsys.readouterr().err
    bad = "meta.json" if "meta" in damage else "state"
    assert "Skipping checkpoint step-0000008" in err and str(ckpt(run, 8) / bad) in err, err
    assert f"Resumed from {ckpt(run, 6)}" in err
    assert max_weight_diff(final_weights(exact_run), final_weights(run)) == 0.0
    assert train_losses(run) == train_losses(exact_run)
    assert (
        verify_checkpoint(CheckpointManager(run / "checkpoints", CheckpointConfig()).latest())
        is None
    )


@pytest.mark.trains
def test_no_intact_checkpoint_exits_1_and_leaves_the_completed_summary_as_it_was(
    exact_run, tmp_path, capsys
):
    run = copy_run(exact_run, tmp_path / "run")
    before = (run / "summary.json").read_bytes()
    for step, damage in zip((2, 4, 6, 8), DAMAGE.values()):
        damage(ckpt(run, step))
    assert toy_train(f"run.dir={run}") == 1
    message, _ = error_of(capsys)
    assert "No intact checkpoint" in message and str(run / "checkpoints") in message
    for step in (2, 4, 6, 8):
        assert ckpt(run, step).name in message
    assert (run / "summary.json").read_bytes() == before
    assert summary(run)["status"] == "completed"


@pytest.mark.trains
def test_a_checkpoint_without_a_manifest_still_resumes_unverified(exact_run, tmp_path, capsys):
    """A checkpoint as written before checkpoints carried a manifest resumes, with a note."""
    run = copy_run(exact_run, tmp_path / "run")
    shutil.rmtree(ckpt(run, 8))
    meta_path = ckpt(run, 6) / "meta.json"
    meta = json.loads(meta_path.read_text())
    for key in ("files", "format", "data_files"):
        meta.pop(key, None)
    meta_path.write_text(json.dumps(meta))
    assert toy_train(f"run.dir={run}") == 0
    err = capsys.readouterr().err
    assert (
        "written before checkpoints carried checksums" in err
        and f"Resumed from {ckpt(run, 6)}" in err
    )
    assert max_weight_diff(final_weights(exact_run), final_weights(run)) == 0.0


# -- a changed model or changed data at resume -------------------------------------------------


@pytest.mark.trains
@pytest.mark.parametrize(
    "change, expected",
    [
        (
            "model.n_layer=3",
            ["12 tensors of the model are not in it", "transformer.h.2.", "and 9 more"],
        ),
        (
            "model.n_embd=64",
            [
                "have another shape",
                "29 have another shape, saved -> now (lm_head.weight 50x32 -> 50x64",
            ],
        ),
    ],
)
def test_a_changed_architecture_is_named_and_the_summary_kept(
    exact_run, tmp_path, capsys, change, expected
):
    run = copy_run(exact_run, tmp_path / "run")
    before = (run / "summary.json").read_bytes()
    assert toy_train(f"run.dir={run}", change) == 2
    message, _ = error_of(capsys)
    for text in expected:
        assert text in message, message
    assert "start a new run" in message
    assert (run / "summary.json").read_bytes() == before


class FileToyTask(ToyTask):
    """The toy task reading its training data's seed from a file (a data file of the run)."""

    data_file: Path

    def setup(self) -> None:
        super().setup()
        offset = int(self.data_file.read_text())
        self.train = CountingData(
            self.cfg.data.num_train, self.cfg.data, self.cfg.model.vocab_size, offset
        )

    def data_files(self) -> list[Path]:
        return [self.data_file]


@pytest.mark.trains
def test_data_edited_before_a_resume_is_refused_unless_asked_for(tmp_path, capsys):
    data = tmp_path / "train.txt"
    data.write_text("5")
    task = type("Files", (FileToyTask,), {"data_file": data})
    args = ["trainer.max_steps=2", "trainer.ckpt_every_n_steps=1"]
    assert toy_train(f"run.root={tmp_path / 'runs'}", *args, make_task=task) == 0
    run = only_run(tmp_path / "runs")
    capsys.readouterr()
    old = hashlib.sha256(b"5").hexdigest()
    data.write_text("6")
    new = hashlib.sha256(b"6").hexdigest()
    before = (run / "summary.json").read_bytes()
    assert toy_train(f"run.dir={run}", "trainer.max_steps=4", make_task=task) == 2
    message, _ = error_of(capsys)
    assert str(data) in message and old in message and new in message
    assert "trainer.resume_changed_data=true" in message
    assert (run / "summary.json").read_bytes() == before
    code = toy_train(
        f"run.dir={run}", "trainer.max_steps=4", "trainer.resume_changed_data=true", make_task=task
    )
    assert code == 0
    assert "Resuming on changed data" in capsys.readouterr().err
    assert summary(run)["global_step"] == 4
    # The new checkpoints record the new data: the next resume needs no key.
    assert toy_train(f"run.dir={run}", "trainer.max_steps=5", make_task=task) == 0


@pytest.mark.trains
def test_the_same_data_at_another_place_resumes(tmp_path, capsys):
    """A run resumed from another checkout (or a job's own environment) finds its data files at
    new paths with the same contents: that is the data it trained on, not a change."""
    data = tmp_path / "a" / "train.txt"
    data.parent.mkdir()
    data.write_text("5")
    task = type("Files", (FileToyTask,), {"data_file": data})
    args = ["trainer.max_steps=2", "trainer.ckpt_every_n_steps=1"]
    assert toy_train(f"run.root={tmp_path / 'runs'}", *args, make_task=task) == 0
    run = only_run(tmp_path / "runs")
    moved = tmp_path / "b" / "train.txt"
    moved.parent.mkdir()
    moved.write_text("5")
    data.unlink()
    capsys.readouterr()
    task = type("Files", (FileToyTask,), {"data_file": moved})
    assert toy_train(f"run.dir={run}", "trainer.max_steps=4", make_task=task) == 0
    assert "same contents" in capsys.readouterr().err
    assert summary(run)["global_step"] == 4
    moved.write_text("6")  # moved *and* edited: still refused
    assert toy_train(f"run.dir={run}", "trainer.max_steps=5", make_task=task) == 2
    assert "The data changed since checkpoint" in error_of(capsys)[0]


# -- FSDP2 on 2 ranks --------------------------------------------------------------------------


@pytest.mark.slow
def test_a_truncated_fsdp2_shard_is_named_and_resume_falls_back(tmp_path):
    """2 CPU ranks under FSDP2: a truncated shard of one rank in the newest checkpoint is named,
    the run continues from the previous checkpoint to the same weights."""
    args = [
        "trainer.devices=2",
        "trainer.strategy=fsdp",
        "trainer.batch_size=2",
        "trainer.max_steps=4",
        "trainer.ckpt_every_n_steps=2",
        "checkpoint.keep_last=5",
        "trainer.deterministic=true",
        *COMMON,
    ]

    def train(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "core.testing", "train", *args, *extra],
            capture_output=True,
            text=True,
            env=child_env(),
            timeout=300,
        )

    done = train(f"run.root={tmp_path / 'runs'}")
    assert done.returncode == 0, done.stderr
    run = only_run(tmp_path / "runs")
    shard = ckpt(run, 4) / "state" / "__1_0.distcp"
    meta = json.loads((ckpt(run, 4) / "meta.json").read_text())
    assert {"state/__0_0.distcp", "state/__1_0.distcp", "state/.metadata"} <= set(meta["files"])
    expected = final_weights(run)
    truncate(shard)
    done = train(f"run.dir={run}")
    assert done.returncode == 0, done.stderr
    assert str(shard) in done.stderr and f"Resumed from {ckpt(run, 2)}" in done.stderr
    assert max_weight_diff(expected, final_weights(run)) == 0.0
