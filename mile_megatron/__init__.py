"""MiLe loss for Megatron-core pretraining: exact vocab-parallel MiLe / focal / cross-entropy losses.

The public API is the loss library's (mile_megatron.loss), re-exported here lazily so that `import mile_megatron`
stays cheap (torch is imported on first use). The rest of the package are its applications: engines/ (Megatron
and DeepSpeed trainers), data/ (The Pile -> indexed datasets), convert/ (checkpoints <-> Hugging Face),
evaluate/, hf/ (transformers glue), apps/ (mile-demo, mile-selfcheck).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = (
    "ALPHA_MODES", "LOSS_KINDS", "MileLossStats", "MileLossTerms", "TokenLosses", "mile_loss", "mile_loss_terms",
    "mile_loss_with_stats", "vocab_parallel_mile_cross_entropy", "vocab_parallel_focal_cross_entropy",
    "input_checks", "set_input_checks", "loss_backend", "set_loss_backend", "inplace_backward",
    "set_inplace_backward", "NO_GROUP", "LinearTokenLosses", "linear_vocab_parallel_cross_entropy",
    "linear_mile_loss_terms",
)

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mile_megatron' has no attribute {name!r}")
    value = getattr(importlib.import_module(".loss", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
