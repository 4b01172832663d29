"""Launchers and the autograd function of the Triton path (kernels.py holds the kernels and the math).

The same contract as the torch path's autograd function (mile_megatron/loss/vocab_parallel.py): the statistics
kernel, the one all-gather (wire format: mile_megatron/loss/common.py), the fp64 merge kernel; the backward is one
gradient kernel and no collective.

In-place backward (opt-in: mile_megatron.loss.settings.set_inplace_backward(True) or
MILE_MEGATRON_INPLACE_BACKWARD=1): the backward writes the logits gradient into the logits' own memory instead
of a new tensor, saving one logits-sized allocation. Contract: after the loss's backward the logits (and every
tensor sharing their memory) hold the gradient, so nothing else may need their values afterwards; the backward
may run only once (no retain_graph re-use). The logits' autograd version counter is bumped, so another autograd
node that saved them fails loudly ("modified by an inplace operation") instead of using wrong values. Megatron's
output layer saves its input and weight, not the logits, so the usual training step satisfies the contract. Leaf
tensors and views of leaves (their values belong to the caller) and layouts that map two positions to one address
(expanded tensors) get a new gradient tensor regardless.
"""

from __future__ import annotations

import struct

import torch
import triton

from .. import settings
from ..common import STATS, TRAILER, check_trailers, checks_active, must_read_trailer
from ..parallel import all_gather_rows, group_rank, group_size
from .kernels import INTERPRETED, gradient_kernel, merge_kernel, row_statistics_kernel
from .layout import RowLayout, has_distinct_elements, row_layout

# Elements per program tile (columns of one row; several narrow rows share a tile). 256 elements per warp.
# Forward: 2048 with 8 warps = 8 values per thread (one 16-byte bf16 load), 40 registers on sm_90, next block
# prefetched: ~6 programs and ~48 KB of loads in flight per SM. Backward: 4096 with 8 warps = 16 values per
# thread (two 16-byte loads and stores), 32 registers, full occupancy. No autotuning (CUDA graphs, determinism).
FORWARD_BLOCK = 2048
BACKWARD_BLOCK = 4096
MERGE_ROWS = 256

_KINDS = {"mile": 0, "focal": 1, "ce": 2}


def _tile(rows: int, width: int, largest: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK, num_warps): BLOCK columns (a power of two, at most `largest`) of ROWS rows per program,
    ROWS > 1 only for narrow rows (so a program still covers up to `largest` elements); 256 elements per warp."""
    block = min(largest, triton.next_power_of_2(max(width, 1)))
    tile_rows = min(max(1, largest // block), triton.next_power_of_2(max(rows, 1)))
    return tile_rows, block, max(1, min(8, tile_rows * block // 256))


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------

def _device_guard(tensor: torch.Tensor):
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    import contextlib

    return contextlib.nullcontext()


def row_statistics(layout: RowLayout, target: torch.Tensor, first_col: int) -> torch.Tensor:
    """fp32 [N * 4 + 3]: (m, s, t, zy) per row, then the trailer (width, 0, 0). target: 1-D, any stride."""
    stats = torch.empty(layout.rows * STATS + TRAILER, dtype=torch.float32, device=layout.tensor.device)
    tile_rows, block, warps = _tile(layout.rows, layout.width, FORWARD_BLOCK)
    with _device_guard(stats):
        row_statistics_kernel[(triton.cdiv(layout.rows, tile_rows),)](
            layout.tensor, target, target.stride(0), stats, stats[-TRAILER:], layout.rows, layout.width, first_col,
            layout.inner, layout.stride_outer, layout.stride_inner, layout.stride_col, ROWS=tile_rows, BLOCK=block,
            num_warps=warps)
    return stats


def _float64_bits(value: float) -> int:
    """The fp64 bit pattern of `value` as a signed int64 (the kernel bitcasts it back: exact, no fp32 rounding)."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def merge(gathered: torch.Tensor, rows: int, kind: str, gamma: float, sigma: float):
    """gathered [tp, N * 4 + 3] -> (loss, ce, entropy, weight) fp32 [N] and saved fp32 [N, 4]."""
    device = gathered.device
    loss, ce, entropy, weight = (torch.empty(rows, dtype=torch.float32, device=device) for _ in range(4))
    saved = torch.empty(rows, STATS, dtype=torch.float32, device=device)
    with _device_guard(gathered):
        merge_kernel[(triton.cdiv(rows, MERGE_ROWS),)](
            gathered, gathered.stride(0), gathered.shape[0], rows, loss, ce, entropy, weight, saved,
            _float64_bits(gamma), _float64_bits(sigma), KIND=_KINDS[kind], BLOCK_ROWS=MERGE_ROWS, num_warps=4)
    return (loss, ce, entropy, weight), saved


def gradient(layout: RowLayout, target: torch.Tensor, saved: torch.Tensor, upstream: torch.Tensor, first_col: int,
             out: torch.Tensor | None) -> torch.Tensor:
    """g * w * (p - onehot) in the logits' dtype, into `out` (laid out like the logits) or a new tensor: laid out
    like the logits when they are dense (a [b, s, V] view of [s, b, V] logits gets an [s, b, V]-ordered gradient,
    so the layer before needs no copy), else contiguous."""
    logits = layout.tensor
    if out is None:
        out = torch.empty_like(logits)
        if out.stride() != logits.stride():  # not dense (e.g. a slice): contiguous rows instead
            out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if out.stride() == logits.stride():
        grad_outer, grad_inner, grad_col = layout.stride_outer, layout.stride_inner, layout.stride_col
    else:
        grad_outer, grad_inner, grad_col = layout.inner * layout.width, layout.width, 1
    tile_rows, block, warps = _tile(layout.rows, layout.width, BACKWARD_BLOCK)
    grid = (triton.cdiv(layout.rows, tile_rows) * triton.cdiv(layout.width, block),)
    with _device_guard(logits):
        gradient_kernel[grid](
            logits, out, target, target.stride(0), saved, upstream, upstream.stride(0), layout.rows, layout.width,
            first_col,
            layout.inner, layout.stride_outer, layout.stride_inner, layout.stride_col, grad_outer, grad_inner,
            grad_col, ROWS=tile_rows, BLOCK=block, BF16_BY_BITS=INTERPRETED and logits.dtype == torch.bfloat16,
            num_warps=warps)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------------------------

class TritonWeightedVocabParallelCrossEntropy(torch.autograd.Function):
    """The Triton twin of vocab_parallel._WeightedVocabParallelCrossEntropy (same inputs, outputs, semantics)."""

    @staticmethod
    def forward(ctx, logits, target, kind, gamma, sigma, tp_group):
        layout = row_layout(logits)
        flat_target = target.reshape(-1)
        tp_size = group_size(tp_group)
        first_col = group_rank(tp_group) * layout.width

        stats = row_statistics(layout, flat_target, first_col)
        checks = checks_active(logits.device)
        if checks:  # trailer (width, input-check setting, bad-target flag); device-side fills
            stats[-2] = 1.0
            stats[-1:] = ((flat_target < 0) | (flat_target >= layout.width * tp_size)).any()
        gathered = all_gather_rows(stats, tp_group)  # the one TP collective
        if must_read_trailer(checks, tp_group, logits.device):
            check_trailers(gathered[:, -TRAILER:], checks, tp_group)
        (loss, ce, entropy, weight), saved = merge(gathered, layout.rows, kind, gamma, sigma)

        ctx.save_for_backward(layout.tensor, flat_target, saved)
        ctx.layout = layout._replace(tensor=None)
        ctx.first_col = first_col
        # In place only on request, never into a leaf's memory (its values are the user's), never where two
        # positions share an address.
        owner = logits if logits._base is None else logits._base
        ctx.inplace = settings.inplace_backward() and not owner.is_leaf and has_distinct_elements(layout)
        ctx.logits_shape = logits.shape
        shape = target.shape
        loss, ce, entropy, weight = (x.view(shape) for x in (loss, ce, entropy, weight))
        ctx.mark_non_differentiable(ce, entropy, weight)
        return loss, ce, entropy, weight

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_entropy, _grad_weight):
        logits, flat_target, saved = ctx.saved_tensors
        layout = ctx.layout._replace(tensor=logits)
        out = logits if ctx.inplace else None
        grad = gradient(layout, flat_target, saved, grad_loss.reshape(-1), ctx.first_col, out)
        if ctx.inplace:
            torch.autograd.graph.increment_version(logits)  # whoever else saved the logits now fails loudly
        if grad.shape != ctx.logits_shape:
            grad = grad.view(ctx.logits_shape)
        return grad, None, None, None, None, None
