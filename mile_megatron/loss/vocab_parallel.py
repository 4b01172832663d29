"""Exact per-token cross-entropy and entropy over a vocabulary sharded across tensor-parallel ranks.

Rank r of the TP group holds the logits of columns [r * Vl, (r + 1) * Vl) (Megatron's layout, padding columns
included: they take part in the softmax exactly as in Megatron). For each token (row) rank r computes, in fp32
(fp64 for fp64 inputs), over its own columns z_j with m_r = max_j z_j and e_j = exp(z_j - m_r):

    m_r,   s_r = sum_{j != argmax} e_j   (the argmax term, exactly 1, is left out so log1p keeps precision),
    t_r = sum_j e_j (z_j - m_r)  (<= 0),   zy_r = z_y if y is one of this rank's columns else 0.

One all-gather of these four numbers per token (plus a three-number trailer: the shard width, the input-check
setting and a bad-target flag) lets every rank merge them exactly. With M = max_r m_r, c_r = exp(m_r - M) and
Z = sum_j exp(z_j - M) = 1 + S over the whole vocabulary:

    S  = sum_r c_r s_r + sum_{r != r*} c_r                     (r* = one rank holding the global max)
    T  = sum_r c_r (t_r + (s_r + 1)(m_r - M)) = sum_j e^(z_j - M)(z_j - M)   (<= 0)
    CE = -log p_y = (M - z_y) + log1p(S)
    H  = -sum_j p_j log p_j = log1p(S) - T / (1 + S)           (both terms >= 0: no cancellation)

The weight w (MiLe: (sigma + H)^gamma, focal: (1 - p_y)^gamma with p_y = exp(-CE)) is a constant for autograd.
Backward needs no collective: p_j = exp(z_j - M - log1p(S)) is recomputed from the saved logits, and
d loss_i / d z_ij = g_i * w_i * (p_ij - [j == y_i]) is formed in fp32 (at j = y_i as expm1(-CE), exact when
p_y ~ 1) and rounded once to the logits' dtype.
The input logits are never written to (unless the opt-in in-place backward of the Triton path is on).
On CUDA the same computation runs as fused Triton kernels (mile_megatron/loss/triton; backend choice and in-place
option in mile_megatron/loss/settings.py).

-inf logits (masked vocabulary entries) have p = 0 and add nothing to H (0 log 0 = 0): the statistics read every
logit below FLOOR = -1e30 as FLOOR, where e^(FLOOR - m) is exactly 0 next to any real logit and the products
(s + 1)(m - M) stay finite, so a TP shard whose logits of a row are all -inf contributes c_r = 0 to the merge.
z_y is read as is: a target on a -inf logit gives CE = +inf, as F.cross_entropy does (its gradient is finite:
g w (p - onehot), -g w at the target). A row with no logit above FLOOR on any rank has no distribution: it comes
out uniform over the V_pad columns (H = log V_pad) with CE = +inf (F.cross_entropy gives NaN). NaN and +inf
logits are not floored: they make the row's results NaN (non-finite checks see them).

Wire format of the all-gather and the input checks: mile_megatron/loss/common.py.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .common import (FLOOR, STATS, TRAILER, check_trailers, checks_active, must_read_trailer, trailer_values,
                     validate_target, validate_weight_parameters)
from .parallel import ProcessGroup, all_gather_rows, group_rank, group_size, resolve_tp_group
from .settings import use_triton

# Rows are processed in chunks of at most this many logits so fp32 temporaries stay bounded (64 MiB in fp32).
CHUNK_ELEMENTS = 1 << 24

class TokenLosses(NamedTuple):
    """Per-token results, float32, shape of the target. Only `loss` carries a gradient."""

    loss: torch.Tensor
    ce: torch.Tensor
    entropy: torch.Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_chunks(num_rows: int, width: int):
    step = max(1, CHUNK_ELEMENTS // max(width, 1))
    for start in range(0, num_rows, step):
        yield slice(start, min(start + step, num_rows))


def local_targets(flat_target: torch.Tensor, width: int, tp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(column of each target on this rank, or 0; whether the target is one of this rank's columns)."""
    local_target = flat_target - tp_rank * width
    on_rank = (local_target >= 0) & (local_target < width)
    return torch.where(on_rank, local_target, torch.zeros_like(local_target)), on_rank


def local_statistics(rows: torch.Tensor, local_target: torch.Tensor, on_rank: torch.Tensor) -> torch.Tensor:
    """[N, 4] = (m, s, t, zy) over this rank's columns, as described in the module docstring."""
    dtype = _compute_dtype(rows.dtype)
    stats = torch.empty(rows.shape[0], STATS, dtype=dtype, device=rows.device)
    for chunk in _row_chunks(rows.shape[0], rows.shape[1]):
        z = rows[chunk].to(dtype)
        zy = z.gather(-1, local_target[chunk].unsqueeze(-1)).squeeze(-1)  # unfloored: -inf gives CE = +inf
        stats[chunk, 3] = torch.where(on_rank[chunk], zy, torch.zeros_like(zy))
        z = torch.where(z < FLOOR, FLOOR, z)  # -inf -> FLOOR (NaN stays NaN); a new tensor: z may be the input
        m, argmax = z.max(dim=-1, keepdim=True)
        shifted = z - m
        e = shifted.exp()
        stats[chunk, 2] = (e * shifted).sum(dim=-1)
        e.scatter_(-1, argmax, 0.0)
        stats[chunk, 1] = e.sum(dim=-1)
        stats[chunk, 0] = m.squeeze(-1)
    return stats


def gather_statistics(stats: torch.Tensor, width: int, flat_target: torch.Tensor, tp_group: ProcessGroup,
                      device: torch.device) -> torch.Tensor:
    """This rank's [N, 4] statistics -> every rank's [tp, N, 4], through the one all-gather (with the trailer and
    the input checks of common.py)."""
    tp_size = group_size(tp_group)
    checks = checks_active(device)
    bad = ((flat_target < 0) | (flat_target >= width * tp_size)).any() if checks else None
    trailer = trailer_values(width, checks, bad, stats)
    gathered = all_gather_rows(torch.cat([stats.reshape(-1), trailer]), tp_group)  # the one TP collective
    if must_read_trailer(checks, tp_group, device):
        check_trailers(gathered[:, -TRAILER:], checks, tp_group)
    return gathered[:, :-TRAILER].view(tp_size, -1, STATS)


def merge_statistics(per_rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """per_rank [tp, N, 4] -> (M, log1p(S), CE, H) per token, exactly as in the module docstring."""
    m, s, t, zy = per_rank.unbind(dim=-1)
    global_max, owner = m.max(dim=0, keepdim=True)
    scale = (m - global_max).exp()
    others = scale.scatter(0, owner, 0.0)  # c_r with one maximal rank left out (its c is exactly 1)
    total = (scale * s).sum(dim=0) + others.sum(dim=0)
    log_z = torch.log1p(total)
    weighted = (scale * (t + (s + 1.0) * (m - global_max))).sum(dim=0)
    global_max = global_max.squeeze(0)
    ce = (global_max - zy.sum(dim=0)) + log_z
    entropy = log_z - weighted / (1.0 + total)
    return global_max, log_z, ce, entropy


def token_weights(kind: str, ce: torch.Tensor, entropy: torch.Tensor, gamma: float, sigma: float) -> torch.Tensor:
    """w per token: MiLe (sigma + H)^gamma, focal (1 - p_y)^gamma = (-expm1(-CE))^gamma, CE 1."""
    if kind == "mile":
        return (sigma + entropy).pow(gamma)
    if kind == "focal":
        return (-torch.expm1(-ce)).pow(gamma)
    return torch.ones_like(ce)


def token_outputs(ctx, ce: torch.Tensor, entropy: torch.Tensor, weight: torch.Tensor,
                  shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """An autograd forward's outputs (w * CE, CE, H, w) in fp32 and the target's shape; only w * CE is
    differentiable."""
    loss = (weight * ce).float().view(shape)
    ce, entropy, weight = (x.float().view(shape) for x in (ce, entropy, weight))
    ctx.mark_non_differentiable(ce, entropy, weight)
    return loss, ce, entropy, weight


def logits_gradient(z: torch.Tensor, local_target: torch.Tensor, on_rank: torch.Tensor, global_max: torch.Tensor,
                    log_z: torch.Tensor, target_grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """g w (p - onehot) of rows z [n, V] in the compute dtype, with scale = g w and target_grad = expm1(-CE)
    (p_y - 1 at the target column: exact even when p_y rounds to 1)."""
    dtype = _compute_dtype(z.dtype)
    # (z - M) first: it is exact near the maximum, while M + log Z would round at |M| ~ 1e4.
    shifted = z.to(dtype) - global_max.unsqueeze(-1)
    probs = (shifted - log_z.unsqueeze(-1)).exp()
    index = local_target.unsqueeze(-1)
    at_target = torch.where(on_rank, target_grad, probs.gather(-1, index).squeeze(-1))
    probs.scatter_(-1, index, at_target.unsqueeze(-1))
    return probs * scale.unsqueeze(-1)


class _WeightedVocabParallelCrossEntropy(torch.autograd.Function):
    """loss_i = w_i * CE_i with the weight w_i held constant for the gradient; returns (loss, ce, entropy, w)."""

    @staticmethod
    def forward(ctx, logits, target, kind, gamma, sigma, tp_group):
        width = logits.shape[-1]
        rows = logits.reshape(-1, width)
        flat_target = target.reshape(-1)
        local_target, on_rank = local_targets(flat_target, width, group_rank(tp_group))
        stats = local_statistics(rows, local_target, on_rank)
        per_rank = gather_statistics(stats, width, flat_target, tp_group, logits.device)
        global_max, log_z, ce, entropy = merge_statistics(per_rank)
        weight = token_weights(kind, ce, entropy, gamma, sigma)

        ctx.save_for_backward(rows, local_target, on_rank, global_max, log_z, ce, weight)
        ctx.logits_shape = logits.shape
        return token_outputs(ctx, ce, entropy, weight, target.shape)

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_entropy, _grad_weight):
        rows, local_target, on_rank, global_max, log_z, ce, weight = ctx.saved_tensors
        scale = grad_loss.reshape(-1).to(_compute_dtype(rows.dtype)) * weight  # g_i * w_i
        target_grad = torch.expm1(-ce)
        grad = torch.empty_like(rows, memory_format=torch.contiguous_format)
        for chunk in _row_chunks(rows.shape[0], rows.shape[1]):
            grad[chunk] = logits_gradient(rows[chunk], local_target[chunk], on_rank[chunk], global_max[chunk],
                                          log_z[chunk], target_grad[chunk], scale[chunk]).to(rows.dtype)
        return grad.view(ctx.logits_shape), None, None, None, None, None


def weighted_vocab_parallel_cross_entropy(
    vocab_parallel_logits: torch.Tensor,
    target: torch.Tensor,
    kind: str,
    gamma: float,
    sigma: float,
    tp_group: ProcessGroup,
) -> tuple[TokenLosses, torch.Tensor]:
    """Shared implementation: per-token losses and the (detached) weights w; `kind` in ("mile", "focal", "ce")."""
    group = resolve_tp_group(tp_group)
    function = _WeightedVocabParallelCrossEntropy
    if use_triton(vocab_parallel_logits):  # same contract, fused kernels (loss/triton)
        from .triton.function import TritonWeightedVocabParallelCrossEntropy as function
    loss, ce, entropy, weight = function.apply(
        vocab_parallel_logits, target.long(), kind, float(gamma), float(sigma), group
    )
    return TokenLosses(loss, ce, entropy), weight


def vocab_parallel_mile_cross_entropy(
    vocab_parallel_logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 1.0,
    sigma: float = 1.0,
    tp_group: ProcessGroup = None,
) -> TokenLosses:
    """Per-token MiLe loss (sigma + H)^gamma * CE over a TP-sharded vocabulary, with CE and entropy H.

    vocab_parallel_logits: [..., V_pad / tp] (any float dtype, any strides); target: [...] global token ids.
    tp_group=None uses Megatron's tensor-parallel group when megatron.core.parallel_state is initialised.
    """
    validate_weight_parameters(gamma, sigma)
    validate_target(vocab_parallel_logits, target)
    return weighted_vocab_parallel_cross_entropy(vocab_parallel_logits, target, "mile", gamma, sigma, tp_group)[0]


def vocab_parallel_focal_cross_entropy(
    vocab_parallel_logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 1.0,
    tp_group: ProcessGroup = None,
) -> TokenLosses:
    """Per-token focal loss (1 - p_y)^gamma * CE over a TP-sharded vocabulary, with CE and entropy H."""
    validate_weight_parameters(gamma)
    validate_target(vocab_parallel_logits, target)
    return weighted_vocab_parallel_cross_entropy(vocab_parallel_logits, target, "focal", gamma, 0.0, tp_group)[0]
