"""The scalar training loss: mean over counted tokens of alpha * w * CE, with MiLe, focal or CE weights.

    loss = sum_i alpha * w_i * CE_i * mask_i / sum_i mask_i          (this rank's tokens)

alpha (no gradient) rescales the weights so that they average to one:
    "global":   alpha = sum(mask) / sum(w * mask), both sums over every counted token of every data-parallel rank
                (one all-reduce of two numbers). The loss is then a true weighted mean of CE over the global batch.
    "official": the paper's code: each rank takes 1 / mean(w) over ALL its positions, masked ones included (their
                CE counts as 0, so a focal weight there is 0^gamma and a MiLe weight is (sigma + H)^gamma), and
                alpha is the mean of these reciprocals over the data-parallel ranks. A rank whose weights are all
                zero contributes 1 (the paper's code would divide by zero).
    "none":     alpha = 1.
Data-parallel averaging of gradients stays with the usual DP reduction; the all-reduce here only shares alpha.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .parallel import ProcessGroup, all_reduce_sum, group_size, resolve_dp_group
from .vocab_parallel import validate_target, validate_weight_parameters, weighted_vocab_parallel_cross_entropy

LOSS_KINDS = ("mile", "focal", "ce")
ALPHA_MODES = ("global", "official", "none")


class MileLossStats(NamedTuple):
    """mile_loss and the sums behind it, over this rank's counted tokens. Only loss and loss_sum carry gradients.

    loss = loss_sum / num_tokens (0 when no token counts); ce_sum / num_tokens is the plain cross-entropy.
    """

    loss: torch.Tensor
    loss_sum: torch.Tensor
    ce_sum: torch.Tensor
    entropy_sum: torch.Tensor
    num_tokens: torch.Tensor
    alpha: torch.Tensor


def _validate(kind: str, alpha: str, gamma: float, sigma: float) -> None:
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; choose one of {', '.join(LOSS_KINDS)}")
    if alpha not in ALPHA_MODES:
        raise ValueError(f"unknown alpha mode {alpha!r}; choose one of {', '.join(ALPHA_MODES)}")
    validate_weight_parameters(gamma, sigma)


def _official_weight(kind: str, weight: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Weights as the paper's code sees them at every position: a masked position has CE = 0."""
    if kind == "focal":
        return torch.where(mask > 0, weight, torch.zeros_like(weight).pow(gamma))
    return weight  # MiLe weights do not depend on CE; CE weights are 1


def _alpha(kind, mode, weight, mask, gamma, dp_group) -> torch.Tensor:
    if mode == "none":
        return torch.ones((), dtype=torch.float32, device=weight.device)
    if mode == "global":
        sums = torch.stack([mask.sum(), (weight * mask).sum()]).float()
        all_reduce_sum(sums, dp_group)
        counted, weighted = sums.unbind()
        return torch.where(weighted > 0, counted / weighted, torch.ones_like(weighted))
    mean_weight = _official_weight(kind, weight, mask, gamma).float().mean()
    reciprocal = torch.where(mean_weight > 0, 1.0 / mean_weight, torch.ones_like(mean_weight))
    all_reduce_sum(reciprocal, dp_group)
    return reciprocal / group_size(dp_group)


def mile_loss_with_stats(
    vocab_parallel_logits: torch.Tensor,
    target: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    *,
    kind: str = "mile",
    gamma: float = 1.0,
    sigma: float = 1.0,
    alpha: str = "global",
    tp_group: ProcessGroup = None,
    dp_group: ProcessGroup = None,
) -> MileLossStats:
    """Like mile_loss, also returning the sums a trainer logs or reduces itself (see MileLossStats)."""
    _validate(kind, alpha, gamma, sigma)
    validate_target(vocab_parallel_logits, target)
    if loss_mask is None:
        mask = torch.ones(target.shape, dtype=torch.float32, device=target.device)
    else:
        if tuple(loss_mask.shape) != tuple(target.shape):
            raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)} must equal target shape {tuple(target.shape)}")
        mask = loss_mask.float()
        # Ignored positions may hold any id (e.g. -100); they are counted nowhere, so any valid id will do.
        target = torch.where(mask > 0, target, torch.zeros_like(target))

    (token_loss, ce, entropy), weight = weighted_vocab_parallel_cross_entropy(
        vocab_parallel_logits, target, kind, gamma, sigma, tp_group
    )
    scale = _alpha(kind, alpha, weight, mask, gamma, resolve_dp_group(dp_group)).detach()

    num_tokens = mask.sum()
    loss_sum = scale * (token_loss * mask).sum()
    loss = loss_sum / torch.where(num_tokens > 0, num_tokens, torch.ones_like(num_tokens))
    return MileLossStats(
        loss=loss,
        loss_sum=loss_sum,
        ce_sum=(ce * mask).sum(),
        entropy_sum=(entropy * mask).sum(),
        num_tokens=num_tokens,
        alpha=scale,
    )


def mile_loss(
    vocab_parallel_logits: torch.Tensor,
    target: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    *,
    kind: str = "mile",
    gamma: float = 1.0,
    sigma: float = 1.0,
    alpha: str = "global",
    tp_group: ProcessGroup = None,
    dp_group: ProcessGroup = None,
) -> torch.Tensor:
    """sum(alpha * w * CE * mask) / sum(mask) over this rank's tokens; 0 (zero gradient) if nothing is counted.

    kind: "mile" (w = (sigma + H)^gamma), "focal" (w = (1 - p_y)^gamma) or "ce" (w = 1); alpha: see module doc.
    tp_group / dp_group = None: Megatron's tensor- / data-parallel group when initialised, else no parallelism.
    """
    return mile_loss_with_stats(
        vocab_parallel_logits,
        target,
        loss_mask,
        kind=kind,
        gamma=gamma,
        sigma=sigma,
        alpha=alpha,
        tp_group=tp_group,
        dp_group=dp_group,
    ).loss

