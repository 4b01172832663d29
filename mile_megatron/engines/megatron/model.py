"""The model side of mile-pretrain: Megatron's own GPT model builder, with two seams of GPTModel used.

- The model is built by megatron-training's GPTModelBuilder from gpt_config_from_args(args) (as upstream's
  pretrain_gpt.py does), so every model and layer-spec flag Megatron accepts (--spec, --qk-layernorm,
  --transformer-impl, ...) takes effect exactly as in Megatron.
- GPTModel's output_processor is the output layer and the loss fused (fused_loss_terms, --mile-fused-output-layer,
  on by default): the model returns the micro-batch's loss terms (mile_megatron.loss.linear_mile_loss_terms from
  the final hidden states and the output weight; the logits never exist whole). With
  --no-mile-fused-output-layer it is vocab_parallel_logits: the output layer's vocab-parallel logits as a
  [b, s, V_pad/tp] view in the model's dtype (no contiguous [b, s, V] copy, and with model_forward_kwargs no fp32
  copy from Float16Module's fp32_output), and the loss is computed from them (loss_func.py).
- The model config's finalize_model_grads_func is loss_func.StepNormalization (install_step_normalization).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
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


@dataclass(frozen=True)
class FusedLossSettings:
    """What fused_loss_terms needs from the command line (GPTModel hands it over as output_processor_context)."""

    kind: str
    gamma: float
    sigma: float
    alpha: str
    chunk_tokens: int | None


def pack_terms(terms: Any) -> torch.Tensor:
    """MileLossTerms -> float32 [7] in its field order (the model's output; only the numerator has a gradient)."""
    import torch

    return torch.stack([value.float() if index == 0 else value.detach().float()
                        for index, value in enumerate(terms)])


def unpack_terms(packed: torch.Tensor) -> Any:
    """The inverse of pack_terms (the numerator a tensor of its own, not a view: Megatron frees the loss's storage
    after the pipeline's backward, which it refuses for views)."""
    from mile_megatron.loss import MileLossTerms

    numerator, *others = packed.unbind()
    return MileLossTerms(numerator.clone(), *others)


def fused_loss_terms(*, hidden_states: torch.Tensor, output_layer: Any, output_weight: torch.Tensor | None,
                     labels: torch.Tensor, loss_mask: torch.Tensor, context: FusedLossSettings,
                     **_: Any) -> torch.Tensor:
    """GPTModel output_processor: the micro-batch's loss terms from the final hidden states [s(/tp), b, h] and this
    TP rank's output weight, the output layer's matmul fused into the loss (linear_mile_loss_terms) with its
    sequence parallelism, TP group and gradient-accumulation fusion; returned packed (pack_terms)."""
    from mile_megatron.loss import linear_mile_loss_terms

    weight = output_weight if output_weight is not None else output_layer.weight
    terms = linear_mile_loss_terms(
        hidden_states, weight, labels.t(), loss_mask.t(), kind=context.kind, gamma=context.gamma,
        sigma=context.sigma, alpha=context.alpha, tp_group=getattr(output_layer, "tp_group", None),
        sequence_parallel=bool(getattr(output_layer, "sequence_parallel", False)),
        chunk_tokens=context.chunk_tokens,
        gradient_accumulation_fusion=bool(getattr(output_layer, "gradient_accumulation_fusion", False)))
    return pack_terms(terms)


def model_forward_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for `model(tokens, position_ids, attention_mask, labels=..., loss_mask=..., **kwargs)`:
    the fused output processor and its settings (the model returns packed loss terms), or with
    --no-mile-fused-output-layer the logits processor (the model returns the vocab-parallel logits); with
    --bf16 / --fp16 also fp32_output=False (Megatron's Float16Module would otherwise return an fp32 copy of the
    logits; the loss computes in fp32 internally and rounds the gradient once to the logits' dtype)."""
    if getattr(args, "mile_fused_output_layer", False):
        kwargs: dict[str, Any] = {
            "output_processor": fused_loss_terms,
            "output_processor_context": FusedLossSettings(args.loss, args.mile_gamma, args.mile_sigma,
                                                          args.mile_alpha, args.mile_chunk_tokens)}
    else:
        kwargs = {"output_processor": vocab_parallel_logits}
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
