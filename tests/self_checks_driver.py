"""Run many modules' ``python -m`` self-checks in this one process, each as if it were run alone.

    python self_checks_driver.py RESULTS.jsonl WORKDIR REPO < checks.json

``checks.json``: ``[{"module": "core.nn.loss", "args": []}, ...]``. Each module runs with
``runpy.run_module(module, run_name="__main__", alter_sys=True)`` (so ``doctest.testmod()`` and
Lightning's launcher see the module as ``__main__``), with ``sys.argv = [module, *args]``, in a
fresh empty folder under ``WORKDIR`` as its working directory, and with its stdout and stderr
(file descriptors 1 and 2, so logging handlers and child processes are caught too) going to a
file. A check passes when it returns or raises ``SystemExit`` with code 0 or None.

Between checks the driver puts back what a check may change for the next one: the working
directory, ``sys.argv``, the environment, the signal handlers, the warning filters and the
handlers and levels of the loggers. ``RESULTS.jsonl`` gets a ``{"module", "started": true}`` line
before each check and a ``{"module", "ok", "seconds", "output"}`` line after it, so a check that
hangs or kills the process is still named by the caller. ``"changed"`` lists the files under
``REPO`` (outside ``.git``, ``.venv`` and caches) that the check created, changed or removed.
"""

from __future__ import annotations

import json
import logging
import os
import runpy
import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

SIGNALS = [s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP)]
"""Every signal whose handler a check may replace."""


SKIPPED = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache"}
"""Folders of the repository whose changes are not the checks' doing."""


def snapshot(repo: Path) -> dict[str, tuple[int, int]]:
    """``{relative path: (mtime in ns, size)}`` of each file of ``repo`` outside :data:`SKIPPED`."""
    out = {}
    for folder, subfolders, files in os.walk(repo):
        subfolders[:] = [d for d in subfolders if d not in SKIPPED]
        for name in files:
            path = Path(folder, name)
            stat = path.lstat()
            out[str(path.relative_to(repo))] = (stat.st_mtime_ns, stat.st_size)
    return out


def changed_files(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list:
    """The paths created, changed or removed between two :func:`snapshot` results."""
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def _loggers() -> dict[str, logging.Logger]:
    """The root logger and every named logger created so far."""
    named = logging.Logger.manager.loggerDict.items()
    return {"": logging.getLogger(), **{k: v for k, v in named if isinstance(v, logging.Logger)}}


def _restore_logging(saved: dict[str, tuple[list[logging.Handler], int, bool]]) -> None:
    """Close handlers a check added, put back the saved handlers, levels and propagation."""
    for name, logger in _loggers().items():
        handlers, level, propagate = saved.get(name, ([], logging.NOTSET, True))
        for handler in logger.handlers:
            if handler not in handlers:
                handler.close()
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


def _handlers() -> dict[int, object]:
    """The current handler of every signal that has one Python can read."""
    out = {}
    for sig in SIGNALS:
        try:
            out[sig] = signal.getsignal(sig)
        except (OSError, ValueError):  # pragma: no cover - platform-specific signals
            pass
    return out


def run_check(
    module: str, args: list[str], folder: Path, log: Path, path: Path | None = None
) -> tuple[bool, str]:
    """Run ``python -m module *args`` (or ``python path *args`` for a script) in this process
    inside ``folder``; its output goes to ``log``. Returns ``(passed, traceback or "")``."""
    env, cwd, argv = dict(os.environ), os.getcwd(), sys.argv[:]
    handlers = _handlers()
    saved_logging = {
        name: (list(lg.handlers), lg.level, lg.propagate) for name, lg in _loggers().items()
    }
    sys.stdout.flush()
    sys.stderr.flush()
    out_fd, err_fd = os.dup(1), os.dup(2)
    with open(log, "wb") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
    passed, error = True, ""
    try:
        os.chdir(folder)
        sys.argv = [module, *args]
        with warnings.catch_warnings():
            # An earlier check imported the module already; alone it would be fresh.
            warnings.filterwarnings("ignore", "'.*' found in sys.modules", RuntimeWarning)
            if path is None:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(str(path), run_name="__main__")
    except SystemExit as stop:
        if stop.code not in (None, 0):
            passed, error = False, f"SystemExit({stop.code!r})"
    except BaseException:  # a KeyboardInterrupt from a signal check is a failure too
        passed, error = False, traceback.format_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        os.close(out_fd)
        os.close(err_fd)
        os.chdir(cwd)
        sys.argv = argv
        os.environ.clear()
        os.environ.update(env)
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)
        _restore_logging(saved_logging)
    return passed, error


def main() -> None:
    results, workdir, repo = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    for check in json.load(sys.stdin):
        module, args = check["module"], check["args"]
        with results.open("a", encoding="utf-8") as out:
            out.write(json.dumps({"module": module, "started": True}) + "\n")
        folder = Path(tempfile.mkdtemp(prefix=module.replace(".", "_") + "-", dir=workdir))
        log = workdir / f"{module}.log"
        before, start = snapshot(repo), time.perf_counter()
        path = repo / check["path"] if check.get("path") else None
        passed, error = run_check(module, args, folder, log, path)
        seconds, after = time.perf_counter() - start, snapshot(repo)
        output = log.read_text(encoding="utf-8", errors="replace") + error
        record = {
            "module": module,
            "ok": passed,
            "seconds": round(seconds, 2),
            "output": output,
            "changed": changed_files(before, after),
        }
        with results.open("a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
