"""Self-check of :mod:`core.sweep`: ``python -m core.sweep``.

Runs the doctests of every module of the subpackage, checks the grid of a command line, that
mistakes in axes are refused with a message, and that a dry run writes nothing.
"""

import doctest
import sys
import tempfile
from pathlib import Path

from core.errors import UserError
from core.sweep import SweepSpec, check_grid, grid, split_overrides, sweep_command
from core.sweep import axes as axes_module
from core.testing import train as toy_train

for module in (axes_module,):
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
with tempfile.TemporaryDirectory() as tmp:
    code = sweep_command(
        [f"run.root={tmp}", "optim.lr=1e-3,3e-4", "--seeds", "2", "--dry-run"],
        task="toy",
        train=toy_train,
        train_cmd=[sys.executable, "-m", "core.testing", "train"],
    )
    assert code == 0 and not any(Path(tmp).iterdir()), "a dry run must not write anything"
print("core.sweep: ok")
