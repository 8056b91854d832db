"""``runs``: list and compare run folders and sweeps, as tables and one PNG of overlaid curves.

    runs list [ROOT] [--format table|md|csv|json] [--wide]
    runs compare RUN_OR_SWEEP ... [--format table|md|csv|json] [--png PATH | --no-png] [--overwrite]
                 [--mixed]

- ``runs list`` prints one row per run folder under ``ROOT`` (default ``runs``; a sweep folder
  lists its points): number, name, status, steps, best monitored metric and its step, wall time,
  and the config keys whose values differ between the listed runs. Runs of several tasks get
  one table per task. On a terminal the table is cut to its width (long values shortened, the
  last differing keys left out and named); ``--wide`` (or a pipe) shows everything. A run whose
  summary says ``running`` but whose process is gone shows as ``stopped (no live process)``; an
  unreadable ``summary.json`` as ``corrupt``, with its path below the table. Sweeps under
  ``ROOT/sweeps`` get one row each.
- ``runs compare`` prints the same table for the given runs (a sweep stands for its points),
  sorted by the monitored metric (best first), and writes one PNG that overlays their training
  loss, validation loss and monitored metric. Points that differ only in ``trainer.seed`` are
  also summarised as one row each, with mean ± std of the best metric over the seeds. Runs of
  different tasks or monitored metrics are not ranked against each other unless ``--mixed``
  (then each metric is ranked on its own).

Everything is read from what the trainer writes: ``config.yaml``, ``summary.json``,
``metrics.jsonl`` (and ``sweep.yaml`` for sweeps). The PNG is never written over a file that
``runs compare`` did not write itself (:mod:`core.run.outputs`), unless ``--overwrite``.

Modules (one per section of the former ``core/report.py``):

- :mod:`core.report.rows`: reading run folders and sweeps into rows; comparing them.
- :mod:`core.report.tables`: the tables (terminal, Markdown, CSV, JSON) of ``list`` and
  ``compare``.
- :mod:`core.report.plot`: the PNG of overlaid curves that ``runs compare`` writes.
- :mod:`core.report.command`: the ``runs`` command (``list``, ``compare``).

Self-check: ``python -m core.report`` (the doctests of rows, a list and a compare of two runs
with their PNG).
"""

from core.report.command import (
    list_command,
    main,
    runs_parser,
    terminal_width,
)
from core.report.plot import (
    PNG_MARK,
    default_png,
    plot_compare,
)
from core.report.rows import (
    IGNORED_KEYS,
    SEED_KEY,
    STOPPED,
    Group,
    RunRow,
    check_comparable,
    collect,
    differing_keys,
    flatten,
    is_run,
    is_sweep,
    list_runs,
    load_run,
    ranked,
    seed_groups,
    split_name,
    sweep_rows,
)
from core.report.tables import (
    FORMATS,
    KEY_CELL_WIDTH,
    compare_output,
    compare_sweep_text,
    fit_table,
    group_table,
    render,
    run_records,
    run_table,
    sweep_list_rows,
)

__all__ = [
    "FORMATS",
    "IGNORED_KEYS",
    "SEED_KEY",
    "PNG_MARK",
    "STOPPED",
    "KEY_CELL_WIDTH",
    "RunRow",
    "Group",
    "flatten",
    "split_name",
    "is_run",
    "is_sweep",
    "load_run",
    "sweep_rows",
    "list_runs",
    "collect",
    "differing_keys",
    "ranked",
    "check_comparable",
    "seed_groups",
    "run_records",
    "run_table",
    "group_table",
    "render",
    "fit_table",
    "compare_output",
    "compare_sweep_text",
    "sweep_list_rows",
    "plot_compare",
    "default_png",
    "runs_parser",
    "terminal_width",
    "list_command",
    "main",
]
