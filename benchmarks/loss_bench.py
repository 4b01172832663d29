"""Forward + backward time, bandwidth and extra memory of the MiLe loss against other loss implementations.

    .venv/bin/python benchmarks/loss_bench.py            # CUDA; writes benchmarks/results/loss_bench.json
    .venv/bin/python benchmarks/loss_bench.py --tp 2     # vocabulary split over 2 GPUs (relaunches under torchrun)
    .venv/bin/python benchmarks/loss_bench.py --smoke    # CPU, tiny shapes (checks that the script works)

For each shape [tokens, V] (default 16384x32000, 8192x128256, 16384x4000 = one TP=8 shard of 32000; bf16) and
each method, one timed iteration is: scalar loss over all tokens, then backward into the logits (a leaf
tensor). Methods:
  ours-triton-mile / -ce   mile_megatron.mile_loss (kind mile, alpha global / kind ce) with
                           mile_megatron.set_loss_backend("triton")
  ours-triton-mile-inplace the same with the opt-in in-place backward (when this checkout has the option)
  ours-torch-mile / -ce    the same with set_loss_backend("torch"): the project's exact torch path
  torch-ce-fp32            torch.nn.functional.cross_entropy(logits.float(), target)
  megatron-ce              megatron.core.tensor_parallel.vocab_parallel_cross_entropy(logits, target).mean()
  liger-ce                 Liger-Kernel's LigerCrossEntropyLoss (only when liger_kernel imports; CUDA only)
  paper-eager-mile         the paper's formula in eager torch, written here from the paper's math (below)
  compile-mile             torch.compile of paper-eager-mile (the clamp included)
The paper's formula: z = fp32(logits), p = softmax(z) clamped to [1e-8, 1], H = -sum p log p,
w = (sigma + H)^gamma, alpha = 1 / mean(w); loss = mean(alpha * w * CE). H, w and alpha come from the detached
logits (constants for the gradient), as in this project's loss.

Numbers per row:
  time_ms            median over --repeats timed iterations after --warmup untimed ones (CUDA events around
                     forward + backward; a wall clock on CPU). Methods that write into their input (Liger's
                     in-place gradient, the in-place option, Megatron's on fp32 logits) get a fresh copy of the
                     logits before each iteration; the copy is made before the start event and is not timed.
  bandwidth_fraction ideal bytes / time / measured copy bandwidth. Ideal bytes = what any exact design must
                     move: read the logits in forward, read them again and write the gradient in backward
                     (6 bytes per element in bf16). Copy bandwidth: a large device-to-device copy, counting the
                     bytes read and written. floor_ms = ideal bytes / copy bandwidth.
  extra_peak_mib     max_memory_allocated during one forward + backward minus what was allocated before it
                     (inputs, references) minus the gradient itself (0 when the gradient reuses the input's
                     storage). CUDA only (null on CPU).
  loss_abs_diff, grad_max_abs_diff, grad_rel_diff  against this project's torch path on the same inputs
                     (ours-torch-mile for MiLe rows, ours-torch-ce for cross-entropy rows); grad_rel_diff is
                     max|g - g_ref| / max|g_ref|. The paper's formula differs by its clamp (H biased up by at most
                     V x 1.84e-7 nats).
With --tp T (T GPUs, torchrun) each rank holds [tokens, V/T] of the logits; only the vocab-parallel methods
(ours, Megatron's) run; times and differences are the maximum over ranks.
Our input checks (host synchronising) are off unless --input-checks: the other methods check nothing either.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import mile_megatron  # noqa: E402
from mile_megatron.loss import mile_loss  # noqa: E402
from mile_megatron.loss import settings as loss_settings  # noqa: E402

DEFAULT_SHAPES = ("16384x32000", "8192x128256", "16384x4000")
SMOKE_SHAPES = ("64x1000", "48x257")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MIB = 2**20


# ----------------------------------------------------------------------------------------------
# The paper's formula (written from the paper's math; see the module docstring).
def paper_mile_terms(logits: torch.Tensor, target: torch.Tensor, gamma: float = 1.0, sigma: float = 1.0):
    """Per-token (CE, H, w) of the paper's formula for [N, V] logits; H and w come from the detached logits."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 (fp64 stays fp64)
    ce = F.cross_entropy(z, target, reduction="none")
    p = torch.softmax(z.detach(), dim=-1).clamp(1e-8, 1.0)
    entropy = -(p * p.log()).sum(dim=-1)
    return ce, entropy, (sigma + entropy).pow(gamma)


def paper_mile_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 1.0, sigma: float = 1.0):
    """mean(alpha * w * CE) with alpha = 1 / mean(w) (a constant: w is)."""
    ce, _, weight = paper_mile_terms(logits, target, gamma, sigma)
    alpha = 1.0 / weight.mean()
    return (alpha * weight * ce).mean()


_compiled_paper_mile_loss = None


def compiled_paper_mile_loss(logits, target, gamma, sigma):
    global _compiled_paper_mile_loss
    if _compiled_paper_mile_loss is None:
        _compiled_paper_mile_loss = torch.compile(paper_mile_loss, dynamic=False)
    return _compiled_paper_mile_loss(logits, target, gamma, sigma)


# ----------------------------------------------------------------------------------------------
# Methods.
@dataclass(frozen=True)
class Method:
    name: str
    kind: str               # "mile" or "ce": which torch-path reference it is compared with
    vocab_parallel: bool    # runs on a vocabulary shard (TP > 1)
    backend: str | None = None  # our loss backend to select ("triton" / "torch"), None for other libraries
    overwrites_input: bool = False
    inplace_backward: bool = False


METHODS: tuple[Method, ...] = (
    Method("ours-triton-mile", "mile", True, backend="triton"),
    Method("ours-triton-ce", "ce", True, backend="triton"),
    Method("ours-triton-mile-inplace", "mile", True, backend="triton", overwrites_input=True,
           inplace_backward=True),
    Method("ours-torch-mile", "mile", True, backend="torch"),
    Method("ours-torch-ce", "ce", True, backend="torch"),
    Method("torch-ce-fp32", "ce", False),
    Method("megatron-ce", "ce", True),
    Method("liger-ce", "ce", False, overwrites_input=True),
    Method("paper-eager-mile", "mile", False),
    Method("compile-mile", "mile", False),
)
METHOD_NAMES = tuple(method.name for method in METHODS)
SMOKE_METHODS = ("ours-triton-mile", "ours-triton-ce", "ours-torch-mile", "ours-torch-ce", "torch-ce-fp32",
                 "megatron-ce", "paper-eager-mile")
REFERENCE = {"mile": "ours-torch-mile", "ce": "ours-torch-ce"}


class Skip(Exception):
    """This method cannot run in this setting (missing library, CPU, TP); not a failure."""


def backend_in_use(device: torch.device) -> str:
    """What mile_megatron.loss.settings.loss_backend says it runs on `device`."""
    return loss_settings.loss_backend(device)


def check_available(method: Method, device: torch.device, tp: int) -> None:
    """Raise Skip when `method` cannot run here."""
    if tp > 1 and not method.vocab_parallel:
        raise Skip("needs the full vocabulary (TP=1 only)")
    if method.backend == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise Skip("Triton on CPU needs TRITON_INTERPRET=1")
    if method.name == "liger-ce":
        if device.type != "cuda":
            raise Skip("Liger-Kernel needs CUDA")
        try:
            import liger_kernel.transformers  # noqa: F401
        except ImportError:
            raise Skip("liger_kernel is not installed (pip install liger-kernel)") from None
    if method.name == "compile-mile" and device.type != "cuda":
        raise Skip("torch.compile is benchmarked on CUDA only (CPU compilation is slow and not the target)")
    if method.name == "megatron-ce":
        try:
            import megatron.core.tensor_parallel.cross_entropy  # noqa: F401
        except ImportError:
            raise Skip("megatron-core is not installed") from None


def make_loss_fn(method: Method, group, gamma: float, sigma: float):
    """fn(logits, target) -> scalar loss (mean over tokens, as every method's own default reduction)."""
    name = method.name
    if method.backend is not None:
        kind = method.kind
        alpha = "global" if kind == "mile" else "none"

        def ours(logits, target):
            return mile_loss(logits, target, kind=kind, gamma=gamma, sigma=sigma, alpha=alpha, tp_group=group)

        return ours
    if name == "torch-ce-fp32":
        return lambda logits, target: F.cross_entropy(logits.float(), target)
    if name == "megatron-ce":
        from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy

        # The group is passed explicitly, so megatron.core.parallel_state need not be initialised.
        return lambda logits, target: vocab_parallel_cross_entropy(logits, target, tp_group=group).mean()
    if name == "liger-ce":
        from liger_kernel.transformers import LigerCrossEntropyLoss

        return LigerCrossEntropyLoss()
    if name == "paper-eager-mile":
        return lambda logits, target: paper_mile_loss(logits, target, gamma, sigma)
    if name == "compile-mile":
        return lambda logits, target: compiled_paper_mile_loss(logits, target, gamma, sigma)
    raise ValueError(f"unknown method {name!r}")


class method_settings:
    """Select our backend (and the in-place option) for one method; restore the previous settings afterwards."""

    def __init__(self, method: Method):
        self.method = method
        self.previous = None

    def __enter__(self):
        if self.method.backend is not None:
            self.previous = loss_settings.loss_backend_setting()
            loss_settings.set_loss_backend(self.method.backend)
        if self.method.inplace_backward:
            loss_settings.set_inplace_backward(True)
        return self

    def __exit__(self, *exc):
        if self.method.inplace_backward:
            loss_settings.set_inplace_backward(False)
        if self.previous is not None:
            loss_settings.set_loss_backend(self.previous)
        return False


# ----------------------------------------------------------------------------------------------
# Timing and memory.
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def leaf(logits: torch.Tensor, fresh: bool) -> torch.Tensor:
    x = logits.detach().clone() if fresh else logits
    return x.requires_grad_(True)


def time_fwd_bwd(fn, logits, target, fresh: bool, warmup: int, repeats: int, device) -> list[float]:
    """Per-iteration forward + backward times in ms (the timed region excludes making a fresh input)."""
    times: list[float] = []
    events = []
    for index in range(warmup + repeats):
        x = leaf(logits, fresh)
        x.grad = None
        timed = index >= warmup
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x, target).backward()
            end.record()
            if timed:
                events.append((start, end))
        else:
            began = time.perf_counter()
            fn(x, target).backward()
            if timed:
                times.append((time.perf_counter() - began) * 1e3)
        x.grad = None
        del x
    synchronize(device)
    times += [start.elapsed_time(end) for start, end in events]
    return times


def measured_run(fn, logits, target, fresh: bool, device) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """One more forward + backward: (loss, gradient, extra peak MiB beyond inputs and gradient)."""
    x = leaf(logits, fresh)
    x.grad = None
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    loss = fn(x, target)
    loss.backward()
    synchronize(device)
    grad = x.grad
    extra = None
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        aliased = grad.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
        grad_bytes = 0 if aliased else grad.numel() * grad.element_size()
        extra = (peak - before - grad_bytes) / MIB
    return loss.detach().float(), grad, extra


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    """Bytes/s of a device-to-device copy, counting each byte read and each byte written."""
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            began = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - began)
    del src, dst
    return 2 * nbytes / statistics.median(times)


# ----------------------------------------------------------------------------------------------
# Distributed set-up.
def parse_shape(text: str) -> tuple[int, int]:
    try:
        tokens, vocab = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 16384x32000 (tokens x vocabulary), got {text!r}")
    if tokens < 1 or vocab < 2:
        raise argparse.ArgumentTypeError(f"shape {text!r}: need at least 1 token and 2 vocabulary entries")
    return tokens, vocab


def relaunch_with_torchrun(args: argparse.Namespace, argv: list[str]) -> int:
    """--tp T outside torchrun: start T processes of this script under torchrun."""
    if not args.smoke and torch.cuda.device_count() < args.tp:
        raise SystemExit(f"loss_bench: --tp {args.tp} needs {args.tp} CUDA devices, found "
                         f"{torch.cuda.device_count()} (use --smoke for a CPU run with gloo)")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.tp}",
               str(Path(__file__).resolve()), *argv]
    env = dict(os.environ)
    if args.smoke:
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return subprocess.call(command, env=env)


def init_group(device: torch.device, world: int):
    """The process group the vocab-parallel methods use: all ranks of this run (one rank at TP=1)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend)
    else:
        handle, path = tempfile.mkstemp(prefix="loss_bench_store_")
        os.close(handle)
        os.unlink(path)
        dist.init_process_group(backend, init_method=f"file://{path}", rank=0, world_size=1)
    if dist.get_world_size() != world:
        raise SystemExit(f"loss_bench: --tp {world} but torchrun started {dist.get_world_size()} processes")
    return dist.group.WORLD


def reduce_max(values: list[float], device: torch.device) -> list[float]:
    """Element-wise maximum over ranks (nan-free values; None entries sent as -inf)."""
    if dist.get_world_size() == 1:
        return values
    tensor = torch.tensor([-math.inf if v is None else v for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [None if v == -math.inf else v for v in tensor.tolist()]


# ----------------------------------------------------------------------------------------------
# One shape.
def make_inputs(tokens: int, vocab: int, tp: int, rank: int, dtype, device, seed: int):
    """This rank's logits shard [tokens, vocab / tp] (N(0, 2^2), never zeros) and the global targets."""
    width = vocab // tp
    generator = torch.Generator(device=device)
    generator.manual_seed(seed + 1000 * rank)
    logits = (2.0 * torch.randn(tokens, width, generator=generator, device=device)).to(dtype)
    generator.manual_seed(seed)
    target = torch.randint(0, vocab, (tokens,), generator=generator, device=device)
    return logits, target


def bench_shape(shape, methods, args, device, group, rank: int) -> list[dict]:
    tokens, vocab = shape
    tp = args.tp
    dtype = DTYPES[args.dtype]
    logits, target = make_inputs(tokens, vocab, tp, rank, dtype, device, args.seed)
    element = logits.element_size()
    ideal_bytes = logits.numel() * 3 * element  # read (forward) + read and write (backward), per rank
    rows = []
    references: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for kind, name in REFERENCE.items():
        if any(method.kind == kind for method in methods):
            method = next(m for m in METHODS if m.name == name)
            with method_settings(method):
                loss, grad, _ = measured_run(make_loss_fn(method, group, args.gamma, args.sigma), logits, target,
                                             False, device)
            references[kind] = (loss, grad)
    for method in methods:
        row = {"shape": [tokens, vocab], "tp": tp, "shard": [tokens, vocab // tp], "dtype": args.dtype,
               "method": method.name, "loss_kind": method.kind, "reference": REFERENCE[method.kind],
               "status": "ok", "reason": None, "backend": None, "time_ms": None, "time_ms_min": None,
               "time_ms_max": None, "ideal_bytes": ideal_bytes, "floor_ms": None, "bandwidth_fraction": None,
               "extra_peak_mib": None, "loss": None, "loss_abs_diff": None, "grad_max_abs_diff": None,
               "grad_rel_diff": None}
        try:
            check_available(method, device, tp)
            fresh = method.overwrites_input or (method.name == "megatron-ce" and dtype == torch.float32)
            with method_settings(method):
                if method.backend is not None:
                    row["backend"] = backend_in_use(device)
                fn = make_loss_fn(method, group, args.gamma, args.sigma)
                if group is not None and tp > 1:
                    dist.barrier()
                times = time_fwd_bwd(fn, logits, target, fresh, args.warmup, args.repeats, device)
                loss, grad, extra = measured_run(fn, logits, target, fresh, device)
            ref_loss, ref_grad = references[method.kind]
            grad_diff = (grad.float() - ref_grad.float()).abs().max().item()
            ref_scale = ref_grad.float().abs().max().item()
            median = statistics.median(times)
            measured = reduce_max([median, min(times), max(times), extra, abs(loss - ref_loss).item(), grad_diff,
                                   grad_diff / ref_scale if ref_scale > 0 else None], device)
            median, low, high, extra, loss_diff, grad_diff, rel = measured
            row.update(time_ms=median, time_ms_min=low, time_ms_max=high, extra_peak_mib=extra,
                       loss=loss.item(), loss_abs_diff=loss_diff, grad_max_abs_diff=grad_diff, grad_rel_diff=rel,
                       floor_ms=ideal_bytes / args.copy_bandwidth * 1e3)
            row["bandwidth_fraction"] = row["floor_ms"] / median
            del grad, loss
        except Skip as reason:
            row.update(status="skipped", reason=str(reason))
        except Exception as error:  # noqa: BLE001  (a failing method is reported, the others still run)
            row.update(status="error", reason=f"{type(error).__name__}: {str(error).splitlines()[0][:300]}")
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del logits, target, references
    gc.collect()  # slow with Megatron imported (~0.3 s): once per shape
    return rows


# ----------------------------------------------------------------------------------------------
# Report.
def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device, args: argparse.Namespace) -> dict:
    info = {
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({platform.processor() or platform.machine()})"),
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": version("triton"),
        "megatron_core": version("megatron-core"), "liger_kernel": version("liger-kernel"),
        "mile_megatron": mile_megatron.__version__, "python": platform.python_version(),
        "machine": platform.platform(), "world_size": args.tp,
        "loss_backend_env": os.environ.get("MILE_MEGATRON_LOSS_BACKEND"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(device_memory_gib=properties.total_memory / 2**30, multiprocessors=properties.multi_processor_count)
    return info


def fmt(value, spec: str) -> str:
    width = int(spec.split(".")[0] or 0)
    return "-".rjust(width) if value is None else format(value, spec)


def print_table(result: dict) -> None:
    env = result["environment"]
    print(f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | "
          f"megatron-core {env['megatron_core']} | liger-kernel {env['liger_kernel']} | TP {env['world_size']}")
    print(f"copy bandwidth: {result['copy_bandwidth_gbs']:.0f} GB/s (read + write); "
          f"dtype {result['settings']['dtype']}")
    header = (f"{'shape':>14} {'method':<25} {'fwd+bwd ms':>10} {'floor ms':>9} {'BW frac':>7} {'extra MiB':>9} "
              f"{'loss diff':>9} {'grad rel':>9}  note")
    print(header)
    print("-" * len(header))
    for row in result["rows"]:
        shape = f"{row['shape'][0]}x{row['shape'][1]}"
        note = row["reason"] or ""
        if row["status"] == "ok" and row["backend"]:
            note = f"backend {row['backend']}"
        print(f"{shape:>14} {row['method']:<25} {fmt(row['time_ms'], '10.3f')} {fmt(row['floor_ms'], '9.3f')} "
              f"{fmt(row['bandwidth_fraction'], '7.2f')} {fmt(row['extra_peak_mib'], '9.0f')} "
              f"{fmt(row['loss_abs_diff'], '9.1e')} {fmt(row['grad_rel_diff'], '9.1e')}  "
              f"{row['status'] if row['status'] != 'ok' else ''}{': ' if row['status'] != 'ok' else ''}{note}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=None,
                        help=f"tokens x vocabulary (default {' '.join(DEFAULT_SHAPES)}; "
                             f"smoke: {' '.join(SMOKE_SHAPES)})")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--methods", nargs="+", choices=METHOD_NAMES, default=None,
                        help="default: all (smoke: the CPU-capable ones)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size: ranks sharing the vocabulary")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations (default 5; smoke 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed iterations (default 20; smoke 3)")
    parser.add_argument("--gamma", type=float, default=1.0)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--copy-mib", type=int, default=None, help="copy-bandwidth buffer (default 2048; smoke 64)")
    parser.add_argument("--input-checks", action="store_true",
                        help="keep our host-synchronising input checks on (default off, like the other methods)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: checks that the script works")
    parser.add_argument("--json", default=None,
                        help="output (default benchmarks/results/loss_bench.json; smoke: loss_bench_smoke.json)")
    args = parser.parse_args(argv)
    if args.tp < 1:
        parser.error("--tp must be >= 1")
    args.shapes = args.shapes or [parse_shape(s) for s in (SMOKE_SHAPES if args.smoke else DEFAULT_SHAPES)]
    for tokens, vocab in args.shapes:
        if vocab % args.tp:
            parser.error(f"vocabulary {vocab} is not divisible by --tp {args.tp}")
    args.methods = args.methods or list(SMOKE_METHODS if args.smoke else METHOD_NAMES)
    args.warmup = (1 if args.smoke else 5) if args.warmup is None else args.warmup
    args.repeats = (3 if args.smoke else 20) if args.repeats is None else args.repeats
    args.copy_mib = (64 if args.smoke else 2048) if args.copy_mib is None else args.copy_mib
    name = "loss_bench_smoke.json" if args.smoke else "loss_bench.json"
    if args.tp > 1 and not args.smoke:
        name = f"loss_bench_tp{args.tp}.json"
    args.json = args.json or str(HERE / "results" / name)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.tp > 1 and "WORLD_SIZE" not in os.environ:
        return relaunch_with_torchrun(args, argv)
    if args.smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        raise SystemExit("loss_bench: no CUDA device; real numbers need a GPU (use --smoke to check the script on CPU)")
    if not args.input_checks:
        mile_megatron.set_input_checks(False)
    group = init_group(device, args.tp)
    rank = dist.get_rank()
    args.copy_bandwidth = copy_bandwidth(device, args.copy_mib * MIB, repeats=10 if args.smoke else 20)
    methods = [method for method in METHODS if method.name in args.methods]
    settings = {key: value for key, value in vars(args).items() if key != "copy_bandwidth"}
    settings["shapes"] = [f"{t}x{v}" for t, v in args.shapes]
    result = {"benchmark": "loss_bench", "command": " ".join([sys.executable, *sys.argv]), "settings": settings,
              "environment": environment(device, args), "copy_bandwidth_gbs": args.copy_bandwidth / 1e9,
              "complete": False, "rows": []}
    for shape in args.shapes:
        began = time.perf_counter()
        result["rows"] += bench_shape(shape, methods, args, device, group, rank)
        result["complete"] = shape == args.shapes[-1]
        if rank == 0:  # written after every shape, so a run stopped by a timeout keeps what it measured
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
            print(f"loss_bench: {shape[0]}x{shape[1]} done in {time.perf_counter() - began:.0f} s", file=sys.stderr,
                  flush=True)
    errors = [row for row in result["rows"] if row["status"] == "error"]
    if rank == 0:
        print_table(result)
        print(f"wrote {args.json}")
        for row in errors:
            print(f"loss_bench: error: {row['method']} at {row['shape'][0]}x{row['shape'][1]}: {row['reason']}",
                  file=sys.stderr)
    dist.destroy_process_group()
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
