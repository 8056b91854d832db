"""Sweeps: a grid of ordinary training runs, run locally one by one or as one SLURM job array.

    sweep [-c PRESET] [key=value ...] key=v1,v2,... [key=a,b ...] [--name NAME] [--seeds N]
          [--max-points N] [--max-parallel M] [--new | --resume DIR] [--dry-run]
          [--slurm [sbatch args ...]]

- ``key=v1,v2`` (a comma at the top level) is an **axis**; the grid is the cartesian product of
  the axes (last axis fastest). Commas inside ``[...]``, ``{...}`` or quotes stay in one value:
  ``lora.target_modules=[q_proj,v_proj],[q_proj,k_proj,v_proj,o_proj]`` is an axis of two lists.
  ``key=value`` without a top-level comma is a fixed override of every point.
- ``--seeds N`` repeats each point with ``trainer.seed`` = the base seed, +1, ..., +N-1.
- A sweep is a folder ``<run.root>/sweeps/NNN_YYYYMMDD_HHMMSS[_name]/`` holding ``sweep.yaml``
  (the command, the resolved base config, the axes and the points) and one ordinary run folder per
  point, ``<index>_<key>=<value>_...``: each point is a normal ``train`` run with
  ``run.dir=<point folder>``, so it has its manifest, metrics, checkpoints and ``final/``.
- Locally the points run one after another, each as its own ``train`` process (DDP launch,
  signals and memory stay exactly those of a normal run). Running the same command again (or
  ``sweep --resume DIR``) skips completed points, continues interrupted ones from their newest
  checkpoint (``trainer.resume=auto`` in the same folder) and starts the rest.
- ``--slurm [sbatch args]`` submits one job array ``sbatch --array=<points>%M`` of the task's own
  ``train.sbatch``; array task *i* reads its point's arguments from ``<sweep>/slurm/<i>.args``
  (``slurm/lib/launch.sh``), so a requeued task (USR1 -> checkpoint -> ``scontrol requeue``)
  resumes its own point folder.
- Every point is started with exactly the same preset and overrides each time (the trainer
  accepts an existing run folder only with the config it was started with).
- Input is checked before anything is created, run or submitted: unknown keys (with the closest
  key), values of the wrong type, empty axes, grids larger than ``--max-points`` (default
  :data:`DEFAULT_MAX_POINTS`), and a sweep folder whose base config differs from the command's
  exit with code 2 and one paragraph.

Modules (one per section of the former ``core/sweep.py``):

- :mod:`core.sweep.axes`: axes, points and the grid of a command line.
- :mod:`core.sweep.check`: checking every point with the task's own ``train --print-config``.
- :mod:`core.sweep.folder`: the sweep folder and its ``sweep.yaml``.
- :mod:`core.sweep.local`: running the points one by one on this machine.
- :mod:`core.sweep.slurm`: submitting the points as one SLURM job array.
- :mod:`core.sweep.command`: the ``sweep`` command (parser, plan, dispatch).

Self-check: ``python -m core.sweep`` (the doctests of axes and slurm, a sweep folder written
and read back, the local lock, a dry run).
"""

from core.sweep.axes import (
    RESERVED_KEYS,
    SEED_KEY,
    Axis,
    Point,
    SweepSpec,
    TrainFn,
    grid,
    point_dir_name,
    seed_axis,
    split_overrides,
    split_values,
)
from core.sweep.check import (
    check_grid,
    config_changes,
    resolved_config,
)
from core.sweep.command import (
    DEFAULT_MAX_POINTS,
    sweep_command,
    sweep_parser,
)
from core.sweep.folder import (
    SWEEP_FILE,
    Sweep,
    find_sweep,
    next_sweep_path,
    point_status,
    read_sweep,
    sweeps_root,
    write_sweep,
)
from core.sweep.local import (
    run_local,
    set_aside_unstarted,
    sweep_lock,
)
from core.sweep.slurm import (
    array_ranges,
    find_sbatch_script,
    live_array_jobs,
    sbatch_command,
    submit_array,
    write_array_args,
)

__all__ = [
    "DEFAULT_MAX_POINTS",
    "SWEEP_FILE",
    "RESERVED_KEYS",
    "SEED_KEY",
    "TrainFn",
    "Axis",
    "Point",
    "SweepSpec",
    "split_values",
    "split_overrides",
    "seed_axis",
    "point_dir_name",
    "grid",
    "resolved_config",
    "check_grid",
    "config_changes",
    "Sweep",
    "read_sweep",
    "write_sweep",
    "sweeps_root",
    "find_sweep",
    "point_status",
    "next_sweep_path",
    "sweep_lock",
    "set_aside_unstarted",
    "run_local",
    "array_ranges",
    "sbatch_command",
    "live_array_jobs",
    "write_array_args",
    "submit_array",
    "find_sbatch_script",
    "sweep_parser",
    "sweep_command",
]
