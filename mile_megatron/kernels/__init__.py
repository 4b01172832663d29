"""Fused Triton kernels for the vocab-parallel losses, and the switch that chooses them.

The public loss functions (mile_megatron.vocab_parallel, mile_megatron.loss) pick their implementation per call:

    backend "auto" (default): Triton for CUDA tensors when triton imports, the torch path otherwise;
    backend "torch": always the torch path (the exact reference implementation, and the CPU default);
    backend "triton": always Triton; on CPU this works only under the Triton interpreter (TRITON_INTERPRET=1
                      set before triton is imported; slow, for tests), otherwise it raises.

Set it with set_loss_backend() or, at import, the environment variable MILE_MEGATRON_LOSS_BACKEND (parsed by
mile_megatron.settings: case and surrounding spaces ignored, anything unknown raises ValueError). Float64 logits
always take the torch path (it computes in float64; the kernels compute in float32 like the torch path does for
every other dtype). Both paths compute the same quantities with the same formulas (see kernels/triton_loss.py).

In-place backward (opt-in: set_inplace_backward(True) or MILE_MEGATRON_INPLACE_BACKWARD=1 at import): the Triton
backward writes the logits gradient into the logits' own memory instead of a new tensor, saving one
logits-sized allocation. Contract: after the loss's backward the logits (and every tensor sharing their memory)
hold the gradient, so nothing else may need their values afterwards; the backward may run only once (no
retain_graph re-use). The logits' autograd version counter is bumped, so another autograd node that saved them
fails loudly ("modified by an inplace operation") instead of using wrong values. Megatron's output layer saves
its input and weight, not the logits, so the usual training step satisfies the contract. Leaf tensors and views
of leaves (their values belong to the caller) and layouts that map two positions to one address (expanded
tensors) get a new gradient tensor regardless.
"""

from __future__ import annotations

import torch

from ..settings import env_choice, env_flag

BACKENDS = ("auto", "torch", "triton")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _backend_from_environment() -> str:
    return env_choice("MILE_MEGATRON_LOSS_BACKEND", BACKENDS, "auto")


_backend = _backend_from_environment()
_inplace = env_flag("MILE_MEGATRON_INPLACE_BACKWARD", False)
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
    """Opt in to (or out of) writing the logits gradient into the logits' memory; see the module docstring."""
    global _inplace
    _inplace = bool(enabled)


def inplace_backward() -> bool:
    """Whether the Triton backward writes the gradient in place."""
    return _inplace


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
    from . import triton_loss

    return triton_loss.INTERPRETED


def loss_backend(device: torch.device | str) -> str:
    """"triton" or "torch": the implementation the loss functions use for tensors on `device`.

    Raises RuntimeError when the setting is "triton" and Triton cannot run there.
    """
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


def use_triton(logits: torch.Tensor) -> bool:
    """Whether this call goes to the Triton kernels (backend choice, then dtype and size: float64 and empty
    inputs take the torch path)."""
    if loss_backend(logits.device) != "triton":
        return False
    return logits.dtype in _TRITON_DTYPES and logits.numel() > 0


__all__ = [
    "BACKENDS",
    "inplace_backward",
    "interpreting",
    "loss_backend",
    "loss_backend_setting",
    "set_inplace_backward",
    "set_loss_backend",
    "triton_available",
    "use_triton",
]
