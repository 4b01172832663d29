"""mile-pretrain: Megatron-core's own training loop with the MiLe loss.

    cli.py        the command line (arguments, presets, refusals, run / main)
    model.py      Megatron's GPT model builder; GPTModel's output_processor returns the vocab-parallel logits
    batch.py      Megatron's datasets and batch helpers (TP broadcast, CP split)
    loss_func.py  forward_step and the loss function; StepNormalization (the exact step objective)
    metrics.py    tokens/s and MFU beside Megatron's own throughput

The names the Megatron-LM patch imports are re-exported here.
"""

from .loss_func import (ForwardHooks, StepNormalization, add_megatron_loss_arguments, forward_step,
                        install_step_normalization, logits_loss_func, mile_loss_func, validate_loss)
from .model import model_forward_kwargs, vocab_parallel_logits

__all__ = ["ForwardHooks", "StepNormalization", "add_megatron_loss_arguments", "forward_step",
           "install_step_normalization", "logits_loss_func", "mile_loss_func", "model_forward_kwargs",
           "validate_loss", "vocab_parallel_logits"]
