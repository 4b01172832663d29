"""The output layer and the loss fused: per-token MiLe / focal / CE from hidden states, never materialising the logits.

For hidden states x [..., h] (this rank's sequence shard with sequence_parallel) and this TP rank's shard W [V/tp, h]
of the output layer, the results are those of vocab_parallel.py on the logits z = x W^T, computed chunk by chunk:

    forward   for each chunk of T tokens: z_c = x_c W^T [T, V/tp] (the input's dtype), its per-token statistics
              (m, s, t, zy) (vocab_parallel.py's, or the Triton statistics kernel on CUDA), z_c freed;
              then the one TP all-gather of the statistics of all tokens and the exact merge: CE, H, w, w * CE.
    backward  for each chunk again: z_c = x_c W^T, G_c = g w (p - onehot) [T, V/tp] (rounded once to the input's
              dtype; in place in z_c on the Triton path), dx_c = G_c W, dW += G_c^T x_c (fp32 accumulation);
              dx is summed over the TP group (all-reduce, as ColumnParallelLinear's input gradient) or, with
              sequence_parallel, reduce-scattered back to the sequence shards.

No tensor of tokens x V/tp elements exists at any time: the largest is one chunk's logits (T x V/tp) besides
what ColumnParallelLinear itself holds (the gathered hidden states with sequence parallelism, dx, dW). Saved for
backward: the hidden states (this rank's shard), W, the targets and four numbers per token. Only per-token
statistics cross the TP group in the forward (one all-gather), besides the hidden-state gather of sequence
parallelism; the backward has the collectives ColumnParallelLinear's backward has (the all-reduce or the
re-gather and reduce-scatter).

The weight gradient follows Megatron's gradient_accumulation_fusion contract when asked to: it is added in fp32
into W.main_grad and the autograd gradient is a placeholder (W.grad_added_to_main_grad = True) when W has that
attribute, else None; otherwise dW is returned in W's dtype. A tied embedding / output weight needs nothing more:
its gradients meet in the same parameter.

chunk_tokens (default: about N h / (V/tp) tokens, a power of two, so one chunk's logits are about the size of the
hidden states, at least 16 and at most N) trades the chunk's memory for the number of matmuls.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from .common import STATS, TRAILER
from .objective import MileLossTerms, counted_mask, terms_from_tokens, validate_loss_settings
from .parallel import ProcessGroup, group_rank, group_size, resolve_tp_group
from .settings import use_triton
from .vocab_parallel import (gather_statistics, local_statistics, local_targets, logits_gradient, merge_statistics,
                             token_outputs, token_weights)


class LinearTokenLosses(NamedTuple):
    """Per-token results, float32, shape of the target. Only `loss` carries a gradient (to hidden and weight)."""

    loss: torch.Tensor
    ce: torch.Tensor
    entropy: torch.Tensor
    weight: torch.Tensor


def default_chunk_tokens(tokens: int, hidden: int, width: int) -> int:
    """About tokens * hidden / width tokens (a chunk's logits ~ the hidden states' size), a power of two in
    [16, tokens]."""
    target = max(1, (tokens * hidden) // max(width, 1))
    chunk = 1 << (target.bit_length() - 1)
    return max(1, min(tokens, max(16, chunk)))


def _all_gather_first_dim(tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return tensor
    tensor = tensor.contiguous()
    out = torch.empty((size * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    dist.all_gather_into_tensor(out, tensor, group=group)
    return out


def _reduce_scatter_first_dim(tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return tensor
    out = torch.empty((tensor.shape[0] // size, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    dist.reduce_scatter_tensor(out, tensor.contiguous(), group=group)
    return out


def _chunks(rows: int, chunk: int):
    for start in range(0, rows, chunk):
        yield slice(start, min(start + chunk, rows))


class _LinearWeightedCrossEntropy(torch.autograd.Function):
    """loss_i = w_i * CE_i of z = x W^T, chunked (module docstring); returns (loss, ce, entropy, w)."""

    @staticmethod
    def forward(ctx, hidden, weight, target, kind, gamma, sigma, tp_group, sequence_parallel, chunk_tokens,
                accumulate_into_main_grad):
        full = _all_gather_first_dim(hidden, tp_group) if sequence_parallel else hidden
        rows = full.reshape(-1, full.shape[-1])
        flat_target = target.reshape(-1)
        width = weight.shape[0]
        tp_rank = group_rank(tp_group)
        local_target, on_rank = local_targets(flat_target, width, tp_rank)
        chunk = chunk_tokens or default_chunk_tokens(rows.shape[0], rows.shape[1], width)
        stats = torch.empty(rows.shape[0], STATS, dtype=torch.float64 if rows.dtype == torch.float64 else torch.float32,
                            device=rows.device)
        triton = rows.shape[0] > 0 and use_triton(rows)
        if triton:
            from .triton.function import row_statistics
            from .triton.layout import row_layout
        for part in _chunks(rows.shape[0], chunk):
            logits = rows[part] @ weight.t()
            if triton:
                statistics = row_statistics(row_layout(logits), flat_target[part], tp_rank * width)
                stats[part] = statistics[:-TRAILER].view(-1, STATS)
            else:
                stats[part] = local_statistics(logits, local_target[part], on_rank[part])
            del logits
        per_rank = gather_statistics(stats, width, flat_target, tp_group, rows.device)
        global_max, log_z, ce, entropy = merge_statistics(per_rank)
        token_weight = token_weights(kind, ce, entropy, gamma, sigma)

        ctx.save_for_backward(hidden, weight, flat_target, local_target, on_rank, global_max, log_z, ce, token_weight)
        ctx.settings = (tp_group, sequence_parallel, chunk, accumulate_into_main_grad, triton)
        return token_outputs(ctx, ce, entropy, token_weight, target.shape)

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_entropy, _grad_weight):
        hidden, weight, flat_target, local_target, on_rank, global_max, log_z, ce, token_weight = ctx.saved_tensors
        tp_group, sequence_parallel, chunk, accumulate_into_main_grad, triton = ctx.settings
        full = _all_gather_first_dim(hidden, tp_group) if sequence_parallel else hidden
        rows = full.reshape(-1, full.shape[-1])
        target_grad = torch.expm1(-ce)  # p_y - 1 at the target column
        grad_rows = torch.empty_like(rows)
        main_grad = getattr(weight, "main_grad", None) if accumulate_into_main_grad else None
        if main_grad is None:  # fp32 accumulation over the chunks (fp64 for fp64 inputs)
            accumulate = torch.float64 if weight.dtype == torch.float64 else torch.float32
            grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device)
        else:
            grad_weight = main_grad
        if triton:
            from .triton.function import gradient
            from .triton.layout import row_layout

            first_col = group_rank(tp_group) * weight.shape[0]
            saved = torch.stack([global_max, log_z, token_weight, target_grad], dim=1).float()
        else:
            scale = grad_loss.reshape(-1).to(global_max.dtype) * token_weight  # g_i * w_i
        for part in _chunks(rows.shape[0], chunk):
            logits = rows[part] @ weight.t()
            if triton:
                upstream = grad_loss.reshape(-1)[part].float()
                logits_grad = gradient(row_layout(logits), flat_target[part], saved[part], upstream, first_col,
                                       out=logits)  # in place: the chunk's logits are ours
            else:
                logits_grad = logits_gradient(logits, local_target[part], on_rank[part], global_max[part], log_z[part],
                                              target_grad[part], scale[part]).to(rows.dtype)
            del logits
            grad_rows[part] = logits_grad @ weight
            grad_weight.add_((logits_grad.t() @ rows[part]).to(grad_weight.dtype))
            del logits_grad
        grad_rows = grad_rows.view(full.shape)
        if sequence_parallel:
            grad_hidden = _reduce_scatter_first_dim(grad_rows, tp_group)
        else:
            if group_size(tp_group) > 1:  # as ColumnParallelLinear: the input gradient is summed over TP ranks
                dist.all_reduce(grad_rows, group=tp_group)
            grad_hidden = grad_rows
        if main_grad is not None:
            if hasattr(weight, "grad_added_to_main_grad"):
                weight.grad_added_to_main_grad = True
                weight_grad = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)  # placeholder
            else:
                weight_grad = None
        else:
            weight_grad = grad_weight.to(weight.dtype)
        return grad_hidden, weight_grad, None, None, None, None, None, None, None, None


def _validate(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, tp_group: ProcessGroup,
              sequence_parallel: bool, chunk_tokens: int | None) -> None:
    if not hidden.is_floating_point() or not weight.is_floating_point():
        raise ValueError(f"hidden and weight must be floating-point tensors (got {hidden.dtype}, {weight.dtype})")
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"weight must be this rank's [V/tp, h] output-layer shard for hidden [..., h] (got weight "
                         f"{tuple(weight.shape)}, hidden {tuple(hidden.shape)})")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have one dtype, as the output "
                         "layer's matmul does")
    for name, tensor in (("weight", weight), ("target", target)):
        if tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but hidden is on {hidden.device}; put all on one device")
    if target.dtype.is_floating_point or target.dtype == torch.bool or target.is_complex():
        raise ValueError(f"target must hold integer token ids (got {target.dtype})")
    lead = list(hidden.shape[:-1])
    if sequence_parallel:
        if hidden.dim() < 2:
            raise ValueError("with sequence_parallel, hidden is this rank's [s/tp, ..., h] sequence shard")
        lead[0] *= group_size(tp_group)
    if list(target.shape) != lead:
        where = " (the whole sequence: hidden's first dimension x TP size)" if sequence_parallel else ""
        raise ValueError(f"target shape {tuple(target.shape)} must equal hidden's shape without its last dimension"
                         f"{where}, {tuple(lead)}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1 (got {chunk_tokens})")


def linear_weighted_vocab_parallel_cross_entropy(hidden, weight, target, kind, gamma, sigma, tp_group, *,
                                                 sequence_parallel=False, chunk_tokens=None,
                                                 gradient_accumulation_fusion=False) -> LinearTokenLosses:
    """Shared implementation of the fused functions (`kind` in "mile", "focal", "ce"); see the module docstring."""
    group = resolve_tp_group(tp_group)
    _validate(hidden, weight, target, group, sequence_parallel, chunk_tokens)
    loss, ce, entropy, token_weight = _LinearWeightedCrossEntropy.apply(
        hidden, weight, target.long(), kind, float(gamma), float(sigma), group,
        bool(sequence_parallel and group_size(group) > 1), chunk_tokens, bool(gradient_accumulation_fusion))
    return LinearTokenLosses(loss, ce, entropy, token_weight)


def linear_vocab_parallel_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    kind: str = "mile",
    gamma: float = 1.0,
    sigma: float = 1.0,
    tp_group: ProcessGroup = None,
    sequence_parallel: bool = False,
    chunk_tokens: int | None = None,
    gradient_accumulation_fusion: bool = False,
) -> LinearTokenLosses:
    """Per-token MiLe / focal / CE of the logits hidden @ weight.T, without materialising them (module docstring).

    hidden: [..., h] ([s/tp, b, h], this rank's sequence shard, with sequence_parallel); weight: this TP rank's
    [V_pad/tp, h] output-layer shard; target: global token ids with hidden's leading shape ([s, b], the whole
    sequence, with sequence_parallel). Returns LinearTokenLosses(loss, ce, entropy, weight), the same as
    vocab_parallel_*_cross_entropy(hidden @ weight.T, target) plus the weight w. gradient_accumulation_fusion:
    Megatron's contract for weight.main_grad (module docstring).
    """
    validate_loss_settings(kind, "none", gamma, sigma)
    return linear_weighted_vocab_parallel_cross_entropy(
        hidden, weight, target, kind, gamma, sigma, tp_group, sequence_parallel=sequence_parallel,
        chunk_tokens=chunk_tokens, gradient_accumulation_fusion=gradient_accumulation_fusion)


def linear_mile_loss_terms(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    *,
    kind: str = "mile",
    gamma: float = 1.0,
    sigma: float = 1.0,
    alpha: str = "global",
    tp_group: ProcessGroup = None,
    dp_group: ProcessGroup = None,
    sequence_parallel: bool = False,
    chunk_tokens: int | None = None,
    gradient_accumulation_fusion: bool = False,
) -> MileLossTerms:
    """mile_loss_terms (objective.py) of the logits hidden @ weight.T, fused as linear_vocab_parallel_cross_entropy:
    one micro-batch's numerator and denominator of the step loss; target and loss_mask cover the whole [s, b]."""
    validate_loss_settings(kind, alpha, gamma, sigma)
    target, mask = counted_mask(target, loss_mask)
    token_loss, ce, entropy, token_weight = linear_weighted_vocab_parallel_cross_entropy(
        hidden, weight, target, kind, gamma, sigma, tp_group, sequence_parallel=sequence_parallel,
        chunk_tokens=chunk_tokens, gradient_accumulation_fusion=gradient_accumulation_fusion)
    return terms_from_tokens(token_loss, ce, entropy, token_weight, mask, kind, gamma, alpha, dp_group)
