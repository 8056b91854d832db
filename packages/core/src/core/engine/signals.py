"""Graceful stop on SIGTERM / SIGUSR1 (preemption, SLURM time limit) and Ctrl-C (SIGINT).

The handler only records the signal; the trainer looks at :attr:`StopSignal.received` at each
optimizer-step boundary, saves a checkpoint there and stops cleanly. Nothing heavy runs inside
a signal handler. A second Ctrl-C stops at once (``KeyboardInterrupt``), for when the step
boundary is too far away.

One delivery is one request, however many copies of it arrive: without a terminal a SIGINT sent
to the process group (a script, a supervisor, ``scancel --signal=INT``) reaches the trainer
directly *and* through ``uv run`` (or ``srun``), which forwards it to its child. Copies of a
signal that arrive within :data:`REPEAT_WINDOW` seconds of the first are one request; only a
SIGINT later than that counts as the second Ctrl-C.

The copies can outlive the training loop: ``uv run`` relays a SIGINT 200 ms after it got it
(to give a terminal's own delivery time to land first), and a short step plus checkpoint may end
``fit`` sooner. So on leaving the context, the stop signal's handler stays in place until the
window has passed (a later delivery goes to the handler that was there before), and if the
process exits inside the window it ignores the signal for its last moments: Python puts back the
default action while it shuts down, which would otherwise turn a copy into "killed by SIGINT",
exit 130, after a clean stop.

Self-check: ``python -m core.engine.signals``.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import subprocess
import time
from types import FrameType
from typing import Any

from core.run.folder import slurm_job_key

log = logging.getLogger(__name__)

# Seconds within which copies of a signal are one request. A forwarding parent (uv, srun) relays a
# signal as soon as it is woken by it, within milliseconds even on a loaded node; a person who
# means "stop now" presses Ctrl-C again after reading the "will checkpoint" message, which takes
# longer than this. 1 s keeps both apart with a wide margin on each side.
REPEAT_WINDOW = 1.0

STOP_SIGNALS = tuple(
    s
    for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None), signal.SIGINT)
    if s is not None
)


# Signal number -> time.monotonic() until which its deliveries are copies of a request that a
# finished StopSignal has already handled. Read at interpreter exit (_ignore_copies_at_exit).
_COPIES_UNTIL: dict[int, float] = {}


def _ignore_copies_at_exit() -> None:
    """At exit, ignore the signals whose copies may still be on their way.

    Python restores the default action of every signal it handled while it shuts down (after the
    atexit callbacks), so a copy landing then would kill the process (exit 128 + signal number)
    after it stopped cleanly. Ignoring the signal is safe: the process is exiting anyway.
    """
    now = time.monotonic()
    for sig, until in _COPIES_UNTIL.items():
        if now < until:
            signal.signal(sig, signal.SIG_IGN)


atexit.register(_ignore_copies_at_exit)


class StopSignal:
    """Installs handlers for SIGTERM, SIGUSR1 and SIGINT while active (a context manager).

    Attributes:
        received: the first signal number received, or None.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._received_at = 0.0  # time.monotonic() of the first signal
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._is_copy():
            return  # a copy of the same delivery (process group + uv's / srun's forwarding)
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without a checkpoint
        if self.received is None:
            self.received = signum
            self._received_at = time.monotonic()
            # Logging from a handler is safe enough here: the trainer is in Python code.
            hint = " (Ctrl-C again stops at once, without one)" if signum == signal.SIGINT else ""
            log.warning(
                "Received %s: will checkpoint and stop at the next step boundary%s.",
                signal.Signals(signum).name,
                hint,
            )

    def __enter__(self) -> StopSignal:
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a notebook worker)
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            if sig == self.received and self._is_copy():
                until = self._received_at + REPEAT_WINDOW
                _COPIES_UNTIL[sig] = max(_COPIES_UNTIL.get(sig, 0.0), until)
                signal.signal(sig, self._copies_then(previous))
            else:
                signal.signal(sig, previous)
        self._previous.clear()

    def _is_copy(self) -> bool:
        """Whether a delivery now is a copy of the request already received."""
        return self.received is not None and time.monotonic() - self._received_at < REPEAT_WINDOW

    def _copies_then(self, previous: Any) -> Any:
        """A handler for after the context: drops copies of the handled request, then hands
        every later delivery to ``previous`` (the handler from before the context)."""

        def handle(signum: int, frame: FrameType | None) -> None:
            if self._is_copy():
                return
            signal.signal(signum, previous)  # the window is over: the signal is previous's again
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                os.kill(os.getpid(), signum)  # deliver again, to the default action

        return handle

    @property
    def name(self) -> str | None:
        """Name of the received signal (``SIGTERM``), or None."""
        return signal.Signals(self.received).name if self.received is not None else None


def requeue_slurm_job() -> bool:
    """Ask SLURM to requeue this job (``scontrol requeue $SLURM_JOB_ID``; in a job array
    ``<array job id>_<task id>``).

    Returns:
        True if ``scontrol`` accepted the request.
    """
    if not os.environ.get("SLURM_JOB_ID"):
        return False
    # One task of an array may carry the array's own job id as its SLURM_JOB_ID; requeueing
    # that id would requeue (and interrupt) every task of the array, not just this one.
    job = slurm_job_key()
    if not job:
        return False
    try:
        # Requeueing ends this job's steps: SLURM sends SIGTERM to every process of the step,
        # scontrol included, and could kill it before it reports the requeue it just made. A
        # shell that ignores SIGTERM execs it (an ignored signal stays ignored across exec).
        done = subprocess.run(
            ["sh", "-c", 'trap "" TERM; exec scontrol requeue "$0"', job],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError) as err:
        log.error("Could not requeue SLURM job %s: %s", job, err)
        return False
    if done.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job, done.stderr.strip())
        return False
    log.warning("Requeued SLURM job %s; it will resume from the checkpoint just written.", job)
    return True


if __name__ == "__main__":  # self-check: python -m core.engine.signals
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == signal.SIGUSR1, stop.received
        print("caught", stop.name)
    with StopSignal() as stop:  # one delivery, three copies (group + forwarding): one request
        for _ in range(3):
            os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == signal.SIGINT, stop.received
        time.sleep(REPEAT_WINDOW + 0.1)
        try:  # later: the second Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)
            raise AssertionError("a later SIGINT must stop at once")
        except KeyboardInterrupt:
            print("copies merged; a later SIGINT stops at once")
    with StopSignal() as stop:  # the loop ends before uv's copy (200 ms later) arrives
        os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGINT)  # the copy, after the context: dropped
    _ignore_copies_at_exit()  # exiting inside the window: the copy may land at shutdown
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
    time.sleep(REPEAT_WINDOW + 0.1)
    try:  # after the window a SIGINT is the previous handler's again
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("a SIGINT after the window must reach the previous handler")
    except KeyboardInterrupt:
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        print("a copy after the loop is dropped; a later SIGINT is the previous handler's")
    print("core.engine.signals: ok")
