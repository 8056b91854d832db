"""Self-check of :mod:`core.sweep`: ``python -m core.sweep``.

Runs the doctests of the modules, checks the grid of a command line, that mistakes in axes
are refused with a message, a sweep folder written and read back, the local lock, and that a
dry run writes nothing.
"""

import doctest
import sys
import tempfile
from pathlib import Path

from core.errors import UserError
from core.sweep import (
    Axis,
    Sweep,
    SweepSpec,
    check_grid,
    find_sweep,
    grid,
    next_sweep_path,
    point_status,
    read_sweep,
    set_aside_unstarted,
    split_overrides,
    sweep_command,
    sweep_lock,
    write_sweep,
)
from core.sweep import axes as axes_module
from core.sweep import slurm as slurm_module
from core.testing.toy import train as toy_train


def check_folder(tmp: Path) -> None:
    """A sweep folder written and read back, found again, its points' status as they run."""
    spec = SweepSpec("toy", None, ["trainer.max_steps=2"], [Axis("optim.lr", ("1", "2"))])
    path = next_sweep_path(tmp, "lr")
    path.mkdir()
    made = Sweep(path, spec, {"run": {"root": str(tmp)}}, grid(spec.axes))
    write_sweep(made, ["optim.lr=1,2"])
    back = read_sweep(path)
    assert back.spec.as_dict() == spec.as_dict() and back.points == made.points
    assert find_sweep(tmp, spec).path == path
    first = back.point_dir(back.points[0])
    assert point_status(first) == "pending"
    first.mkdir()
    assert point_status(first) == "started"
    (first / "summary.json").write_text('{"status": "completed"}')
    assert point_status(first) == "completed"
    print(back.train_args(back.points[1]))


def check_local(tmp: Path) -> None:
    """The local lock refuses a second copy; a point folder killed while starting is set aside."""
    with sweep_lock(tmp):
        try:
            with sweep_lock(tmp):
                raise AssertionError("a second sweep took the lock")
        except UserError as err:
            print("second copy ->", err)
    assert not (tmp / ".lock").exists()
    unstarted = tmp / "000_lr=1"
    unstarted.mkdir()
    set_aside_unstarted(unstarted)
    assert not unstarted.exists() and len(list(tmp.iterdir())) == 1


for module in (axes_module, slurm_module):
    assert doctest.testmod(module, verbose=False).failed == 0, module.__name__
fixed, axes = split_overrides(["trainer.max_steps=2", "optim.lr=1e-3,3e-4", "model.n_layer=1,2"])
points = grid(axes)
assert (
    fixed == ["trainer.max_steps=2"] and [p.dir_name for p in points][-1] == "003_lr=3e-4_n_layer=2"
)
for bad in (["optim.lrr=1,2"], ["optim.lr=abc,1e-3"], ["optim.lr=,"], ["optim.lr=1e-3,"]):
    try:
        spec = SweepSpec("toy", None, [], split_overrides(bad)[1])
        check_grid(toy_train, spec, grid(spec.axes))
    except UserError as err:
        print(f"{bad[0]:<20} -> {str(err)[:110]}...")
    else:
        raise AssertionError(f"{bad} was accepted")
for check in (check_folder, check_local):
    with tempfile.TemporaryDirectory() as tmp:
        check(Path(tmp))
with tempfile.TemporaryDirectory() as tmp:
    code = sweep_command(
        [f"run.root={tmp}", "optim.lr=1e-3,3e-4", "--seeds", "2", "--dry-run"],
        task="toy",
        train=toy_train,
        train_cmd=[sys.executable, "-m", "core.testing", "train"],
    )
    assert code == 0 and not any(Path(tmp).iterdir()), "a dry run must not write anything"
print("core.sweep: ok")
