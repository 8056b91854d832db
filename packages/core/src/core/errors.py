"""The exception types a command turns into one paragraph instead of a traceback.

Every command catches :class:`UserError` at its top, prints the message as one paragraph and
exits with its ``exit_code``: 2 for a mistake in the input (:class:`UserError`,
:class:`ConfigError`), 1 for a fault the run met and the user can act on (:class:`FaultError`:
a full or read-only disk, a dead peer rank, a non-finite loss). Anything else is a bug and keeps
its traceback. :func:`user_errors_exit_2` is that top: a decorator for command entry points.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar


class UserError(Exception):
    """A mistake in the user's config, command line or input data.

    The message says what is wrong, where (key, file and line) and how to fix it.
    """

    exit_code = 2


class ConfigError(UserError):
    """A config key that does not exist, or a value of the wrong type or out of range."""


class FaultError(UserError):
    """A fault of the machine or the run, not of the input: a full or read-only disk, a peer rank
    that died, a loss that became NaN. One paragraph (what, where, how to go on), exit code 1."""

    exit_code = 1


F = TypeVar("F", bound=Callable[..., int])


def fail(message: str, code: int = 2) -> int:
    """Print ``error: <message>`` as one paragraph (one line, so paths stay copyable) to stderr
    and return ``code``."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return code


def user_errors_exit_2(func: F) -> F:
    """Decorator for command entry points: ``UserError`` -> message + exit code 2, Ctrl-C -> 130."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        try:
            return func(*args, **kwargs)
        except UserError as err:
            return fail(str(err), err.exit_code)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper  # type: ignore[return-value]


if __name__ == "__main__":  # self-check: python -m core.errors
    import contextlib
    import io

    @user_errors_exit_2
    def _command(exc: BaseException | None) -> int:
        if exc is not None:
            raise exc
        return 0

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        codes = [
            _command(None),
            _command(UserError("bad\n  input")),
            _command(FaultError("disk full")),
            _command(KeyboardInterrupt()),
        ]
    assert codes == [0, 2, 1, 130], codes
    assert err.getvalue().splitlines() == ["error: bad input", "error: disk full", "interrupted"]
    print("core.errors: ok")
