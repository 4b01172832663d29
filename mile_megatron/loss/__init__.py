"""The MiLe loss library: exact vocab-parallel MiLe / focal / cross-entropy losses and their step objective.

It imports torch (and triton, for CUDA tensors) and nothing else from mile_megatron:

    objective.py       mile_loss, mile_loss_with_stats, mile_loss_terms: alpha modes, masking, the step objective
    vocab_parallel.py  per-token losses over a TP-sharded vocabulary (torch autograd function, backend dispatch)
    linear.py          the output layer and the loss fused (chunked over tokens: the logits never exist whole)
    common.py          the all-gather wire format and the input checks, shared by both implementations
    triton/            the fused kernels (kernels.py), their launchers and autograd function (function.py)
    settings.py        backend / in-place / input-check switches; the one parser of environment switches
    parallel.py        process groups (Megatron's when initialised) and the collectives
    arguments.py       the loss flags (--loss, --mile-*) for command lines
    reference.py       plain float64 implementations: the tests' ground truth
"""

from __future__ import annotations

from .arguments import add_loss_arguments
from .linear import LinearTokenLosses, linear_mile_loss_terms, linear_vocab_parallel_cross_entropy
from .objective import (ALPHA_MODES, LOSS_KINDS, MileLossStats, MileLossTerms, mile_loss, mile_loss_terms,
                        mile_loss_with_stats, validate_loss_settings)
from .parallel import NO_GROUP, ProcessGroup
from .settings import (BACKENDS, inplace_backward, input_checks, loss_backend, loss_backend_setting,
                       set_inplace_backward, set_input_checks, set_loss_backend)
from .vocab_parallel import (TokenLosses, vocab_parallel_focal_cross_entropy, vocab_parallel_mile_cross_entropy,
                             weighted_vocab_parallel_cross_entropy)

__all__ = [
    "ALPHA_MODES", "BACKENDS", "LOSS_KINDS", "LinearTokenLosses", "linear_mile_loss_terms",
    "linear_vocab_parallel_cross_entropy", "MileLossStats", "MileLossTerms", "NO_GROUP", "ProcessGroup",
    "TokenLosses", "add_loss_arguments", "inplace_backward", "input_checks", "loss_backend", "loss_backend_setting",
    "mile_loss", "mile_loss_terms", "mile_loss_with_stats", "set_inplace_backward", "set_input_checks",
    "set_loss_backend", "validate_loss_settings", "vocab_parallel_focal_cross_entropy",
    "vocab_parallel_mile_cross_entropy", "weighted_vocab_parallel_cross_entropy",
]
