"""The one error type for bad settings of the command lines."""

from __future__ import annotations


class UsageError(ValueError):
    """A setting or combination of settings that cannot work; the message names it and says what to do.

    Command lines print it as `PROGRAM: error: MESSAGE` and exit with status 2, before any work starts where
    possible.
    """
