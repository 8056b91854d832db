"""The one exception type for mistakes a user can fix (bad config, bad input, missing files).

Every command catches :class:`UserError` at its top, prints the message as one paragraph and
exits with code 2, without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's config, command line or input data.

    The message says what is wrong, where (key, file and line) and how to fix it.
    """

    exit_code = 2


class ConfigError(UserError):
    """A config key that does not exist, or a value of the wrong type or out of range."""
