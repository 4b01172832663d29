"""What both implementations of the vocab-parallel loss share: the wire format, the input checks, validation.

Wire format of the one tensor-parallel all-gather (one row per TP rank, float32 for every input dtype except
float64): STATS numbers per token, (m, s, t, zy) as defined in vocab_parallel.py's docstring, token-major, then
a TRAILER of three numbers: this rank's shard width, its input-check setting (0 / 1) and a bad-target flag.

Input checks (mile_megatron.loss.settings: on by default) need a host synchronisation: they read the gathered
trailers on every rank, so every rank sees the same rows and raises the same error (shard widths differ, a target
outside [0, V_pad)). The input-check setting itself must agree across the TP ranks (a rank that skipped a check
another rank raised on would wait for it in its next collective): with checks off the trailers are read once per
TP group and setting (after import or set_input_checks), a rank whose setting differs raises, and afterwards
nothing is read on the host. Nothing is read while a CUDA graph is being captured.
"""

from __future__ import annotations

import torch

from . import settings
from .parallel import ProcessGroup, group_size

STATS = 4  # m, s, t, zy per token
TRAILER = 3  # shard width, input-check setting (0 / 1), bad-target flag
FLOOR = -1.0e30  # logits below count as FLOOR in the statistics (vocab_parallel.py); z_y is read as is

_agreed: set = set()  # (TP group, setting generation) whose ranks were seen to share this process's setting


def capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def checks_active(device: torch.device) -> bool:
    """Whether this call runs the input checks (host synchronisation): on, and not inside CUDA graph capture."""
    return settings.input_checks() and not capturing(device)


def _agreement_key(group: ProcessGroup) -> tuple:
    """A TP group under the current input-check setting (set_input_checks starts a new generation)."""
    return (getattr(group, "group_name", None) or id(group), settings.input_checks_generation())


def must_read_trailer(checks: bool, group: ProcessGroup, device: torch.device) -> bool:
    """Checks on, or (checks off) the first call over a TP group > 1 since import or set_input_checks."""
    if checks:
        return True
    if group_size(group) == 1 or capturing(device):
        return False
    return _agreement_key(group) not in _agreed


def trailer_values(width: int, checks: bool, bad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """This rank's trailer (shard width, input-check setting, bad-target flag); fills only, no host-to-device copy."""
    def full(value):
        return torch.full((), value, dtype=like.dtype, device=like.device)

    return torch.stack([full(float(width)), full(float(checks)), full(0.0) if bad is None else bad.to(like.dtype)])


def check_trailers(trailer: torch.Tensor, checks: bool, group: ProcessGroup) -> None:
    """trailer [tp, 3] from every rank (one host read). Every rank sees the same rows: ranks with checks on raise
    the same error, and a setting that differs between ranks makes each rank that reads it (all at the first call
    after import / set_input_checks, then those with checks on) raise."""
    rows = trailer.tolist()
    settings = [bool(row[1]) for row in rows]
    if len(set(settings)) > 1:
        _agreed.discard(_agreement_key(group))
        seen = ", ".join(f"rank {r}: {'on' if on else 'off'}" for r, on in enumerate(settings))
        raise ValueError(
            f"the input-check setting (MILE_MEGATRON_INPUT_CHECKS / set_input_checks) differs across the "
            f"tensor-parallel ranks ({seen}); set it alike on every rank (a rank that skipped a check that "
            "another rank failed would wait for that rank in its next collective)"
        )
    _agreed.add(_agreement_key(group))
    if not checks:
        return
    widths = [int(row[0]) for row in rows]
    if len(set(widths)) > 1:
        raise ValueError(
            "vocab-parallel logits have different last dimensions on the tensor-parallel ranks "
            f"({widths}); every rank must hold an equal vocabulary shard "
            "(pad the vocabulary to a multiple of the TP size, as Megatron does)"
        )
    if any(row[2] != 0 for row in rows):
        vocab = widths[0] * len(rows)
        raise ValueError(
            f"target ids must lie in [0, {vocab}) (the padded vocabulary across all TP ranks); "
            "mask out ignored positions with loss_mask instead of negative or out-of-range ids"
        )


def validate_weight_parameters(gamma: float, sigma: float | None = None) -> None:
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0 (got {gamma}); gamma = 0 gives plain cross-entropy")
    if sigma is not None and not sigma >= 0:
        raise ValueError(f"sigma must be >= 0 (got {sigma}); the paper uses sigma = 1")


def validate_target(vocab_parallel_logits: torch.Tensor, target: torch.Tensor) -> None:
    if target.device != vocab_parallel_logits.device:
        raise ValueError(f"target is on device {target.device} but the logits are on {vocab_parallel_logits.device}; "
                         "move the target to the logits' device")
    if not vocab_parallel_logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor (got {vocab_parallel_logits.dtype})")
    if vocab_parallel_logits.dim() < 1 or tuple(target.shape) != tuple(vocab_parallel_logits.shape[:-1]):
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal the logits shape without its last (vocabulary) "
            f"dimension, {tuple(vocab_parallel_logits.shape[:-1])}"
        )
    if target.dtype.is_floating_point or target.dtype == torch.bool or target.is_complex():
        raise ValueError(f"target must hold integer token ids (got {target.dtype})")
