"""MiLe, focal and cross-entropy losses for Hugging Face causal language models.

The same implementation as the Megatron path (mile_megatron.loss: mile_loss_with_stats, so the fused kernels
run on GPU when available), applied to full-vocabulary logits [..., S, V] of one model replica:

    shifted labels:  position t predicts token t + 1, i.e. logits[..., :-1, :] against labels[..., 1:]
                     (transformers' convention); with pre-shifted labels (shift=False, or transformers'
                     `shift_labels`) logits[..., t, :] is scored against labels[..., t].
    counted tokens:  mask = (label != ignore_index) * loss_mask   (ignore_index -100 by default)
    loss_sum       = sum_t alpha * w_t * CE_t * mask_t            (w: MiLe (sigma + H)^gamma, focal, or 1)
    loss           = loss_sum / sum_t mask_t                      (this micro-batch's counted tokens), or
                   = loss_sum / num_items_in_batch                 when given (transformers' gradient
                     accumulation: the number of counted tokens of the whole optimizer step).

alpha (mile_megatron.loss): "global" = sum(mask) / sum(w * mask) over this micro-batch of every rank of
dp_group (dp_group None: this process only), "official" = the paper's code, "none" = 1. The logits are never
sharded here: the tensor-parallel group is "none", never Megatron's even when Megatron is initialised in the
same process.

causal_lm_loss_terms gives a micro-batch's numerator and denominator instead (mile_megatron.loss.MileLossTerms),
for trainers that normalise over a whole optimizer step of accumulated micro-batches (mile-pretrain-ds).
"""

from __future__ import annotations

from typing import Any

import torch

from mile_megatron.loss import (MileLossStats, MileLossTerms, mile_loss_terms, mile_loss_with_stats,
                                validate_loss_settings)
from mile_megatron.loss.parallel import NO_GROUP, ProcessGroup

IGNORE_INDEX = -100


def _shift(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None, ignore_index: int,
           keep_positions: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Align labels with the logits that predict them (position t predicts token t + 1).

    keep_positions: keep all S logits and give the last position the ignore label (no copy of the logits;
    identical loss, statistics and gradient unless alpha is "official", whose mean runs over positions);
    otherwise drop the last position as logits[..., :-1, :].
    """
    if keep_positions:
        shifted = torch.nn.functional.pad(labels[..., 1:], (0, 1), value=ignore_index)
        if loss_mask is not None:
            loss_mask = torch.nn.functional.pad(loss_mask[..., 1:], (0, 1), value=0)
        return logits, shifted, loss_mask
    return logits[..., :-1, :], labels[..., 1:], None if loss_mask is None else loss_mask[..., 1:]


def _aligned(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None, ignore_index: int,
             shift: bool, keep_positions: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, labels, float mask) aligned position by position, on the logits' device."""
    if logits.dim() < 2 or tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal the logits shape without the vocabulary "
                         f"dimension, {tuple(logits.shape[:-1])} (logits are [batch, sequence, vocabulary])")
    if loss_mask is not None and tuple(loss_mask.shape) != tuple(labels.shape):
        raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)} must equal the labels shape {tuple(labels.shape)}")
    labels = labels.to(logits.device)
    if loss_mask is not None:
        loss_mask = loss_mask.to(logits.device)
    if shift:
        logits, labels, loss_mask = _shift(logits, labels, loss_mask, ignore_index, keep_positions)
    mask = labels != ignore_index
    mask = mask.float() if loss_mask is None else mask.float() * loss_mask.float()
    return logits, labels, mask


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    kind: str = "mile",
    gamma: float = 1.0,
    sigma: float = 1.0,
    alpha: str = "global",
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: int | torch.Tensor | None = None,
    dp_group: ProcessGroup = None,
    shift: bool = True,
    loss_mask: torch.Tensor | None = None,
) -> MileLossStats:
    """The loss of a causal LM micro-batch with the sums behind it (module docstring for the formulas).

    logits: [..., S, V] any float dtype (fp32 statistics inside, gradient in the logits' dtype); labels: [..., S]
    token ids, ignore_index where nothing is predicted. shift=True: labels are the input ids (transformers'
    `labels=`); shift=False: labels[..., t] is the target of logits[..., t, :] (Megatron's datasets,
    transformers' `shift_labels`). loss_mask (optional, [..., S], aligned like labels) further zeroes tokens
    (e.g. Megatron's eod mask). dp_group: the data-parallel group that alpha "global"/"official" averages over
    (None: this process only). Returns MileLossStats: loss (differentiable; loss_sum / num_items_in_batch when
    given), loss_sum, ce_sum, entropy_sum, num_tokens (this process's counted tokens), alpha.
    """
    validate_loss_settings(kind, alpha, gamma, sigma)
    logits, labels, mask = _aligned(logits, labels, loss_mask, ignore_index, shift, keep_positions=alpha != "official")
    stats = mile_loss_with_stats(logits, labels, mask, kind=kind, gamma=gamma, sigma=sigma, alpha=alpha,
                                 tp_group=NO_GROUP, dp_group=NO_GROUP if dp_group is None else dp_group)
    if num_items_in_batch is None:
        return stats
    if not isinstance(num_items_in_batch, torch.Tensor) and not num_items_in_batch >= 0:
        raise ValueError(f"num_items_in_batch must be a count of tokens >= 0 (got {num_items_in_batch})")
    count = torch.as_tensor(num_items_in_batch, device=stats.loss_sum.device).to(stats.loss_sum.dtype)
    loss = stats.loss_sum / torch.where(count > 0, count, torch.ones_like(count))
    return stats._replace(loss=loss)


def causal_lm_loss_terms(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    kind: str = "mile",
    gamma: float = 1.0,
    sigma: float = 1.0,
    alpha: str = "global",
    ignore_index: int = IGNORE_INDEX,
    dp_group: ProcessGroup = None,
    shift: bool = True,
    loss_mask: torch.Tensor | None = None,
) -> MileLossTerms:
    """A causal LM micro-batch's numerator and denominator of the step loss (mile_megatron.loss.mile_loss_terms):
    labels, shift and masks as in causal_lm_loss; no data-parallel collective unless alpha is "official"."""
    validate_loss_settings(kind, alpha, gamma, sigma)
    logits, labels, mask = _aligned(logits, labels, loss_mask, ignore_index, shift, keep_positions=alpha != "official")
    return mile_loss_terms(logits, labels, mask, kind=kind, gamma=gamma, sigma=sigma, alpha=alpha,
                           tp_group=NO_GROUP, dp_group=NO_GROUP if dp_group is None else dp_group)


def _detached(stats: MileLossStats) -> MileLossStats:
    return MileLossStats(*(value.detach() for value in stats))


class MileCausalLMLoss:
    """A transformers-compatible loss callable; the last call's statistics (detached) are in `last_stats`.

    - As a model's loss function (`model.loss_function = MileCausalLMLoss(...)`, or use_mile_loss):
      called as (logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
      **kwargs) -> scalar loss; `shift_labels` (already aligned with the logits) replaces the shift of labels.
    - As `Trainer(compute_loss_func=...)`: called as (outputs, labels, num_items_in_batch=None) -> scalar, where
      outputs has `.logits` (or ["logits"]).
    """

    def __init__(self, kind: str = "mile", gamma: float = 1.0, sigma: float = 1.0, alpha: str = "global",
                 dp_group: ProcessGroup = None) -> None:
        validate_loss_settings(kind, alpha, gamma, sigma)
        self.kind, self.gamma, self.sigma, self.alpha, self.dp_group = kind, gamma, sigma, alpha, dp_group
        self.last_stats: MileLossStats | None = None

    def __repr__(self) -> str:
        return (f"MileCausalLMLoss(kind={self.kind!r}, gamma={self.gamma}, sigma={self.sigma}, "
                f"alpha={self.alpha!r})")

    def __call__(self, logits: Any = None, labels: torch.Tensor | None = None, vocab_size: int | None = None,
                 num_items_in_batch: int | torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX,
                 shift_labels: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if logits is None:
            logits = kwargs.pop("outputs", None)
        if not isinstance(logits, torch.Tensor):  # Trainer: compute_loss_func(outputs, labels, num_items_in_batch)
            outputs = logits
            logits = outputs["logits"] if isinstance(outputs, dict) else getattr(outputs, "logits", None)
            if not isinstance(logits, torch.Tensor):
                raise TypeError(f"expected logits or model outputs with .logits, got {type(outputs).__name__}")
        if vocab_size is not None and logits.shape[-1] != vocab_size:
            raise ValueError(f"logits have {logits.shape[-1]} columns but vocab_size is {vocab_size}")
        if shift_labels is not None:
            labels, shift = shift_labels, False
        elif labels is not None:
            shift = True
        else:
            raise ValueError("MileCausalLMLoss needs labels (or shift_labels)")
        stats = causal_lm_loss(logits, labels, kind=self.kind, gamma=self.gamma, sigma=self.sigma, alpha=self.alpha,
                               ignore_index=ignore_index, num_items_in_batch=num_items_in_batch,
                               dp_group=self.dp_group, shift=shift)
        self.last_stats = _detached(stats)
        return stats.loss


def use_mile_loss(model: Any, kind: str = "mile", gamma: float = 1.0, sigma: float = 1.0, alpha: str = "global",
                  dp_group: ProcessGroup = None) -> MileCausalLMLoss:
    """Make `model(input_ids, labels=...)` (a transformers causal LM) return this loss; returns the callable.

    Sets the model's `loss_function` (transformers' hook for a custom loss) to MileCausalLMLoss(...).
    """
    if not hasattr(type(model), "loss_function"):
        raise TypeError(f"{type(model).__name__} has no transformers loss_function hook; pass a PreTrainedModel "
                        "(e.g. LlamaForCausalLM), or call causal_lm_loss on its logits")
    loss = MileCausalLMLoss(kind, gamma, sigma, alpha, dp_group)
    model.loss_function = loss
    return loss
