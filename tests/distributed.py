"""Run functions in N spawned processes with real torch.distributed (gloo, CPU).

    with DistributedPool(world_size=4) as pool:
        results = pool.run(fn, arg)          # fn(ctx, arg) on every rank -> [result of rank 0, ...]

- Rendezvous through a FileStore in a private temporary directory: no fixed ports.
- The processes stay alive between run() calls (spawning costs seconds: torch import), so a test
  module starts one pool and sends it many cases. A worker exception is re-raised in the parent
  with every failing rank's traceback; a hung or crashed world is killed and restarted on the
  next run().
- Sub-groups are built like Megatron (TP-major): for a layout (tp, dp) the world is cut into
  replicas of tp*dp consecutive ranks; inside a replica, local rank l has tp_rank = l % tp and
  dp_rank = l // tp, TP groups are consecutive ranks, DP groups are strided by tp.
- fn must be picklable (a module-level function); results travel back pickled (plain pickle,
  no shared memory).
- env=[{...}, ...] (optional, one dict per rank): environment variables set in that rank's process
  before anything is imported there (e.g. settings read at import that differ between ranks).

Also here: OpRecorder, a TorchDispatchMode that records every aten/c10d op (collectives with the
process group they ran on, host-synchronising ops) — instrumentation of the real calls, no mocks.
"""

from __future__ import annotations

import os
import pickle
import queue
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import multiprocessing as mp

_TESTS_DIR = Path(__file__).resolve().parent
_REPO_ROOT = _TESTS_DIR.parent

DEFAULT_LAYOUTS: tuple[tuple[int, int], ...] = ((1, 1), (2, 1), (4, 1), (1, 2), (2, 2))


class WorkerError(RuntimeError):
    """A function raised on one or more ranks (message holds their tracebacks)."""


@dataclass
class LayoutGroups:
    """This rank's view of one (tp, dp) layout."""

    tp: int
    dp: int
    tp_rank: int
    dp_rank: int
    replica: int  # index of the tp*dp block of ranks this rank belongs to
    tp_group: Any
    dp_group: Any


@dataclass
class WorkerContext:
    rank: int
    world_size: int
    tmpdir: str
    layouts: dict[tuple[int, int], LayoutGroups] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)  # scratch space that survives between tasks

    def layout(self, tp: int, dp: int) -> LayoutGroups:
        return self.layouts[(tp, dp)]


def _build_layouts(rank: int, world_size: int, layouts: Iterable[tuple[int, int]]) -> dict:
    import torch.distributed as dist

    built = {}
    for tp, dp in layouts:
        size = tp * dp
        if world_size % size:
            raise ValueError(f"layout tp={tp} x dp={dp} does not divide world size {world_size}")
        mine = None
        for replica in range(world_size // size):
            base = replica * size
            # Every rank must create every group, in the same order.
            tp_groups = [dist.new_group([base + d * tp + t for t in range(tp)]) for d in range(dp)]
            dp_groups = [dist.new_group([base + d * tp + t for d in range(dp)]) for t in range(tp)]
            if base <= rank < base + size:
                local = rank - base
                t, d = local % tp, local // tp
                mine = LayoutGroups(tp, dp, t, d, replica, tp_groups[d], dp_groups[t])
        built[(tp, dp)] = mine
    return built


def _worker(rank: int, world_size: int, tmpdir: str, layouts, tasks, results, parent_pid: int,
            env: dict[str, str] | None = None) -> None:
    os.environ.update(env or {})
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["OMP_NUM_THREADS"] = "1"
    for path in (str(_REPO_ROOT), str(_TESTS_DIR)):
        if path not in sys.path:
            sys.path.insert(0, path)
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{tmpdir}/rdzv", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=60))
        ctx = WorkerContext(rank, world_size, tmpdir, _build_layouts(rank, world_size, layouts))
        results.put((-1, rank, True, b"ready"))
    except BaseException:  # noqa: BLE001 - report start-up failures to the parent
        results.put((-1, rank, False, traceback.format_exc()))
        return
    while True:
        try:
            item = tasks.get(timeout=5.0)
        except queue.Empty:
            if os.getppid() != parent_pid:  # parent gone: do not linger
                return
            continue
        if item is None:
            break
        task_id, payload = item
        try:
            fn, args, kwargs = pickle.loads(payload)
            value = fn(ctx, *args, **kwargs)
            results.put((task_id, rank, True, pickle.dumps(value)))
        except BaseException:  # noqa: BLE001 - every failure goes back to the parent
            results.put((task_id, rank, False, traceback.format_exc()))
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort on shutdown
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip the slow interpreter teardown; nothing is left to flush


class DistributedPool:
    """world_size persistent gloo workers; see the module docstring."""

    def __init__(self, world_size: int, layouts: Iterable[tuple[int, int]] = DEFAULT_LAYOUTS,
                 start_timeout: float = 180.0, env: Sequence[dict[str, str]] | None = None) -> None:
        if env is not None and len(env) != world_size:
            raise ValueError(f"env needs one dict per rank ({world_size}), got {len(env)}")
        self.env = [dict(e) for e in env] if env is not None else [{} for _ in range(world_size)]
        self.world_size = world_size
        self.layouts = tuple(layouts)
        self.start_timeout = start_timeout
        self._procs: list = []
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._task_id = 0

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._procs:
            return
        ctx = mp.get_context("spawn")
        self._tmp = tempfile.TemporaryDirectory(prefix="mile_dist_")
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        for rank in range(self.world_size):
            proc = ctx.Process(target=_worker, daemon=True, name=f"mile-test-rank{rank}",
                               args=(rank, self.world_size, self._tmp.name, self.layouts,
                                     self._tasks[rank], self._results, os.getpid(), self.env[rank]))
            proc.start()
            self._procs.append(proc)
        replies = self._collect(-1, self.start_timeout, grace=10.0)
        failed = {rank: text for rank, (ok, text) in replies.items() if not ok}
        if failed or len(replies) < self.world_size:
            self.close(force=True)
            raise WorkerError("distributed workers failed to start:\n" + _format_failures(failed, replies,
                                                                                         self.world_size))

    def close(self, force: bool = False) -> None:
        procs, self._procs = self._procs, []
        if not force:
            for q in self._tasks if procs else ():
                q.put(None)
            for proc in procs:
                proc.join(timeout=20)
        for proc in procs:  # only the processes this pool started
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> DistributedPool:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- running ----------------------------------------------------------------------------
    def run(self, fn: Callable, *args, timeout: float = 120.0, **kwargs) -> list:
        """fn(ctx, *args, **kwargs) on every rank; returns the per-rank results in rank order."""
        self.start()
        self._task_id += 1
        payload = pickle.dumps((fn, args, kwargs))
        for q in self._tasks:
            q.put((self._task_id, payload))
        replies = self._collect(self._task_id, timeout, grace=5.0)
        failed = {rank: text for rank, (ok, text) in replies.items() if not ok}
        if len(replies) < self.world_size:
            # Some ranks never answered (hung in a collective or died): the world is unusable.
            self.close(force=True)
        if failed or len(replies) < self.world_size:
            raise WorkerError(f"{getattr(fn, '__name__', fn)} failed:\n"
                              + _format_failures(failed, replies, self.world_size))
        return [pickle.loads(replies[rank][1]) for rank in range(self.world_size)]

    def _collect(self, task_id: int, timeout: float, grace: float) -> dict[int, tuple[bool, Any]]:
        """Replies for task_id; stops at timeout, or `grace` seconds after the first failure."""
        replies: dict[int, tuple[bool, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(replies) < self.world_size and time.monotonic() < deadline:
            try:
                got_id, rank, ok, data = self._results.get(timeout=0.5)
            except queue.Empty:
                dead = [p for p in self._procs if not p.is_alive()]
                if dead:
                    deadline = min(deadline, time.monotonic() + 2.0)
                    for proc in dead:
                        rank = self._procs.index(proc)
                        replies.setdefault(rank, (False, f"process exited with code {proc.exitcode}"))
                continue
            if got_id != task_id:
                continue  # a late reply of an earlier, abandoned task
            replies[rank] = (ok, data)
            if not ok:
                deadline = min(deadline, time.monotonic() + grace)
        return replies


def _format_failures(failed: dict, replies: dict, world_size: int) -> str:
    parts = [f"--- rank {rank} ---\n{text}" for rank, text in sorted(failed.items())]
    missing = [rank for rank in range(world_size) if rank not in replies]
    if missing:
        parts.append(f"--- ranks {missing} did not answer in time (hung in a collective?) ---")
    return "\n".join(parts)


def run_distributed(fn: Callable, world_size: int, *args, layouts: Iterable[tuple[int, int]] = (),
                    timeout: float = 120.0, **kwargs) -> list:
    """One-shot: start a world, run fn(ctx, *args, **kwargs) on every rank, shut it down."""
    with DistributedPool(world_size, layouts) as pool:
        return pool.run(fn, *args, timeout=timeout, **kwargs)


# -- instrumentation ---------------------------------------------------------------------------

HOST_SYNC_OPS = frozenset({
    "aten._local_scalar_dense.default",  # .item(), bool(), int(), float()
    "aten.is_nonzero.default", "aten.equal.default", "aten.allclose.default",
    "aten.nonzero.default", "aten.masked_select.default", "aten._unique2.default",
    "aten.unique_consecutive.default", "aten.unique_dim.default",
})


def _recorder_class():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpRecorder(TorchDispatchMode):
        """Records every op dispatched while active: collectives with their group, host syncs.

        Sees the real calls however they are made (torch.distributed, functional collectives,
        custom autograd functions, backward), because it sits in the dispatcher.
        """

        def __init__(self, groups: dict[str, Any] | None = None) -> None:
            super().__init__()
            self.names = {}  # group_name -> label
            for label, group in (groups or {}).items():
                if group is not None:
                    self.names[group.group_name] = label
            self.collectives: list[tuple[str, str]] = []  # (op, group label)
            self.host_syncs: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = str(func)
            if func.namespace in ("c10d", "_c10d_functional", "c10d_functional"):
                self.collectives.append((name, self._group_of(list(args) + list(kwargs.values()))))
            elif name in HOST_SYNC_OPS or (name.startswith("aten.index") and _has_bool_index(args[1:])):
                self.host_syncs.append(name)
            return func(*args, **kwargs)

        def _group_of(self, values) -> str:
            process_group = torch._C._distributed_c10d.ProcessGroup
            for value in values:
                if isinstance(value, str) and value in self.names:
                    return self.names[value]
                if isinstance(value, torch.ScriptObject) and value._type().name() == "ProcessGroup":
                    name = process_group.unbox(value).group_name
                    return self.names.get(name, f"group {name}")
            return "unknown"

        # Tensor.tolist() / .numpy() read CPU memory without dispatching an op: wrap them too.
        _HOST_READS = ("tolist", "numpy", "__array__")

        def __enter__(self):
            self._saved = {attr: getattr(torch.Tensor, attr) for attr in self._HOST_READS}
            for attr, original in self._saved.items():
                setattr(torch.Tensor, attr, self._host_read(attr, original))
            return super().__enter__()

        def __exit__(self, *exc):
            for attr, original in self._saved.items():
                setattr(torch.Tensor, attr, original)
            return super().__exit__(*exc)

        def _host_read(self, attr, original):
            def wrapper(tensor, *args, **kwargs):
                self.host_syncs.append(f"Tensor.{attr}")
                return original(tensor, *args, **kwargs)
            return wrapper

        def count(self, label: str) -> int:
            return sum(1 for _, group in self.collectives if group == label)

    def _has_bool_index(args) -> bool:
        for value in args:
            items = value if isinstance(value, (list, tuple)) else [value]
            for item in items:
                if isinstance(item, torch.Tensor) and item.dtype in (torch.bool, torch.uint8) and item.dim() > 0:
                    return True
        return False

    return OpRecorder


def OpRecorder(groups: dict[str, Any] | None = None):  # noqa: N802 - reads like a class
    """OpRecorder(groups={"tp": tp_group, "dp": dp_group}); use as a context manager."""
    return _recorder_class()(groups)
