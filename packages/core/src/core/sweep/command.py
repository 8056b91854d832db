"""The ``sweep`` command: parse the command line, check the grid, open or resume the sweep
folder, print the plan and run the points locally or submit them to SLURM.

Self-check: ``python -m core.sweep`` (a dry run of the toy task).
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from core.errors import UserError, user_errors_exit_2
from core.report import compare_sweep_text
from core.run.folder import new_run_dir
from core.sweep.axes import SEED_KEY, Point, SweepSpec, TrainFn, grid, seed_axis, split_overrides
from core.sweep.check import check_grid, config_changes, resolved_config
from core.sweep.folder import (
    Sweep,
    find_sweep,
    next_sweep_path,
    point_status,
    read_sweep,
    sweeps_root,
    write_sweep,
)
from core.sweep.local import _say, run_local
from core.sweep.slurm import find_sbatch_script, live_array_jobs, sbatch_command, submit_array

DEFAULT_MAX_POINTS = 32
"""A grid with more points than this needs ``--max-points N`` (a typo can multiply a grid)."""


def sweep_parser() -> argparse.ArgumentParser:
    """The ``sweep`` argument parser (everything after ``--slurm`` goes to sbatch)."""
    parser = argparse.ArgumentParser(
        prog="sweep",
        description="Run a grid of training runs (key=v1,v2 axes) locally one after another, or as "
        "one SLURM job array with --slurm. Running the same command again continues the sweep.",
        epilog="examples:\n"
        "  sweep -c tiny optim.lr=1e-3,3e-4 trainer.batch_size=8,16 --name lr-bs\n"
        "  sweep -c tiny optim.lr=1e-3,3e-4 --seeds 3 --dry-run\n"
        "  sweep -c bart_base optim.lr=1e-4,3e-4,1e-3 --slurm -p a100 --time=8:00:00\n"
        "  sweep --resume runs/sweeps/002_20260101_120000_lr-bs\n"
        "  runs compare runs/sweeps/002_20260101_120000_lr-bs\n\n"
        "--slurm must come last: what follows it goes to sbatch. A grid of more than "
        f"{DEFAULT_MAX_POINTS} points needs --max-points N.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-c", "--config", metavar="PRESET|FILE", help="a preset or a YAML file")
    parser.add_argument("--name", default="", help="suffix of the sweep folder; the W&B group")
    parser.add_argument("--seeds", type=int, metavar="N", help="repeat every point with N seeds")
    parser.add_argument(
        "--max-points", type=int, metavar="N", help=f"allow grids above {DEFAULT_MAX_POINTS} points"
    )
    parser.add_argument(
        "--max-parallel", type=int, metavar="M", help="--slurm: at most M array tasks at once (all)"
    )
    parser.add_argument("--resume", type=Path, metavar="DIR", help="continue this sweep folder")
    parser.add_argument("--new", action="store_true", help="a new sweep folder even if one matches")
    parser.add_argument("--dry-run", action="store_true", help="print points and commands only")
    parser.add_argument("--sbatch-script", type=Path, metavar="PATH", help="--slurm: the script")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value|key=v1,v2", help="overrides and axes"
    )
    return parser


def _spec_from_args(args: argparse.Namespace, task: str) -> tuple[SweepSpec, bool]:
    """The :class:`SweepSpec` of the command line (no seed axis yet) and whether it gave any."""
    preset = args.config
    # A YAML file is kept by absolute path: SLURM jobs may start in another folder.
    if preset and (preset.endswith((".yaml", ".yml")) or "/" in preset) and Path(preset).is_file():
        preset = str(Path(preset).resolve())
    fixed, axes = split_overrides(args.overrides)
    if args.name and not re.fullmatch(r"[A-Za-z0-9._-]+", args.name):
        raise UserError(
            f"--name {args.name!r}: use letters, digits, '-', '_' or '.' only (it becomes part "
            "of a folder name and the W&B group)."
        )
    given = bool(args.config or args.overrides or args.seeds or args.name)
    return SweepSpec(task, preset, fixed, axes, args.seeds, args.name), given


def _add_seeds(spec: SweepSpec, train: TrainFn) -> None:
    """Append the ``--seeds`` axis (base seed from the resolved base config)."""
    if not spec.seeds or spec.seeds == 1 or any(a.key == SEED_KEY for a in spec.axes):
        if spec.seeds and any(a.key == SEED_KEY for a in spec.axes):
            raise UserError(
                f"--seeds {spec.seeds} and the axis {SEED_KEY}=... both set the seeds; keep one."
            )
        return
    base, error = resolved_config(train, spec.base_args)
    if base is None:
        raise UserError(f"The sweep's base config is not valid: {error}")
    spec.axes.append(seed_axis(int(base["trainer"]["seed"]), spec.seeds))


def _check_size(spec: SweepSpec, max_points: int | None) -> int:
    """The number of points; raises ``UserError`` when it needs (a larger) ``--max-points``."""
    if not spec.axes:
        raise UserError(
            "Nothing to sweep: give at least one axis key=v1,v2 (e.g. optim.lr=1e-4,3e-4) or "
            "--seeds N; for a single run use train."
        )
    count = 1
    for axis in spec.axes:
        count *= len(axis.values)
    limit = max_points or DEFAULT_MAX_POINTS
    if count > limit:
        sizes = " x ".join(f"{len(a.values)} {a.key}" for a in spec.axes)
        raise UserError(
            f"The grid has {count} points ({sizes}), more than "
            + (f"--max-points {max_points}" if max_points else f"the limit of {limit}")
            + f"; if you mean it, add --max-points {count}, else give fewer values."
        )
    return count


def _open_sweep(
    args: argparse.Namespace, task: str, train: TrainFn, argv: Sequence[str], slurm: bool
) -> tuple[Sweep, bool]:
    """Find the sweep this command continues, or make the grid of a new one (folder made only
    when not ``--dry-run``). Returns ``(sweep, is new)``; every check happens before a folder
    exists (with ``slurm``: also that ``sbatch`` is there)."""
    spec, given = _spec_from_args(args, task)
    if args.resume is not None:
        if args.new:
            raise UserError("--resume DIR and --new contradict each other; give one.")
        sweep = read_sweep(args.resume)
        if sweep.spec.task != task:
            raise UserError(
                f"Sweep {args.resume} runs the {sweep.spec.task} task, not {task}; continue it "
                f"with 'uv run --package {sweep.spec.task} sweep --resume {args.resume}'."
            )
        if given:
            _add_seeds(spec, train)
            if spec.as_dict() != sweep.spec.as_dict():
                raise UserError(
                    f"Sweep {args.resume} was made by a different command "
                    f"({shlex.join(['sweep', *sweep.spec.base_args])} with axes "
                    f"{', '.join(a.key for a in sweep.spec.axes)}); give just --resume DIR to "
                    "continue it, or drop --resume to start a new sweep."
                )
        spec = sweep.spec
        found: Sweep | None = sweep
    else:
        _add_seeds(spec, train)
        found = None
    _check_size(spec, args.max_points)
    points = grid(spec.axes)
    base, _ = check_grid(train, spec, points)
    if slurm and not args.dry_run and shutil.which("sbatch") is None:
        raise UserError("--slurm: sbatch is not on PATH here; run the sweep on a SLURM login node.")
    if found is None and not args.new:
        found = find_sweep(sweeps_root(base), spec)
    if found is not None:
        if found.base_config != base:
            changes = config_changes(found.base_config, base)
            raise UserError(
                f"Sweep folder {found.path} was made from a different base config than this "
                f"command gives now ({len(changes)} key(s): {'; '.join(changes[:5])}). Its points "
                "would no longer be comparable; restore the preset / overrides, or start a new "
                "sweep with --new."
            )
        return found, False
    root = sweeps_root(base)
    path = next_sweep_path(root, spec.name) if args.dry_run else new_run_dir(root, spec.name)
    sweep = Sweep(path, spec, base, points)
    if not args.dry_run:
        write_sweep(sweep, argv)
    return sweep, True


def _print_plan(sweep: Sweep, new: bool) -> None:
    """The points and their status, for ``--dry-run`` and before a run."""
    state = "new" if new else "existing"
    print(f"sweep {sweep.path} ({state}): {len(sweep.points)} points of task {sweep.spec.task}")
    keys = [a.key for a in sweep.spec.axes]
    rows = [["#", "folder", *keys, "status"]]
    for point in sweep.points:
        status = "pending" if new else point_status(sweep.point_dir(point))
        rows.append([str(point.index), point.dir_name, *point.values.values(), status])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@user_errors_exit_2
def sweep_command(
    argv: Sequence[str] | None,
    *,
    task: str,
    train: TrainFn,
    train_cmd: Sequence[str],
    task_module: str | None = None,
) -> int:
    """Run the ``sweep`` command of a task.

    Args:
        argv: arguments after the program name (default ``sys.argv[1:]``).
        task: the task's name (recorded in ``sweep.yaml``).
        train: the task's ``train`` command, called in this process with ``--print-config`` to
            check every point.
        train_cmd: the command that starts the task's ``train`` in a new process (local points).
        task_module: the task's module (to find its ``slurm/train.sbatch``).

    Returns:
        Exit code: 0 done / submitted / stopped by a signal, 1 a point failed, 2 bad input.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    own, sbatch_args = _split_slurm_args(argv)
    args = sweep_parser().parse_intermixed_args(own)
    script = _check_args(args, sbatch_args, task, task_module)
    sweep, new = _open_sweep(args, task, train, argv, slurm=sbatch_args is not None)
    _print_plan(sweep, new)
    live = [] if new else live_array_jobs(sweep)
    if live:
        raise UserError(
            f"Job array {', '.join(live)} of sweep {sweep.path} is still queued or running "
            f"(squeue); wait for it, or scancel {' '.join(live)} first."
        )
    todo = [p for p in sweep.points if new or point_status(sweep.point_dir(p)) != "completed"]
    if sbatch_args is not None:
        return _run_slurm(sweep, todo, args, Path(script), sbatch_args)
    if args.dry_run:
        print("would run, one after another (nothing was written or run):")
        for point in todo:
            print(f"  {shlex.join([*train_cmd, *sweep.train_args(point)])}")
        return 0
    code = run_local(sweep, train_cmd)
    if code == 0 and all(point_status(sweep.point_dir(p)) == "completed" for p in sweep.points):
        print(compare_sweep_text(sweep.path))
    return code


def _split_slurm_args(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """The sweep's own arguments and the sbatch arguments after ``--slurm`` (None: no
    ``--slurm``); a ``--dry-run`` among the sbatch arguments is the sweep's."""
    own, sbatch_args = argv, None
    if "--slurm" in argv:
        cut = argv.index("--slurm")
        own, sbatch_args = argv[:cut], argv[cut + 1 :]
        if "--dry-run" in sbatch_args:  # sbatch has no --dry-run: it is ours wherever it stands
            sbatch_args.remove("--dry-run")
            own.append("--dry-run")
    return own, sbatch_args


def _check_args(
    args: argparse.Namespace, sbatch_args: list[str] | None, task: str, task_module: str | None
) -> Path | str | None:
    """Check the numbers and the SLURM arguments of a sweep command.

    Returns:
        The task's sbatch script with ``--slurm``, else None.

    Raises:
        UserError: a count below 1, ``--max-parallel`` without ``--slurm``, an ``--array`` of
            the user's, or no sbatch script.
    """
    for flag, value in (("--seeds", args.seeds), ("--max-points", args.max_points)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: give a number of 1 or more.")
    if args.max_parallel is not None and (args.max_parallel < 1 or sbatch_args is None):
        raise UserError(
            f"--max-parallel {args.max_parallel}: give 1 or more, with --slurm (locally the points "
            "run one after another)."
        )
    if sbatch_args is None:
        return None
    if any(a.startswith(("--array", "-a")) for a in sbatch_args):
        raise UserError("The sweep sets sbatch's --array itself; drop it (use --max-parallel M).")
    script = args.sbatch_script or find_sbatch_script(task_module, task)
    if script is None or not Path(script).is_file():
        raise UserError(
            f"--slurm needs the task's sbatch script, packages/{task}/slurm/train.sbatch: run "
            "the sweep from the workspace root, or give --sbatch-script PATH."
        )
    return script


def _run_slurm(
    sweep: Sweep,
    todo: list[Point],
    args: argparse.Namespace,
    script: Path,
    sbatch_args: list[str],
) -> int:
    """Submit the points still to do as one job array (``--dry-run``: print what would be
    submitted).

    Returns:
        The exit code: 0 submitted, printed or nothing to do, else that of the submission.
    """
    parallel = args.max_parallel or max(len(todo), 1)
    if args.dry_run:
        args_dir = sweep.path.resolve() / "slurm"
        print("would submit (nothing was written or submitted):")
        command = sbatch_command(sweep, todo, script, sbatch_args, parallel)
        print(f"  SWEEP_ARGS_DIR={shlex.quote(str(args_dir))} {shlex.join(command)}")
        for point in todo:
            print(f"  array task {point.index}: {shlex.join(sweep.point_args(point))}")
        return 0
    if not todo:
        _say(f"all {len(sweep.points)} points are completed; nothing to submit")
        return 0
    return submit_array(sweep, todo, script, sbatch_args, parallel)
