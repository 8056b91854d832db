"""The exception types a command turns into one paragraph instead of a traceback.

Every command catches :class:`UserError` at its top, prints the message as one paragraph and
exits with its ``exit_code``: 2 for a mistake in the input (:class:`UserError`,
:class:`ConfigError`), 1 for a fault the run met and the user can act on (:class:`FaultError`:
a full or read-only disk, a dead peer rank, a non-finite loss). Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


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
