"""Run bad-input cases of one task in one process, the way the console scripts run them.

    python bad_input_driver.py TASK WATCHED_FOLDER < cases.json

``cases.json``: ``[{"command": ..., "argv": [...]}, ...]``. For each case the command function
(``<task>.cli.COMMANDS[command]``) is called with ``argv`` exactly as its console script does
(``sys.exit(command(argv))``): its return value is the exit code, an exception escaping it is the
traceback a user would see. Every file under ``WATCHED_FOLDER`` is hashed before and after each
case. Prints one line ``RESULTS [{"code", "stderr", "changed", "created"}, ...]``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import sys
import traceback
from pathlib import Path


def snapshot(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file below ``folder``."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def main() -> None:
    task, watched = sys.argv[1], Path(sys.argv[2])
    commands = importlib.import_module(f"{task}.cli").COMMANDS
    results = []
    for case in json.load(sys.stdin):
        before = snapshot(watched)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = commands[case["command"]](case["argv"])
            except SystemExit as exit_:
                code = exit_.code
            except BaseException:  # what a user would see as a traceback
                code = "traceback"
                err.write(traceback.format_exc())
        after = snapshot(watched)
        results.append(
            {
                "code": code,
                "stderr": err.getvalue(),
                "changed": sorted(k for k in before if after.get(k) != before[k]),
                "created": sorted(k for k in after if k not in before),
            }
        )
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()


def run_many() -> None:
    """Cases of several tasks in one process, with their standard output too.

    Reads ``{"watched": [folder, ...], "cases": [{"task", "command", "argv"}, ...]}`` from stdin;
    prints ``RESULTS [{"code", "stdout", "stderr", "changed", "created"}, ...]`` where
    ``changed`` / ``created`` cover every watched folder (paths as ``<folder>/<relative>``).
    Used by ``test_faults_outputs.py``: ``python -c "import bad_input_driver as d; d.run_many()"``.
    """
    spec = json.load(sys.stdin)
    watched = [Path(w) for w in spec["watched"]]

    def all_files() -> dict[str, str]:
        return {f"{w}/{k}": v for w in watched for k, v in snapshot(w).items()}

    results = []
    for case in spec["cases"]:
        commands = importlib.import_module(f"{case['task']}.cli").COMMANDS
        before = all_files()
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = commands[case["command"]](case["argv"])
            except SystemExit as exit_:
                code = exit_.code
            except BaseException:  # what a user would see as a traceback
                code = "traceback"
                err.write(traceback.format_exc())
        after = all_files()
        results.append(
            {
                "code": code,
                "stdout": out.getvalue(),
                "stderr": err.getvalue(),
                "changed": sorted(k for k in before if after.get(k) != before[k]),
                "created": sorted(k for k in after if k not in before),
            }
        )
    print("RESULTS " + json.dumps(results))
