"""The model side of mile-pretrain: Megatron's own GPT model builder, with two seams of GPTModel used.

- The model is built by megatron-training's GPTModelBuilder from gpt_config_from_args(args) (as upstream's
  pretrain_gpt.py does), so every model and layer-spec flag Megatron accepts (--spec, --qk-layernorm,
  --transformer-impl, ...) takes effect exactly as in Megatron.
- GPTModel's output_processor (vocab_parallel_logits) makes the model return its output layer's vocab-parallel
  logits as a [b, s, V_pad/tp] view in the model's dtype: no contiguous [b, s, V] copy (GPTModel without labels)
  and, with model_forward_kwargs, no fp32 copy (Float16Module's fp32_output). The loss is computed from them
  (loss_func.py).
- The model config's finalize_model_grads_func is loss_func.StepNormalization (install_step_normalization).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def vocab_parallel_logits(*, hidden_states: torch.Tensor, output_layer: Any, output_weight: torch.Tensor | None,
                          runtime_gather_output: bool | None = None, scale_logits: Any = None,
                          **_: Any) -> torch.Tensor:
    """GPTModel output_processor: this TP rank's vocab-parallel logits [s, b, V_pad/tp] as a [b, s, V_pad/tp] view.

    GPTModel itself would return the labels' per-token CE, or (without labels) a contiguous [b, s, V] copy of the
    logits; the loss here reads the output layer's own tensor (no copy) and computes the loss from it.
    """
    logits, _ = output_layer(hidden_states, weight=output_weight, runtime_gather_output=runtime_gather_output)
    if scale_logits is not None:
        logits = scale_logits(logits)  # MuP output multiplier (identity unless --use-mup)
    return logits.transpose(0, 1)


def model_forward_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for `model(tokens, position_ids, attention_mask, labels=..., **kwargs)` so that it returns
    the vocab-parallel logits in the model's dtype: the output processor above and, with --bf16 / --fp16,
    fp32_output=False (Megatron's Float16Module would otherwise return an fp32 copy; the loss computes in fp32
    internally and rounds the gradient once to the logits' dtype)."""
    kwargs: dict[str, Any] = {"output_processor": vocab_parallel_logits}
    if args.fp16 or args.bf16:
        kwargs["fp32_output"] = False
    return kwargs


def gpt_model_config(args: argparse.Namespace) -> Any:
    """Megatron's GPTModelConfig from the parsed arguments, its step normalisation installed."""
    from megatron.training.argument_utils import gpt_config_from_args

    from .loss_func import install_step_normalization

    config = gpt_config_from_args(args)
    install_step_normalization(config)
    return config
