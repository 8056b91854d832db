"""The ``runs`` command: ``runs list`` and ``runs compare`` (parser, terminal width, output).

Self-check: ``python -m core.report`` (lists two runs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from core.errors import UserError, user_errors_exit_2
from core.report.plot import default_png, plot_compare
from core.report.rows import RunRow, check_comparable, collect, differing_keys, list_runs
from core.report.tables import (
    FORMATS,
    compare_output,
    fit_table,
    render,
    run_records,
    run_table,
    sweep_list_rows,
)
from core.run.storage import StorageError


def runs_parser() -> argparse.ArgumentParser:
    """The ``runs`` argument parser: sub-commands ``list`` and ``compare``."""
    parser = argparse.ArgumentParser(
        prog="runs",
        description="List and compare training runs and sweeps (read from their run folders).",
        epilog="examples:\n"
        "  runs list                         # every run under runs/, and the sweeps\n"
        "  runs list runs/sweeps/003_20260101_120000_lr\n"
        "  runs compare runs/001_20260101_120000 runs/002_20260101_130000 --format md\n"
        "  runs compare runs/sweeps/003_20260101_120000_lr --format json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{list,compare}")
    listing = sub.add_parser("list", help="one row per run under ROOT (default runs)")
    listing.add_argument("root", nargs="?", type=Path, default=Path("runs"), metavar="ROOT")
    listing.add_argument("--format", choices=FORMATS, default="table")
    listing.add_argument(
        "--wide", action="store_true", help="do not cut the table to the terminal's width"
    )
    compare = sub.add_parser("compare", help="a table and a PNG of several runs or sweeps")
    compare.add_argument("paths", nargs="+", type=Path, metavar="RUN_OR_SWEEP")
    compare.add_argument("--format", choices=FORMATS, default="table")
    compare.add_argument("--png", type=Path, help="where to write the plot (default: see --help)")
    compare.add_argument("--no-png", action="store_true", help="write no plot")
    compare.add_argument(
        "--overwrite", action="store_true", help="replace a --png file runs compare did not write"
    )
    compare.add_argument(
        "--mixed",
        action="store_true",
        help="compare runs of different tasks or monitored metrics (each metric ranked apart)",
    )
    return parser


def terminal_width() -> int | None:
    """The width to fit ``runs list`` to: ``COLUMNS``, else the terminal's; None when the output
    goes to a pipe or file (nothing is cut there)."""
    width = shutil.get_terminal_size(fallback=(0, 0)).columns
    return width if width > 0 else None


def list_command(root: Path, fmt: str, width: int | None = None) -> str:
    """The ``runs list`` text: one table per task (its own differing keys) when several tasks
    share the root, cut to ``width`` characters (``table`` format only).

    Args:
        root: the runs root or a sweep folder.
        fmt: one of :data:`FORMATS`.
        width: the terminal width to fit; None: no limit (``--wide``, a pipe).

    Raises:
        UserError: ``root`` is not a folder.
    """
    if not root.is_dir():
        raise UserError(
            f"'{root}' is not a folder of runs; give the runs root (run.root, default runs) or a "
            "sweep folder: runs list runs/sweeps/NNN_..."
        )
    rows = list_runs(root)
    groups: dict[str | None, list[RunRow]] = {}
    for row in rows:
        groups.setdefault(row.task, []).append(row)
    keys = differing_keys(rows)
    sweep_header, sweep_cells, sweep_records = sweep_list_rows(root / "sweeps")
    if fmt == "json":
        return json.dumps(
            {"differing_keys": keys, "runs": run_records(rows, keys), "sweeps": sweep_records},
            indent=1,
            default=str,
        )
    if fmt == "csv" or len(groups) < 2:
        groups = {None: rows}  # one table (CSV: one header for all rows)
    parts = []
    for task, members in groups.items():
        if len(groups) > 1:
            parts.append(("\n" if parts and fmt == "md" else "") + f"task {task or '?'}:")
        keys = differing_keys(members)
        header, cells = run_table(members, keys, exact=fmt == "csv")
        note = None
        if fmt == "table" and width is not None:
            header, cells, note = fit_table(header, cells, len(keys), width)
        parts.append(render(header, cells, fmt))
        if note:
            parts.append(note)
    if not rows:
        parts = [f"no runs in {root}"]
    for row in rows:
        if row.problem and fmt != "csv":
            parts.append(f"corrupt: {row.problem}")
    if sweep_cells and fmt != "csv":
        parts.append(("\n" if fmt == "md" else "") + f"sweeps in {root / 'sweeps'}:")
        parts.append(render(sweep_header, sweep_cells, fmt))
    return "\n".join(parts)


@user_errors_exit_2
def main(argv: Sequence[str] | None = None) -> int:
    """``runs list|compare ...``; see the module docstring.

    Returns:
        Exit code: 0, or 2 for a path that is not a run, a sweep or a runs root.
    """
    args = runs_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command == "list":
        print(list_command(args.root, args.format, None if args.wide else terminal_width()))
        return 0
    rows = collect(args.paths)
    if not args.mixed:
        check_comparable(rows)
    png, note = None, ""
    if not args.no_png:
        out = args.png or default_png(args.paths, rows)
        names = ", ".join(Path(p).name for p in args.paths)
        title = f"runs compare: {len(rows)} runs of {names[:90]}"
        try:
            png = plot_compare(rows, out, title=title, overwrite=args.overwrite)
        except StorageError as err:
            if args.png is not None:
                raise  # the user asked for that file: not writing it is a failure
            # The default place is beside the runs, which may be a read-only archive: the
            # table is what was asked for, so print it and say where no plot went.
            note = f"note: no plot written ({err}) Give --png PATH elsewhere, or --no-png."
    print(compare_output(rows, args.format, png))
    if note:
        print(" ".join(note.split()), file=sys.stderr)
    return 0
