"""Process-group helpers: Megatron's groups when Megatron is initialised, plain torch.distributed otherwise.

`None` as a group means "no parallelism" everywhere in this package (size 1, rank 0, collectives are no-ops),
so single-process code never needs torch.distributed to be initialised. The loss entry points resolve a `None`
argument to Megatron's group when Megatron is initialised; NO_GROUP means "no parallelism" even then.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist



class _NoGroup:
    """Explicitly no parallelism (size 1, rank 0), also when Megatron's parallel state is initialised."""

    def __repr__(self) -> str:
        return "NO_GROUP"


NO_GROUP = _NoGroup()
ProcessGroup = dist.ProcessGroup | _NoGroup | None


def _initialized_parallel_state():
    """megatron.core.parallel_state if it was imported by the caller and is initialised, else None.

    Never imports Megatron itself: using the loss without Megatron must not pay for (or require) the import.
    """
    state = sys.modules.get("megatron.core.parallel_state")
    if state is None or not state.model_parallel_is_initialized():
        return None
    return state


def resolve_tp_group(tp_group: ProcessGroup) -> ProcessGroup:
    """The given tensor-parallel group, else Megatron's, else None (no tensor parallelism); NO_GROUP -> None."""
    if tp_group is NO_GROUP:
        return None
    if tp_group is not None:
        return tp_group
    state = _initialized_parallel_state()
    return state.get_tensor_model_parallel_group() if state is not None else None


def resolve_dp_group(dp_group: ProcessGroup) -> ProcessGroup:
    """The given data-parallel group, else Megatron's (context-parallel ranks included), else None.

    Context-parallel ranks hold different tokens of the same sequences, so a mean over "all counted tokens"
    runs over data-parallel x context-parallel ranks. NO_GROUP -> None.
    """
    if dp_group is NO_GROUP:
        return None
    if dp_group is not None:
        return dp_group
    state = _initialized_parallel_state()
    return state.get_data_parallel_group(with_context_parallel=True) if state is not None else None


def group_size(group: ProcessGroup) -> int:
    if group is None or group is NO_GROUP or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group: ProcessGroup) -> int:
    if group is None or group is NO_GROUP or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


def all_gather_rows(tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Gather a 1-D tensor from every rank of `group`: result [group_size, numel], row r from rank r."""
    size = group_size(group)
    flat = tensor.contiguous().view(-1)
    if size == 1:
        return flat.unsqueeze(0)
    gathered = torch.empty(size * flat.numel(), dtype=flat.dtype, device=flat.device)
    gather_single = getattr(dist, "all_gather_single", None)
    if gather_single is not None:
        gather_single(gathered, flat, group=group)
    else:
        dist.all_gather_into_tensor(gathered, flat, group=group)
    return gathered.view(size, -1)


def all_reduce_sum(tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Sum `tensor` over `group` in place (no-op without parallelism); returns it."""
    if group_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor
