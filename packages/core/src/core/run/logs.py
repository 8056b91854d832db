"""Text logs and metric logs of a run.

- :func:`setup_logging`: Python logging to stderr and ``<run>/train.log`` (rank 0; other ranks
  print warnings and errors only, prefixed with their rank).
- :class:`MetricsLogger`: one JSON object per log event in ``<run>/metrics.jsonl`` (always),
  plus Weights & Biases and TensorBoard when enabled, and ``metrics.csv`` at the end.

Self-check: ``python -m core.run.logs``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from core.config.schema import LoggerConfig
from core.errors import FaultError, UserError

log = logging.getLogger(__name__)

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HANDLER_TAG = "_core_handler"


def setup_logging(run_dir: Path | None, rank: int = 0, level: int = logging.INFO) -> None:
    """Send log records to stderr and, on rank 0, to ``<run_dir>/train.log``.

    Calling it again (e.g. once the run folder is known) replaces the handlers it added before.

    Args:
        run_dir: the run folder, or None before it exists.
        rank: global rank of this process.
        level: level of rank 0 (other ranks log warnings and above).
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _HANDLER_TAG, False)]:
        root.removeHandler(handler)
        handler.close()
    fmt = _FORMAT if rank == 0 else f"[rank {rank}] {_FORMAT}"
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    setattr(stream, _HANDLER_TAG, True)
    root.addHandler(stream)
    if run_dir is not None and rank == 0:
        file = _RunLogHandler(Path(run_dir) / "train.log", encoding="utf-8")
        file.setFormatter(logging.Formatter(_FORMAT))
        setattr(file, _HANDLER_TAG, True)
        root.addHandler(file)
    root.setLevel(level if rank == 0 else logging.WARNING)
    # Libraries that are chatty at INFO level.
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _RunLogHandler(logging.FileHandler):
    """``train.log``: a full or read-only disk ends the file with one warning on stderr instead
    of a logging traceback per record (stderr still gets every record)."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        from core.run.storage import is_storage_error

        err = sys.exc_info()[1]
        if err is None or not is_storage_error(err):
            super().handleError(record)
            return
        logging.getLogger().removeHandler(self)
        print(f"warning: stopped writing {self.baseFilename}: {err}", file=sys.stderr)
        with contextlib.suppress(OSError):
            self.close()


def append_line(path: Path, line: str, what: str, hint: str = "") -> None:
    """Append ``line`` to a log file; a write that fails (full disk) leaves the file as it was,
    without half a line at its end.

    Raises:
        StorageError: naming the file, for a full or read-only disk.
    """
    from core.run.storage import storage_errors

    data = line.encode("utf-8")
    with storage_errors(what, path, hint=hint):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)


def _jsonable(value: Any) -> Any:
    """Plain Python numbers for tensors / numpy scalars; NaN and inf become strings."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _parse_metrics(path: Path) -> tuple[list[dict[str, Any]], str | None]:
    """The records of a ``metrics.jsonl`` file and its torn last line (None when whole).

    A process killed while appending leaves half a line at the end: that is dropped (the caller
    warns). A bad line before the last one is damage, not a crash: it is reported.

    Raises:
        FaultError: the file cannot be read, or a line other than the last is not a JSON object
            (named by path and line number).
    """
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise FaultError(f"Cannot read the metrics file {path}: {err}.") from None
    lines = text.split("\n")
    numbered = [(i, line) for i, line in enumerate(lines, start=1) if line.strip("\x00 \t\r")]
    records: list[dict[str, Any]] = []
    for position, (number, line) in enumerate(numbered):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not a record with a step")
        except ValueError as err:
            if position == len(numbered) - 1:
                return records, line
            raise FaultError(
                f"The metrics file {path} is corrupt at line {number} of {len(lines)} ({err}); "
                "only a torn last line is expected after a crash. Move the file aside (the run "
                "itself is intact) or repair that line."
            ) from None
        records.append(record)
    return records, None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file (missing file: empty list). A torn last line (the
    writer was killed mid-line) is dropped with a warning naming the file.

    Raises:
        FaultError: a corrupt line before the last (see :func:`_parse_metrics`).
    """
    path = Path(path)
    if not path.is_file():
        return []
    records, torn = _parse_metrics(path)
    if torn is not None:
        log.warning(
            "%s: dropped a torn last line (%d characters, a write cut short by a crash): %.60r",
            path,
            len(torn),
            torn,
        )
    return records


class MetricsLogger:
    """Writes metrics of rank 0 to ``metrics.jsonl`` and the optional loggers.

    Args:
        run_dir: the run folder.
        cfg: the ``logger`` config group.
        config: the resolved run config as plain data (sent to W&B).
        run_name: display name for W&B.
        enabled: False on ranks other than 0 (every call is then a no-op).
    """

    def __init__(
        self,
        run_dir: Path,
        cfg: LoggerConfig,
        config: Mapping[str, Any],
        run_name: str,
        enabled: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.enabled = enabled
        self.path = self.run_dir / "metrics.jsonl"
        self._wandb = None
        self._tensorboard = None
        if not enabled:
            return
        self.repair_tail()
        if cfg.wandb:
            self._wandb = self._start_wandb(config, run_name)
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise UserError(
                    "logger.tensorboard=true needs the tensorboard package: install "
                    "core[tensorboard] "
                    f"(uv sync --extra tensorboard) or set logger.tensorboard=false. ({err})"
                ) from None
            self._tensorboard = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def _start_wandb(self, config: Mapping[str, Any], run_name: str) -> Any:
        """Start (or resume, same id) a W&B run in ``<run>/wandb``; the key comes from the
        environment only."""
        import wandb

        mode = self.cfg.wandb_mode
        if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
            mode = os.environ[
                "WANDB_MODE"
            ]  # the user's environment wins, e.g. on nodes without network
        if mode == "online" and not os.environ.get("WANDB_API_KEY"):
            log.warning(
                "W&B: no WANDB_API_KEY in the environment; using the key of `wandb login` if "
                "there is one."
            )
        run_id_file = self.run_dir / ".wandb_id"
        run_id = run_id_file.read_text().strip() if run_id_file.is_file() else uuid.uuid4().hex[:12]
        run_id_file.write_text(run_id)
        return wandb.init(
            project=self.cfg.wandb_project,
            entity=self.cfg.wandb_entity,
            name=run_name,
            group=self.cfg.wandb_group,
            id=run_id,
            resume="allow",
            dir=str(self.run_dir),
            config=dict(config),
            mode=mode,
        )

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Write one log event.

        Args:
            metrics: ``{key: number}``, e.g. ``{"train/loss": 2.3, "lr": 1e-4}``.
            step: the optimizer step the metrics belong to.
        """
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        append_line(
            self.path,
            json.dumps(record) + "\n",
            "the training metrics",
            hint="Free space there (or move the run folder to a larger disk), then continue the "
            f"run with train run.dir={self.run_dir}: it resumes from its last checkpoint.",
        )
        numeric = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self._wandb is not None:
            self._wandb.log(numeric, step=int(step))
        if self._tensorboard is not None:
            for key, value in numeric.items():
                self._tensorboard.add_scalar(key, value, global_step=int(step))

    def repair_tail(self) -> bool:
        """Cut a torn last line off ``metrics.jsonl`` (a run killed mid-write) before appending
        to it, so that the next record starts on a line of its own; warns naming the file.

        Returns:
            Whether a torn line was removed.
        """
        if not self.path.is_file():
            return False
        data = self.path.read_bytes()
        body = data.rstrip(b"\x00 \t\r\n")
        start = body.rfind(b"\n") + 1  # the last non-empty line
        try:
            record = json.loads(body[start:])
            whole = isinstance(record, dict) and "step" in record
        except ValueError:
            whole = False
        if whole or not body:
            if data and not data.endswith(b"\n"):  # only the newline is missing
                with open(self.path, "ab") as handle:
                    handle.write(b"\n")
            return False
        with open(self.path, "r+b") as handle:
            handle.truncate(start)
        log.warning(
            "%s: removed a torn last line (%d bytes, a write cut short by a crash) before "
            "appending to it",
            self.path,
            len(data) - start,
        )
        return True

    def truncate_after(self, step: int) -> int:
        """Drop records after ``step`` (a resume repeats them), moving them to
        ``metrics.discarded.jsonl``.

        Args:
            step: the step the run resumes from.

        Returns:
            How many records were moved.
        """
        if not self.enabled or not self.path.is_file():
            return 0
        records, torn = _parse_metrics(self.path)
        keep = [r for r in records if r["step"] <= step]
        dropped = [r for r in records if r["step"] > step]
        if torn is not None:
            log.warning("%s: dropped a torn last line (%d characters)", self.path, len(torn))
        if dropped or torn is not None:
            with open(self.run_dir / "metrics.discarded.jsonl", "a", encoding="utf-8") as handle:
                handle.writelines(json.dumps(r) + "\n" for r in dropped)
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
            os.replace(tmp, self.path)
        return len(dropped)

    def write_csv(self) -> Path | None:
        """Write ``metrics.csv`` with one column per key seen (empty cells where a key is
        absent)."""
        if not self.enabled or not self.cfg.csv:
            return None
        records = read_metrics(self.path)
        if not records:
            return None
        from core.run.storage import is_storage_error

        columns = ["step"] + sorted({k for r in records for k in r} - {"step"})
        out = self.run_dir / "metrics.csv"
        try:
            with open(out, "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns)
                writer.writeheader()
                writer.writerows(records)
        except OSError as err:
            if not is_storage_error(err):
                raise
            # metrics.csv is a copy of metrics.jsonl: a full disk here does not fail the run
            out.unlink(missing_ok=True)
            log.warning("Could not write %s (%s); metrics.jsonl holds the same records.", out, err)
            return None
        return out

    def close(self) -> None:
        """Flush and close the optional loggers."""
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


if __name__ == "__main__":  # self-check: python -m core.run.logs
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        setup_logging(Path(tmp))
        logger = MetricsLogger(Path(tmp), LoggerConfig(), {}, "selfcheck")
        for step in range(1, 6):
            logger.log({"train/loss": 1.0 / step, "lr": 1e-3}, step)
        logger.log({"val/loss": 0.5}, 5)
        assert logger.truncate_after(3) == 3
        logger.write_csv()
        logging.getLogger("core").info("hello from the self-check")
        print((Path(tmp) / "metrics.csv").read_text(), end="")
        assert "hello" in (Path(tmp) / "train.log").read_text()
    print("core.run.logs: ok")


class LogProgress:
    """The part of tqdm's interface the trainer uses, writing a log line at most every
    ``interval`` seconds: ``step 533/2500 (21%), 1.56 steps/s, ETA 0:21:00, loss=3.57, lr=9.4e-04``.

    Args:
        total: steps of the run.
        initial: steps already done (after a resume).
        interval: seconds between lines.
    """

    def __init__(self, total: int, initial: int = 0, interval: float = 30.0) -> None:
        self.total, self.n, self.interval = total, initial, interval
        self.start_n, self.start = initial, time.perf_counter()
        self.last = self.start
        self.postfix: dict[str, Any] = {}

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        """Remember values to show on the next line."""
        self.postfix.update(values)

    def update(self, n: int = 1) -> None:
        """Count ``n`` steps; log a line when ``interval`` has passed or at the last step."""
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.interval or self.n >= self.total:
            self.last = now
            rate = (self.n - self.start_n) / max(now - self.start, 1e-9)
            eta = (self.total - self.n) / rate if rate > 0 else float("nan")
            extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
            eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
            log.info(
                "step %d/%d (%d%%), %.2f steps/s, ETA %s%s",
                self.n,
                self.total,
                100 * self.n // max(self.total, 1),
                rate,
                eta_text,
                extra,
            )

    def close(self) -> None:
        """Nothing to release."""


def transformers_quiet() -> None:
    """Silence transformers' progress bars (they flood SLURM log files)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        return
    hf_logging.disable_progress_bar()
