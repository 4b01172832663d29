"""The scalar training loss: alpha-normalised weighted cross-entropy with MiLe, focal or CE weights.

One optimizer step sees micro-batches k = 1..K on data-parallel (x context-parallel) ranks r. With per-token
weights w (no gradient), CE and mask m, every alpha mode is the ratio of two sums over the whole step:

    L = sum_{k,r} numerator_{k,r} / sum_{k,r} denominator_{k,r}

    "global":   numerator = sum(w * CE * m),            denominator = sum(w * m)
                i.e. alpha = sum(m) / sum(w * m) over every counted token of the step: L is a true weighted mean
                of CE over the global batch, whatever the micro-batch size, accumulation count or DP size.
    "none":     numerator = sum(w * CE * m),            denominator = sum(m)                    (alpha = 1)
    "official": numerator = alpha_k * sum(w * CE * m),  denominator = sum(m)
                the paper's code, per micro-batch: each rank takes 1 / mean(w) over ALL its positions of the
                micro-batch (masked ones included: their CE counts as 0, so a focal weight there is 0^gamma and a
                MiLe weight is (sigma + H)^gamma), alpha_k is the mean of these reciprocals over the data-parallel
                ranks (one all-reduce in the forward), and a rank whose weights are all zero contributes 1 (the
                paper's code would divide by zero). It depends on how the step is split into micro-batches.

Because w carries no gradient, a trainer back-propagates each micro-batch's numerator as it comes and divides the
step's summed gradients once by the global sum of denominators (mile_loss_terms: no data-parallel collective in
the forward except the paper's own "official" rule). A single call (mile_loss / mile_loss_with_stats) is the step
of one micro-batch: it reduces the two sums over dp_group itself (one all-reduce of two numbers).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .common import validate_target, validate_weight_parameters
from .parallel import ProcessGroup, all_reduce_sum, group_size, resolve_dp_group
from .vocab_parallel import weighted_vocab_parallel_cross_entropy

LOSS_KINDS = ("mile", "focal", "ce")
ALPHA_MODES = ("global", "official", "none")


class MileLossTerms(NamedTuple):
    """One micro-batch's share of a step's loss L = sum(numerator) / sum(denominator) (sums over the step's
    micro-batches and data-parallel ranks; see the module docstring). Float32 scalars over this rank's counted
    tokens; only `numerator` carries a gradient.

    numerator:   sum(alpha * w * CE * mask)
    denominator: sum(w * mask) for alpha "global", else sum(mask)
    alpha:       the factor inside the numerator: the paper's per-micro-batch value for "official", else 1 (the
                 "global" alpha, sum(mask) / sum(w * mask) over the step, is the ratio of the step's sums)
    """

    numerator: torch.Tensor
    denominator: torch.Tensor
    ce_sum: torch.Tensor
    entropy_sum: torch.Tensor
    weight_sum: torch.Tensor
    num_tokens: torch.Tensor
    alpha: torch.Tensor


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


def validate_loss_settings(kind: str, alpha: str, gamma: float, sigma: float) -> None:
    """ValueError naming the bad setting: unknown kind or alpha mode, gamma or sigma below 0."""
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


def _official_alpha(kind: str, weight: torch.Tensor, mask: torch.Tensor, gamma: float,
                    dp_group: ProcessGroup) -> torch.Tensor:
    """The paper's per-micro-batch alpha: mean over the DP ranks of 1 / mean(w over all positions)."""
    mean_weight = _official_weight(kind, weight, mask, gamma).float().mean()
    reciprocal = torch.where(mean_weight > 0, 1.0 / mean_weight, torch.ones_like(mean_weight))
    all_reduce_sum(reciprocal, dp_group)
    return reciprocal / group_size(dp_group)


def counted_mask(target: torch.Tensor, loss_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(target with any valid id at ignored positions, float32 mask)."""
    if loss_mask is None:
        return target, torch.ones(target.shape, dtype=torch.float32, device=target.device)
    if tuple(loss_mask.shape) != tuple(target.shape):
        raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)} must equal target shape {tuple(target.shape)}")
    if loss_mask.device != target.device:
        raise ValueError(f"loss_mask is on {loss_mask.device} but target is on {target.device}; put both on the "
                         "logits' device")
    mask = loss_mask.float()
    # Ignored positions may hold any id (e.g. -100); they are counted nowhere, so any valid id will do.
    return torch.where(mask > 0, target, torch.zeros_like(target)), mask


def terms_from_tokens(token_loss: torch.Tensor, ce: torch.Tensor, entropy: torch.Tensor, weight: torch.Tensor,
                      mask: torch.Tensor, kind: str, gamma: float, alpha: str,
                      dp_group: ProcessGroup) -> MileLossTerms:
    """MileLossTerms of one micro-batch from its per-token results (any implementation) and float mask."""
    # where, not a product: a masked position may hold CE = inf (its placeholder id 0 on a -inf logit)
    counted = mask > 0
    weighted = torch.where(counted, token_loss * mask, torch.zeros_like(token_loss)).sum()
    weight_sum = (weight * mask).sum()
    num_tokens = mask.sum()
    if alpha == "official":
        scale = _official_alpha(kind, weight, mask, gamma, resolve_dp_group(dp_group)).detach()
    else:
        scale = torch.ones((), dtype=torch.float32, device=weighted.device)
    return MileLossTerms(
        numerator=scale * weighted,
        denominator=weight_sum if alpha == "global" else num_tokens,
        ce_sum=torch.where(counted, ce * mask, torch.zeros_like(ce)).sum(),
        entropy_sum=(entropy * mask).sum(),
        weight_sum=weight_sum,
        num_tokens=num_tokens,
        alpha=scale,
    )


def mile_loss_terms(
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
) -> MileLossTerms:
    """One micro-batch's numerator and denominator of the step loss (module docstring), for trainers that
    accumulate micro-batches: back-propagate `numerator` per micro-batch, then divide the step's summed gradients
    once by sum(denominator) over the step's micro-batches and data-parallel ranks.

    The forward has one tensor-parallel all-gather and, for alpha "global" and "none", no data-parallel collective
    (dp_group is used only by "official"). tp_group / dp_group = None: Megatron's groups when initialised.
    """
    validate_loss_settings(kind, alpha, gamma, sigma)
    validate_target(vocab_parallel_logits, target)
    target, mask = counted_mask(target, loss_mask)
    (token_loss, ce, entropy), weight = weighted_vocab_parallel_cross_entropy(
        vocab_parallel_logits, target, kind, gamma, sigma, tp_group
    )
    return terms_from_tokens(token_loss, ce, entropy, weight, mask, kind, gamma, alpha, dp_group)


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
    terms = mile_loss_terms(vocab_parallel_logits, target, loss_mask, kind=kind, gamma=gamma, sigma=sigma,
                            alpha=alpha, tp_group=tp_group, dp_group=dp_group)
    loss_sum, scale = terms.numerator, terms.alpha
    if alpha == "global":  # alpha = sum(mask) / sum(w * mask) over dp_group: one all-reduce of two numbers
        sums = all_reduce_sum(torch.stack([terms.num_tokens, terms.weight_sum]).float(), resolve_dp_group(dp_group))
        counted, weighted = sums.unbind()
        scale = torch.where(weighted > 0, counted / weighted, torch.ones_like(weighted)).detach()
        loss_sum = scale * loss_sum
    num_tokens = terms.num_tokens
    loss = loss_sum / torch.where(num_tokens > 0, num_tokens, torch.ones_like(num_tokens))
    return MileLossStats(
        loss=loss,
        loss_sum=loss_sum,
        ce_sum=terms.ce_sum,
        entropy_sum=terms.entropy_sum,
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

    kind: "mile" (w = (sigma + H)^gamma), "focal" (w = (1 - p_y)^gamma) or "ce" (w = 1); alpha: see module doc
    (a single call is one micro-batch's step: "global" shares alpha over dp_group).
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
