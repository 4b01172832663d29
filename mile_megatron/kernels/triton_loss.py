"""Triton kernels for the weighted vocab-parallel cross-entropy: two launches per forward, one per backward.

Same quantities and formulas as the torch path (mile_megatron/vocab_parallel.py); only the evaluation differs.
Rank r holds columns [r * V, (r + 1) * V) of every row; z are a row's logits on this rank, y its target.

1. Row statistics (one program per row, or per few rows when they are narrow). One pass over the row in its own
   dtype, BLOCK columns at a time, each value converted to fp32 in registers (no fp32 or softmax copy of the
   logits in memory). Lane k of the block keeps the exact state of the values it has seen,

       (m, s, t) = (max, sum_{j != argmax} e^(z_j - m), sum_j e^(z_j - m) (z_j - m)),   one maximal term left out,

   and takes in a new value z, the one-value state (z, 0, 0), with d = z - m and a = e^(-|d|):

       d > 0:   (z, a (s + 1),  a (t - (s + 1) d))        the old left-out term returns as a * 1
       d <= 0:  (m, s + a,      t + a d)                  a tie is counted, one maximal term stays out

   The lanes are then merged like TP ranks: M = max_k m_k, c_k = e^(m_k - M),
       s = sum_k c_k s_k + sum_{k: m_k != M} c_k + (#{k: m_k = M} - 1),   t = sum_k c_k (t_k + (s_k + 1)(m_k - M)),
   exact because the maximal lanes' left-out terms are exactly 1 (masked lanes hold -2e30, so c_k = 0).
   Logits below FLOOR = -1e30 (-inf: masked vocabulary entries) are read as FLOOR, where e^(FLOOR - m) = 0 next to
   any real logit while every product stays finite (vocab_parallel's docstring states the rule); z_y is read as is.
   Stored as fp32 [N, 4] = (m, s, t, zy) with zy = z_y when y is on this rank (else 0), followed by the
   three-number trailer (shard width, input-check setting, bad-target flag) that the one all-gather carries.
2. Merge (BLOCK_ROWS rows per program), after the all-gather of [tp, N * 4 + 3], in fp64:
       M = max_r m_r, c_r = e^(m_r - M), S = sum_r c_r s_r + sum_{r != r*} c_r  (r* = first rank with m_r = M),
       T = sum_r c_r (t_r + (s_r + 1)(m_r - M)), log Z = log1p(S), CE = (M - z_y) + log Z,
       H = log Z - T / (1 + S), w = (sigma + H)^gamma | (-expm1(-CE))^gamma | 1, loss = w * CE.
   log1p, expm1 and pow are evaluated in fp64 (series below 1e-5, else from exp/log: relative error < 1e-10),
   then rounded once to fp32. gamma and sigma arrive as the int64 bit patterns of their fp64 values (a Python
   float kernel argument is typed fp32: gamma = 50.3 would move w by ~1e-6). Outputs: loss, CE, H, w (fp32 [N])
   and, for backward, (M, log Z, w, expm1(-CE)).
3. Backward (one program per BLOCK columns of a row, or of a few narrow rows): p = e^((z - M) - log Z)
   recomputed from the saved logits (0 at -inf), and g * w * (p - [j == y]) written in the logits' dtype with
   one rounding, the target column as g * w * expm1(-CE) (exact when p_y ~ 1). No collective. Optionally in place.

Nothing synchronises with the host (no .item(), no data-dependent Python branch): with the input checks off the
launches are CUDA-graph capturable. Every element offset is int64 (row and column offsets, rank steps of the
merge; the trailer has its own pointer): a strided layout may address beyond 2^31 elements. The target is read
at its own stride: target.reshape(-1) is 1-D, so one stride describes it (2 for labels[:, ::2] of one sequence,
0 for an expanded id), which costs nothing where a contiguous copy would cost a launch (reshape has already
copied whenever the leading dimensions cannot be viewed as one).
Memory besides the gradient: about N * (16 tp + 48) bytes of statistics and outputs; nothing logits-sized.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from ..parallel import all_gather_rows, group_rank, group_size
from ..vocab_parallel import _STATS, _TRAILER, FLOOR, _check_inputs, _checks_active, _must_read_trailer
from . import inplace_backward
from .layout import RowLayout, has_distinct_elements, row_layout

# Elements per program tile (columns of one row; several narrow rows share a tile). 256 elements per warp.
# Forward: 2048 with 8 warps = 8 values per thread (one 16-byte bf16 load), 40 registers on sm_90, next block
# prefetched: ~6 programs and ~48 KB of loads in flight per SM. Backward: 4096 with 8 warps = 16 values per
# thread (two 16-byte loads and stores), 32 registers, full occupancy. No autotuning (CUDA graphs, determinism).
FORWARD_BLOCK = 2048
BACKWARD_BLOCK = 4096
MERGE_ROWS = 256

_FLOOR = tl.constexpr(FLOOR)  # logits below read as FLOOR (-inf: masked vocabulary entries); z_y is read as is
_EMPTY = tl.constexpr(2.0 * FLOOR)  # masked lanes: e^(_EMPTY - m) = 0 even next to FLOOR, products stay finite
_KINDS = {"mile": 0, "focal": 1, "ce": 2}


def _tile(rows: int, width: int, largest: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK, num_warps): BLOCK columns (a power of two, at most `largest`) of ROWS rows per program,
    ROWS > 1 only for narrow rows (so a program still covers up to `largest` elements); 256 elements per warp."""
    block = min(largest, triton.next_power_of_2(max(width, 1)))
    tile_rows = min(max(1, largest // block), triton.next_power_of_2(max(rows, 1)))
    return tile_rows, block, max(1, min(8, tile_rows * block // 256))


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _at(index, stride):
    """Element offset index * stride in int64 (index: int32 column indices; the product may pass 2^31)."""
    return index.to(tl.int64) * stride


@triton.jit
def _floored(z):
    """z, with every value below FLOOR (-inf included) as FLOOR; NaN stays NaN."""
    return tl.where(z < _FLOOR, _FLOOR, z)


@triton.jit
def _row_statistics_kernel(logits_ptr, target_ptr, target_stride, stats_ptr, trailer_ptr, n_rows, width, first_col,
                           inner, stride_outer, stride_inner, stride_col, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    base = logits_ptr + ((rows // inner) * stride_outer + (rows % inner) * stride_inner)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]  # int32 column indices; every offset is formed in int64 (_at)
    valid = row_ok[:, None] & (cols < width)
    z = tl.load(base + _at(cols, stride_col), mask=valid, other=0.0).to(tl.float32)
    m = tl.where(valid, _floored(z), _EMPTY)  # every lane starts as the one-value state (z, 0, 0)
    s = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    t = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    ahead = BLOCK + cols
    after = tl.load(base + _at(ahead, stride_col), mask=row_ok[:, None] & (ahead < width), other=0.0)
    for start in range(BLOCK, width, BLOCK):
        z = tl.where(row_ok[:, None] & (start + cols < width), _floored(after.to(tl.float32)), _EMPTY)
        ahead = start + BLOCK + cols  # the next block's load is in flight while this one is merged
        after = tl.load(base + _at(ahead, stride_col), mask=row_ok[:, None] & (ahead < width), other=0.0)
        # merge (m, s, t) with (z, 0, 0): a = e^(min - max) rescales the smaller side, k = a if z is the new max
        d = z - m
        a = tl.exp(-tl.abs(d))
        up = d > 0
        k = tl.where(up, a, 1.0)
        t = k * t + a * (tl.where(up, -(s + 1.0), 1.0) * d)
        s = k * s + a
        m = tl.maximum(m, z)
    # Merge the lanes as TP ranks are merged: c = e^(m - M); the maximal lanes' left-out terms are exactly 1 and
    # all but one of them are counted back in; empty lanes have c = 0.
    m_row = tl.max(m, 1)
    c = tl.exp(m - m_row[:, None])
    is_max = m == m_row[:, None]
    s_row = tl.sum(tl.where(is_max, 0.0, c) + c * s, 1) + (tl.sum(is_max.to(tl.float32), 1) - 1.0)
    t_row = tl.sum(c * (t + (s + 1.0) * (m - m_row[:, None])), 1)

    local = tl.load(target_ptr + rows * target_stride, mask=row_ok, other=0) - first_col
    on_rank = row_ok & (local >= 0) & (local < width)
    zy = tl.load(tl.reshape(base, [ROWS]) + tl.where(on_rank, local, 0) * stride_col, mask=on_rank,
                 other=0.0).to(tl.float32)  # not floored: a target on -inf gives CE = +inf
    out = stats_ptr + rows * 4
    tl.store(out, m_row, mask=row_ok)
    tl.store(out + 1, s_row, mask=row_ok)
    tl.store(out + 2, t_row, mask=row_ok)
    tl.store(out + 3, zy, mask=row_ok)
    if tl.program_id(0) == 0:  # trailer (width, 0, 0); the caller sets the check flags when input checks run
        tl.store(trailer_ptr, width * 1.0)
        tl.store(trailer_ptr + 1, 0.0)
        tl.store(trailer_ptr + 2, 0.0)


@triton.jit
def _log1p(x):
    """log(1 + x) for fp64 x >= 0, relative error < 1e-10."""
    return tl.where(x < 1e-5, x * (1.0 - 0.5 * x), tl.log(1.0 + x))


@triton.jit
def _expm1(x):
    """exp(x) - 1 for fp64 x <= 0, relative error < 1e-10."""
    return tl.where(x > -1e-5, x * (1.0 + 0.5 * x), tl.exp(x) - 1.0)


@triton.jit
def _pow(x, gamma):
    """x^gamma for fp64 x >= 0 with torch's conventions 0^0 = 1, 0^gamma = 0 (gamma > 0)."""
    positive = x > 0
    value = tl.exp(gamma * tl.log(tl.where(positive, x, 1.0)))
    return tl.where(gamma == 0, 1.0, tl.where(positive, value, 0.0))


@triton.jit(do_not_specialize=["gamma_bits", "sigma_bits"])
def _merge_kernel(gathered_ptr, rank_stride, tp, n_rows, loss_ptr, ce_ptr, entropy_ptr, weight_ptr, saved_ptr,
                  gamma_bits, sigma_bits, KIND: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    gamma = gamma_bits.to(tl.int64).to(tl.float64, bitcast=True)  # the exact fp64 values (see _float64_bits)
    sigma = sigma_bits.to(tl.int64).to(tl.float64, bitcast=True)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    valid = rows < n_rows
    stats = gathered_ptr + rows * 4
    top = tl.load(stats, mask=valid, other=0.0).to(tl.float64)
    at = stats
    for r in range(1, tp):
        at += rank_stride  # pointer steps: r * rank_stride is never formed in 32 bits
        top = tl.maximum(top, tl.load(at, mask=valid, other=0.0).to(tl.float64))
    total = tl.zeros([BLOCK_ROWS], dtype=tl.float64)
    weighted = tl.zeros([BLOCK_ROWS], dtype=tl.float64)
    zy = tl.zeros([BLOCK_ROWS], dtype=tl.float64)
    found = tl.zeros([BLOCK_ROWS], dtype=tl.int1)
    at = stats
    for r in range(tp):
        m = tl.load(at, mask=valid, other=0.0).to(tl.float64)
        s = tl.load(at + 1, mask=valid, other=0.0).to(tl.float64)
        t = tl.load(at + 2, mask=valid, other=0.0).to(tl.float64)
        scale = tl.exp(m - top)
        owner = (m == top) & (found == 0)  # the one maximal rank whose left-out term is the global one
        found = found | (m == top)
        total += scale * s + tl.where(owner, 0.0, scale)
        weighted += scale * (t + (s + 1.0) * (m - top))
        zy += tl.load(at + 3, mask=valid, other=0.0).to(tl.float64)
        at += rank_stride
    log_z = _log1p(total)
    ce = (top - zy) + log_z
    entropy = log_z - weighted / (1.0 + total)
    below_one = _expm1(-ce)  # p_y - 1
    if KIND == 0:
        weight = _pow(sigma + entropy, gamma)
    elif KIND == 1:
        weight = _pow(-below_one, gamma)
    else:
        weight = tl.full([BLOCK_ROWS], 1.0, dtype=tl.float64)
    tl.store(loss_ptr + rows, (weight * ce).to(tl.float32), mask=valid)
    tl.store(ce_ptr + rows, ce.to(tl.float32), mask=valid)
    tl.store(entropy_ptr + rows, entropy.to(tl.float32), mask=valid)
    tl.store(weight_ptr + rows, weight.to(tl.float32), mask=valid)
    saved = saved_ptr + rows * 4
    tl.store(saved, top.to(tl.float32), mask=valid)
    tl.store(saved + 1, log_z.to(tl.float32), mask=valid)
    tl.store(saved + 2, weight.to(tl.float32), mask=valid)
    tl.store(saved + 3, below_one.to(tl.float32), mask=valid)


@triton.jit
def _gradient_kernel(logits_ptr, grad_ptr, target_ptr, target_stride, saved_ptr, upstream_ptr, upstream_stride,
                     n_rows, width, first_col, inner, stride_outer, stride_inner, stride_col, grad_outer, grad_inner,
                     grad_col, ROWS: tl.constexpr, BLOCK: tl.constexpr, BF16_BY_BITS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    blocks = tl.cdiv(width, BLOCK)
    rows = (pid // blocks) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    cols = ((pid % blocks).to(tl.int32) * BLOCK + tl.arange(0, BLOCK))[None, :]  # int32 indices; offsets: _at
    valid = row_ok[:, None] & (cols < width)
    outer, within = rows // inner, rows % inner
    z = tl.load(logits_ptr + (outer * stride_outer + within * stride_inner)[:, None] + _at(cols, stride_col),
                mask=valid, other=0.0).to(tl.float32)
    saved = saved_ptr + rows * 4
    top = tl.load(saved, mask=row_ok, other=0.0)[:, None]
    log_z = tl.load(saved + 1, mask=row_ok, other=0.0)[:, None]
    g = tl.load(upstream_ptr + rows * upstream_stride, mask=row_ok, other=0.0).to(tl.float32)
    scale = (g * tl.load(saved + 2, mask=row_ok, other=0.0))[:, None]  # g * w
    at_target = tl.load(saved + 3, mask=row_ok, other=0.0)[:, None]  # expm1(-CE) = p_y - 1
    local = (tl.load(target_ptr + rows * target_stride, mask=row_ok, other=0) - first_col)[:, None]
    probs = tl.exp((z - top) - log_z)  # (z - M) first: exact near the maximum even at |M| ~ 1e4; p(-inf) = 0
    value = tl.where(cols == local, at_target, probs) * scale
    out = grad_ptr + (outer * grad_outer + within * grad_inner)[:, None] + _at(cols, grad_col)
    if BF16_BY_BITS:  # the interpreter truncates fp32 -> bf16; round to nearest even by hand there
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(out, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=valid)
    else:
        tl.store(out, value.to(grad_ptr.dtype.element_ty), mask=valid)


def _interpreted() -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - layout of other triton versions
        return False
    return isinstance(_gradient_kernel, InterpretedFunction)


INTERPRETED = _interpreted()


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
    stats = torch.empty(layout.rows * _STATS + _TRAILER, dtype=torch.float32, device=layout.tensor.device)
    tile_rows, block, warps = _tile(layout.rows, layout.width, FORWARD_BLOCK)
    with _device_guard(stats):
        _row_statistics_kernel[(triton.cdiv(layout.rows, tile_rows),)](
            layout.tensor, target, target.stride(0), stats, stats[-_TRAILER:], layout.rows, layout.width, first_col,
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
    saved = torch.empty(rows, _STATS, dtype=torch.float32, device=device)
    with _device_guard(gathered):
        _merge_kernel[(triton.cdiv(rows, MERGE_ROWS),)](
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
        _gradient_kernel[grid](
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
        checks = _checks_active(logits.device)
        if checks:  # trailer (width, input-check setting, bad-target flag); device-side fills
            stats[-2] = 1.0
            stats[-1:] = ((flat_target < 0) | (flat_target >= layout.width * tp_size)).any()
        gathered = all_gather_rows(stats, tp_group)  # the one TP collective
        if _must_read_trailer(checks, tp_group, logits.device):
            _check_inputs(gathered[:, -_TRAILER:], checks, tp_group)
        (loss, ce, entropy, weight), saved = merge(gathered, layout.rows, kind, gamma, sigma)

        ctx.save_for_backward(layout.tensor, flat_target, saved)
        ctx.layout = layout._replace(tensor=None)
        ctx.first_col = first_col
        # In place only on request, never into a leaf's memory (its values are the user's), never where two
        # positions share an address.
        owner = logits if logits._base is None else logits._base
        ctx.inplace = inplace_backward() and not owner.is_leaf and has_distinct_elements(layout)
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
