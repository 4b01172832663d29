"""Plain float64 reference for the MiLe, focal and cross-entropy losses (the tests' ground truth).

Written for clarity, not speed: one device, no tensor or data parallelism, everything in float64.
Tensor-parallel inputs are given as the list of per-rank vocabulary shards (rank r owns columns
[r*Vl, (r+1)*Vl)) and simply concatenated; data-parallel inputs are a list of per-rank batches.

Per token, with z the full logits row (all V_pad columns, padding included) and y the target id:
    log p  = log_softmax(z)                       (float64, shift-stable)
    CE     = -log p_y
    H      = -sum_j xlogy(p_j, p_j)               (exact: no clamp, 0 * log 0 = 0)
    w      = (sigma + H) ** gamma                 kind "mile"
           = (1 - p_y) ** gamma                   kind "focal"   (1 - p_y computed as -expm1(-CE))
           = 1                                    kind "ce"
    loss   = w * CE                               (w is a constant for the gradient)
    -inf logits (masked vocabulary entries) need no special case: log p = -inf and p = 0 there, xlogy(0, 0) = 0,
    so H is the entropy of the remaining distribution; a target on a -inf logit has CE = +inf, as in
    F.cross_entropy, with a finite gradient (p_y = 0). A row that is -inf everywhere gives NaN (as F.cross_entropy).

Scalar loss of one data-parallel rank r (mask m, N_r = sum m over rank r's tokens):
    L_r = sum(alpha * w * CE * m) / N_r           (L_r = 0 when N_r == 0)
    alpha "global":   sum_r N_r / sum_r sum(w * m)            (all DP ranks)
    alpha "official": mean_r a_r,  a_r = 1 / mean_all_positions(w'),
                      w' = w at counted positions and, at masked positions, the rule evaluated at
                      CE = 0: mile (sigma + H)^gamma, focal (1 - e^0)^gamma = 0^gamma, ce 1
    alpha "none":     1
    (alpha is undefined, returned as nan, where its rule divides by zero: all weights zero, or no token at all)

Gradients (closed form, weight and alpha constant; stated here because the tests rely on them):
    per-token losses with upstream gradient u (same shape as the target):
        dLoss/dz = u * w * (p - onehot(y))
    scalar L_r with upstream gradient g (a number):
        dL_r/dz  = g * alpha * m * w / N_r * (p - onehot(y))        (0 when N_r == 0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

KINDS = ("mile", "focal", "ce")
ALPHAS = ("global", "official", "none")

Logits = torch.Tensor | Sequence[torch.Tensor]


def full_logits(logits: Logits) -> torch.Tensor:
    """The full [..., V_pad] float64 logits from a tensor or from the list of per-TP-rank shards."""
    if isinstance(logits, torch.Tensor):
        return logits.detach().to(torch.float64)
    shards = [shard.detach().to(torch.float64) for shard in logits]
    if len({shard.shape[:-1] for shard in shards}) != 1:
        raise ValueError("reference: all logits shards must have the same leading shape")
    return torch.cat(shards, dim=-1)


def split_vocab(full: torch.Tensor, tp_size: int) -> list[torch.Tensor]:
    """Split the last (vocabulary) dimension into tp_size equal shards, rank order."""
    if full.shape[-1] % tp_size:
        raise ValueError(f"reference: vocabulary {full.shape[-1]} is not divisible by tp_size {tp_size}")
    return list(torch.chunk(full, tp_size, dim=-1))


def _check_kind(kind: str, gamma: float, sigma: float) -> None:
    if kind not in KINDS:
        raise ValueError(f"reference: unknown kind {kind!r}; expected one of {KINDS}")
    if gamma < 0 or sigma < 0:
        raise ValueError(f"reference: gamma and sigma must be >= 0 (got gamma={gamma}, sigma={sigma})")


def weight_rule(kind: str, ce: torch.Tensor, entropy: torch.Tensor, gamma: float, sigma: float) -> torch.Tensor:
    """w(CE, H) per token, float64."""
    if kind == "mile":
        return (sigma + entropy) ** gamma
    if kind == "focal":
        one_minus_p_target = -torch.expm1(-ce)  # 1 - exp(-CE) without cancellation
        return one_minus_p_target ** gamma  # torch: 0 ** 0 == 1, so gamma=0 gives w=1
    return torch.ones_like(ce)


@dataclass(frozen=True)
class RefTokens:
    """Per-token float64 quantities (shape of the target unless noted)."""

    loss: torch.Tensor  # w * CE
    ce: torch.Tensor
    entropy: torch.Tensor
    weight: torch.Tensor
    prob: torch.Tensor  # softmax, [..., V_pad]
    target: torch.Tensor  # int64


def token_losses(logits: Logits, target: torch.Tensor, *, kind: str = "mile", gamma: float = 1.0,
                 sigma: float = 1.0) -> RefTokens:
    """Per-token loss, CE, exact entropy and weight in float64."""
    _check_kind(kind, gamma, sigma)
    z = full_logits(logits)
    target = target.detach().to(torch.int64)
    if target.shape != z.shape[:-1]:
        raise ValueError(f"reference: target shape {tuple(target.shape)} != logits shape[:-1] {tuple(z.shape[:-1])}")
    vocab = z.shape[-1]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= vocab):
        raise ValueError(f"reference: target ids must lie in [0, {vocab})")
    log_p = torch.log_softmax(z, dim=-1)
    p = log_p.exp()
    ce = -log_p.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    entropy = -torch.special.xlogy(p, p).sum(-1)
    w = weight_rule(kind, ce, entropy, gamma, sigma)
    return RefTokens(loss=w * ce, ce=ce, entropy=entropy, weight=w, prob=p, target=target)


def token_losses_grad(tokens: RefTokens, upstream: torch.Tensor | float = 1.0) -> torch.Tensor:
    """d(sum(upstream * loss))/dz = upstream * w * (p - onehot(y)), float64 [..., V_pad]."""
    u = torch.as_tensor(upstream, dtype=torch.float64).expand(tokens.target.shape)
    onehot = torch.nn.functional.one_hot(tokens.target, tokens.prob.shape[-1]).to(torch.float64)
    return (u * tokens.weight).unsqueeze(-1) * (tokens.prob - onehot)


class RefBatch(NamedTuple):
    """One data-parallel rank's micro-batch: logits (tensor or TP shards), target, optional mask."""

    logits: Logits
    target: torch.Tensor
    loss_mask: torch.Tensor | None = None


@dataclass(frozen=True)
class RefRankLoss:
    """mile_loss / mile_loss_with_stats of one data-parallel rank, float64."""

    loss: float  # sum(alpha * w * CE * m) / N  (0 when N == 0)
    loss_sum: float  # sum(alpha * w * CE * m)
    ce_sum: float
    entropy_sum: float
    num_tokens: float
    alpha: float  # nan where the rule divides by zero; then loss, loss_sum and grads are nan unless N == 0
    grad: torch.Tensor  # dloss/dz for the scalar upstream gradient given, [..., V_pad]
    loss_sum_grad: torch.Tensor  # dloss_sum/dz for upstream 1
    tokens: RefTokens


def _alpha_terms(kind: str, tokens: RefTokens, mask: torch.Tensor, gamma: float, sigma: float) -> float:
    """a_r for the official rule: 1 / mean over ALL positions of w' (CE := 0 at masked positions)."""
    counted = mask != 0
    masked_weight = weight_rule(kind, torch.zeros_like(tokens.ce), tokens.entropy, gamma, sigma)
    w_prime = torch.where(counted, tokens.weight, masked_weight)
    mean_w = float(w_prime.mean()) if w_prime.numel() else math.nan
    return 1.0 / mean_w if mean_w != 0 else math.inf


def mile_loss_reference(batches: RefBatch | Sequence[RefBatch], *, kind: str = "mile", gamma: float = 1.0,
                        sigma: float = 1.0, alpha: str = "global",
                        upstream: float = 1.0) -> list[RefRankLoss]:
    """mile_loss for every data-parallel rank (one RefBatch per rank, in DP rank order)."""
    if isinstance(batches, RefBatch):
        batches = [batches]
    if alpha not in ALPHAS:
        raise ValueError(f"reference: unknown alpha {alpha!r}; expected one of {ALPHAS}")
    per_rank = []
    for batch in batches:
        tokens = token_losses(batch.logits, batch.target, kind=kind, gamma=gamma, sigma=sigma)
        mask = (torch.ones_like(tokens.ce) if batch.loss_mask is None
                else batch.loss_mask.detach().to(torch.float64))
        if mask.shape != tokens.ce.shape:
            raise ValueError("reference: loss_mask shape must equal the target shape")
        per_rank.append((tokens, mask))

    if alpha == "none":
        alpha_value = 1.0
    elif alpha == "global":
        num = sum(float(mask.sum()) for _, mask in per_rank)
        den = sum(float((tokens.weight * mask).sum()) for tokens, mask in per_rank)
        alpha_value = num / den if den != 0 else math.nan
    else:
        terms = [_alpha_terms(kind, tokens, mask, gamma, sigma) for tokens, mask in per_rank]
        alpha_value = sum(terms) / len(terms)
    if not math.isfinite(alpha_value):
        alpha_value = math.nan  # the rule divides by zero (no weight anywhere): undefined by the contract

    results = []
    for tokens, mask in per_rank:
        num_tokens = float(mask.sum())
        weighted = tokens.weight * tokens.ce * mask
        onehot = torch.nn.functional.one_hot(tokens.target, tokens.prob.shape[-1]).to(torch.float64)
        dloss_sum = (alpha_value * tokens.weight * mask).unsqueeze(-1) * (tokens.prob - onehot)
        if num_tokens == 0:
            loss, grad = 0.0, torch.zeros_like(tokens.prob)
        else:
            loss = alpha_value * float(weighted.sum()) / num_tokens
            grad = dloss_sum * (upstream / num_tokens)
        results.append(RefRankLoss(
            loss=loss, loss_sum=alpha_value * float(weighted.sum()) if num_tokens else 0.0,
            ce_sum=float((tokens.ce * mask).sum()), entropy_sum=float((tokens.entropy * mask).sum()),
            num_tokens=num_tokens, alpha=alpha_value, grad=grad,
            loss_sum_grad=dloss_sum if num_tokens else torch.zeros_like(tokens.prob), tokens=tokens))
    return results
