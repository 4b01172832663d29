"""MiLe loss for Megatron-core pretraining: exact vocab-parallel MiLe / focal / cross-entropy losses.

Exports are resolved lazily so that `import mile_megatron` stays cheap (torch is imported on first use).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ALPHA_MODES": "loss",
    "LOSS_KINDS": "loss",
    "MileLossStats": "loss",
    "MileLossTerms": "loss",
    "mile_loss": "loss",
    "mile_loss_with_stats": "loss",
    "mile_loss_terms": "loss",
    "TokenLosses": "vocab_parallel",
    "vocab_parallel_mile_cross_entropy": "vocab_parallel",
    "vocab_parallel_focal_cross_entropy": "vocab_parallel",
    "input_checks": "vocab_parallel",
    "set_input_checks": "vocab_parallel",
    "loss_backend": "kernels",
    "set_loss_backend": "kernels",
    "inplace_backward": "kernels",
    "set_inplace_backward": "kernels",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mile_megatron' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
