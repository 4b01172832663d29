"""The loss library's switches and the one parser of environment switches.

Switches (process-wide; set them alike on every rank):
    loss backend       set_loss_backend("auto" | "torch" | "triton"), env MILE_MEGATRON_LOSS_BACKEND
                       auto (default): the Triton kernels for CUDA tensors when triton imports, the torch path
                       otherwise; torch: always the torch path (the exact reference implementation, the CPU
                       default); triton: always the kernels (on CPU only under the Triton interpreter,
                       TRITON_INTERPRET=1 set before triton is imported: tests). Float64 logits and empty inputs
                       always take the torch path.
    in-place backward  set_inplace_backward(bool), env MILE_MEGATRON_INPLACE_BACKWARD (default off): the Triton
                       backward writes the logits gradient into the logits' memory (contract in
                       mile_megatron/loss/triton/function.py).
    input checks       set_input_checks(bool), env MILE_MEGATRON_INPUT_CHECKS (default on): the checks that need
                       a host synchronisation (target range, equal shard widths, the same setting on every TP
                       rank; mile_megatron/loss/common.py).

Environment values, one parser for every switch of the project:
    env_flag(name, default)             on:  1, true, yes, on     off: 0, false, no, off
    env_choice(name, choices, default)  one of `choices`
Case and surrounding spaces are ignored, an unset or empty variable gives the default; anything else raises
ValueError naming the variable, the value and what is accepted (a typo never silently picks a side).
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


# ---------------------------------------------------------------------------------------------------------------
# The loss library's switches
# ---------------------------------------------------------------------------------------------------------------

BACKENDS = ("auto", "torch", "triton")
_TRITON_DTYPES = ("float32", "bfloat16", "float16")

_backend = env_choice("MILE_MEGATRON_LOSS_BACKEND", BACKENDS, "auto")
_inplace = env_flag("MILE_MEGATRON_INPLACE_BACKWARD", False)
_input_checks = env_flag("MILE_MEGATRON_INPUT_CHECKS", True)
_input_checks_generation = 0  # bumped by set_input_checks: the next call re-verifies that TP ranks agree
_triton_import_error: str | None = None
_triton_checked = False


def set_loss_backend(name: str) -> None:
    """Choose the loss implementation: "auto" (Triton on CUDA, torch elsewhere), "torch" or "triton"."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown loss backend {name!r}; choose one of {', '.join(BACKENDS)}")
    _backend = name


def loss_backend_setting() -> str:
    """The current setting ("auto", "torch" or "triton")."""
    return _backend


def set_inplace_backward(enabled: bool) -> None:
    """Opt in to (or out of) writing the logits gradient into the logits' memory (Triton backward)."""
    global _inplace
    _inplace = bool(enabled)


def inplace_backward() -> bool:
    """Whether the Triton backward writes the gradient in place."""
    return _inplace


def set_input_checks(enabled: bool) -> None:
    """Switch the checks that need a host synchronisation (target range, equal shard widths across TP ranks).

    On by default; MILE_MEGATRON_INPUT_CHECKS sets it at import. They are skipped automatically while a CUDA graph
    is being captured. Call it alike on every rank: the next call over a TP group verifies that its ranks agree
    (one host read with checks off), and every rank raises ValueError if not.
    """
    global _input_checks, _input_checks_generation
    _input_checks = bool(enabled)
    _input_checks_generation += 1


def input_checks() -> bool:
    """Whether host-synchronising input checks are on."""
    return _input_checks


def input_checks_generation() -> int:
    """How many times set_input_checks was called (agreement between TP ranks is verified once per value)."""
    return _input_checks_generation


def triton_available() -> bool:
    """Whether triton imports (checked once, on first need)."""
    global _triton_checked, _triton_import_error
    if not _triton_checked:
        try:
            import triton  # noqa: F401
        except Exception as error:  # noqa: BLE001 - any import failure means "no triton"
            _triton_import_error = f"{type(error).__name__}: {error}"
        _triton_checked = True
    return _triton_import_error is None


def interpreting() -> bool:
    """Whether the kernels were built for the Triton interpreter (TRITON_INTERPRET=1 when they were imported)."""
    from .triton.kernels import INTERPRETED

    return INTERPRETED


def loss_backend(device) -> str:
    """"triton" or "torch": the implementation the loss functions use for tensors on `device`.

    Raises RuntimeError when the setting is "triton" and Triton cannot run there.
    """
    import torch

    device = torch.device(device)
    if _backend == "torch":
        return "torch"
    if _backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError(f"loss backend 'triton' was requested but triton does not import ({_triton_import_error}); "
                           "install triton or use set_loss_backend('auto') / MILE_MEGATRON_LOSS_BACKEND=auto")
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        raise RuntimeError(
            f"loss backend 'triton' needs CUDA tensors (got a {device.type} tensor); on CPU the kernels run only "
            "under the Triton interpreter (set TRITON_INTERPRET=1 before triton is imported, tests only). "
            "Use set_loss_backend('auto') to take the torch path on CPU."
        )
    return "triton"


def use_triton(logits) -> bool:
    """Whether this call goes to the Triton kernels (backend choice, then dtype and size: float64 and empty
    inputs take the torch path)."""
    if loss_backend(logits.device) != "triton":
        return False
    return str(logits.dtype).removeprefix("torch.") in _TRITON_DTYPES and logits.numel() > 0
