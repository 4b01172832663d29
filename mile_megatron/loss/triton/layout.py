"""How the Triton kernels address the rows of a [..., V] logits tensor without copying it.

Row i (row-major over the leading dimensions, the order of target.reshape(-1)) starts at element offset

    (i // inner) * stride_outer + (i % inner) * stride_inner

and its column j at + j * stride_col. Leading dimensions of size 1 are dropped and neighbours that reshape could
merge (stride[k] == stride[k+1] * size[k+1]) are merged, so every tensor whose leading dimensions collapse into at
most two strided groups is read in place: contiguous [s, b, V], a [b, s, V] tensor transposed to [s, b, V], row
slices, column slices (stride_col != 1). Anything else is copied once (contiguous).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class RowLayout(NamedTuple):
    tensor: torch.Tensor  # what the kernels read: the logits themselves, or their contiguous copy
    rows: int
    width: int
    inner: int
    stride_outer: int
    stride_inner: int
    stride_col: int
    copied: bool


def _leading_groups(tensor: torch.Tensor) -> list[tuple[int, int]]:
    """(size, stride) of the leading dimensions, outer to inner, size-1 dropped, mergeable neighbours merged."""
    groups: list[tuple[int, int]] = []
    for size, stride in zip(tensor.shape[:-1], tensor.stride()[:-1]):
        if size == 1:
            continue
        if groups and groups[-1][1] == stride * size:
            groups[-1] = (groups[-1][0] * size, stride)
        else:
            groups.append((size, stride))
    return groups


def row_layout(logits: torch.Tensor) -> RowLayout:
    """The layout of `logits` as rows for the kernels (copies only when > 2 strided groups remain)."""
    copied = False
    groups = _leading_groups(logits)
    if len(groups) > 2:
        logits = logits.contiguous()
        groups = _leading_groups(logits)
        copied = True
    rows = math.prod(logits.shape[:-1])
    if not groups:
        inner, outer_stride, inner_stride = 1, 0, 0
    elif len(groups) == 1:
        inner, outer_stride, inner_stride = groups[0][0], 0, groups[0][1]
    else:
        inner, outer_stride, inner_stride = groups[1][0], groups[0][1], groups[1][1]
    return RowLayout(logits, rows, logits.shape[-1], inner, outer_stride, inner_stride, logits.stride(-1), copied)


def has_distinct_elements(layout: RowLayout) -> bool:
    """True when no two (row, column) positions share memory (then writing every element in place is safe).

    Sufficient test: sorted by stride, every dimension's stride exceeds the span of the dimensions below it.
    """
    dims = [(layout.width, layout.stride_col)]
    if layout.rows > 1:
        outer = layout.rows // layout.inner
        dims += [(layout.inner, layout.stride_inner), (outer, layout.stride_outer)]
    span = 0
    for size, stride in sorted((d for d in dims if d[0] > 1), key=lambda d: d[1]):
        if stride <= span:
            return False
        span += (size - 1) * stride
    return True
