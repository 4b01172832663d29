"""The Triton kernels (@triton.jit only) of the weighted vocab-parallel cross-entropy: two launches per forward,
one per backward; their launchers and autograd function are in function.py.

Same quantities and formulas as the torch path (mile_megatron/loss/vocab_parallel.py); only the evaluation differs.
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

import triton
import triton.language as tl

from ..common import FLOOR

_FLOOR = tl.constexpr(FLOOR)  # logits below read as FLOOR (-inf: masked vocabulary entries); z_y is read as is
_EMPTY = tl.constexpr(2.0 * FLOOR)  # masked lanes: e^(_EMPTY - m) = 0 even next to FLOOR, products stay finite


@triton.jit
def _at(index, stride):
    """Element offset index * stride in int64 (index: int32 column indices; the product may pass 2^31)."""
    return index.to(tl.int64) * stride


@triton.jit
def _floored(z):
    """z, with every value below FLOOR (-inf included) as FLOOR; NaN stays NaN."""
    return tl.where(z < _FLOOR, _FLOOR, z)


@triton.jit
def row_statistics_kernel(logits_ptr, target_ptr, target_stride, stats_ptr, trailer_ptr, n_rows, width, first_col,
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
def merge_kernel(gathered_ptr, rank_stride, tp, n_rows, loss_ptr, ce_ptr, entropy_ptr, weight_ptr, saved_ptr,
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
def gradient_kernel(logits_ptr, grad_ptr, target_ptr, target_stride, saved_ptr, upstream_ptr, upstream_stride,
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
    return isinstance(gradient_kernel, InterpretedFunction)


INTERPRETED = _interpreted()
