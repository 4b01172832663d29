"""Environment switches of the loss library, parsed one way everywhere.

    env_flag(name, default)             on:  1, true, yes, on     off: 0, false, no, off
    env_choice(name, choices, default)  one of `choices`

Case is ignored, surrounding spaces are ignored, an unset or empty variable gives the default; anything else
raises ValueError naming the variable, the value and what is accepted (a typo never silently picks a side).

This module imports nothing from the project (it is the settings module of the loss library).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

TRUE_VALUES = ("1", "true", "yes", "on")
FALSE_VALUES = ("0", "false", "no", "off")


def _raw(name: str) -> str:
    return os.environ.get(name, "").strip().lower()


def env_flag(name: str, default: bool) -> bool:
    """The boolean switch `name` from the environment (see the module docstring)."""
    value = _raw(name)
    if not value:
        return bool(default)
    if value in TRUE_VALUES:
        return True
    if value in FALSE_VALUES:
        return False
    raise ValueError(f"environment variable {name}={os.environ[name]!r} is not a boolean; "
                     f"use one of {', '.join(TRUE_VALUES)} (on) or {', '.join(FALSE_VALUES)} (off)")


def env_choice(name: str, choices: Sequence[str], default: str) -> str:
    """The setting `name` from the environment, one of `choices` (lower-case names; see the module docstring)."""
    if default not in choices:
        raise ValueError(f"default {default!r} of {name} is not one of {', '.join(choices)}")
    value = _raw(name)
    if not value:
        return default
    if value in choices:
        return value
    raise ValueError(f"environment variable {name}={os.environ[name]!r} is not valid; "
                     f"use one of {', '.join(choices)}")


__all__ = ["FALSE_VALUES", "TRUE_VALUES", "env_choice", "env_flag"]
