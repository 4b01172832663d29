"""`mile-selfcheck`: the vocab-parallel losses under tensor parallelism against the float64 reference.

Spawns TP processes (torch.distributed, FileStore rendezvous in a temporary directory: no ports), runs
vocab_parallel_mile_cross_entropy, vocab_parallel_focal_cross_entropy and mile_loss on random inputs (fp32 and
bf16, a large-offset case, a masked batch), compares loss / ce / entropy / the gathered logits gradient with
mile_megatron.loss.reference, prints a table and exits 0 (all within tolerance), 1 (mismatch) or 2 (the check could
not run). Where it runs (--device, default auto: cuda when a GPU is visible, else cpu):
  cpu:   TP=2 over gloo, the torch path (the CPU implementation)
  cuda:  the loss backend CUDA tensors get (the Triton kernels unless set_loss_backend / MILE_MEGATRON_LOSS_BACKEND
         says otherwise): TP=2 over NCCL on two GPUs (rank r on cuda:r), or TP=1 when only one GPU is visible
         (NCCL needs one GPU per rank); the backend used is printed with the table.

Error measures (reported as multiples of the tolerance, <= 1 passes):
  loss, ce, entropy: max |a - r| / (1e-6 * max(|r|, 1))
  grad, per token i with c_i = upstream_i * w_i and r_i = c_i (p_i - onehot_i):
      max |a - r| / (1e-6 * max_j |r_ij| + 2^-22 |c_i| + u |r_ij|)
  (an fp32 evaluation accurate to 1e-6 of the token's row, then one rounding to the logits dtype of unit
  roundoff u: 2^-24 fp32, 2^-8 bf16).
"""

from __future__ import annotations

import argparse
import math
import os
import queue
import sys
import tempfile
import time
import traceback
from datetime import timedelta

RTOL = 1e-6
UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "bfloat16": 2.0 ** -8}
TP = 2
VOCAB = 96  # V_pad; 48 columns per rank

# (name, function, dtype, logits family, extra keyword arguments)
CASES = (
    ("mile fp32", "mile", "float32", "normal", {"gamma": 1.0, "sigma": 1.0}),
    ("mile bf16", "mile", "bfloat16", "normal", {"gamma": 1.0, "sigma": 1.0}),
    ("mile g=2.5 s=0.5", "mile", "float32", "normal", {"gamma": 2.5, "sigma": 0.5}),
    ("mile logits~1e4", "mile", "float32", "offset", {"gamma": 1.0, "sigma": 1.0}),
    ("focal fp32", "focal", "float32", "normal", {"gamma": 2.0}),
    ("focal bf16", "focal", "bfloat16", "normal", {"gamma": 2.0}),
    ("mile_loss global", "mile_loss", "float32", "normal", {"kind": "mile", "alpha": "global"}),
    ("mile_loss official", "mile_loss", "float32", "normal", {"kind": "mile", "alpha": "official"}),
    ("mile_loss focal", "mile_loss", "float32", "normal", {"kind": "focal", "alpha": "global"}),
)


def _inputs(seed: int, family: str, dtype):
    """Identical on both ranks: full logits [s=5, b=3, VOCAB], targets, per-token upstream, mask."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    shape = (5, 3)
    if family == "offset":  # large common offset: stability of the softmax and of its gradient
        full = 1e4 - torch.rand((*shape, VOCAB), generator=gen, dtype=torch.float64) * 6
    else:
        full = torch.randn((*shape, VOCAB), generator=gen, dtype=torch.float64) * 3
    target = torch.randint(0, VOCAB, shape, generator=gen)
    target.view(-1)[:4] = torch.tensor([0, VOCAB // TP - 1, VOCAB // TP, VOCAB - 1])  # shard edges
    upstream = (torch.randn(shape, generator=gen) * 10 ** (torch.rand(shape, generator=gen) * 2 - 1)).float()
    mask = (torch.rand(shape, generator=gen) > 0.3).float()
    mask.view(-1)[0] = 1.0
    return full.to(getattr(torch, dtype)), target, upstream, mask


def _value_error(actual, expected) -> float:
    import torch

    a, r = actual.detach().double(), torch.as_tensor(expected, dtype=torch.float64)
    err = ((a - r).abs() / (RTOL * r.abs().clamp_min(1.0))).max()
    return math.inf if bool(torch.isnan(err)) else float(err)


def _grad_error(actual, expected, coefficient, dtype: str) -> float:
    import torch

    a, r = actual.detach().double(), expected.double()
    bound = (RTOL * r.abs().amax(-1, keepdim=True) + 2.0 ** -22 * coefficient.double().abs().unsqueeze(-1)
             + UNIT_ROUNDOFF[dtype] * r.abs())
    diff = (a - r).abs()
    if bool(torch.isnan(diff).any()):
        return math.inf
    ratio = torch.where(bound > 0, diff / bound, torch.where(diff > 0, math.inf, 0.0))
    return float(ratio.max())


def _run_case(index: int, case, rank: int, tp: int, group, device) -> dict[str, float]:
    import torch
    import torch.distributed as dist

    from mile_megatron.loss import (mile_loss_with_stats, vocab_parallel_focal_cross_entropy,
                                    vocab_parallel_mile_cross_entropy)
    from mile_megatron.loss import reference as ref

    name, function, dtype, family, kwargs = case
    full, target, upstream, mask = _inputs(1234 + index, family, dtype)
    width = VOCAB // tp
    shard = full[..., rank * width:(rank + 1) * width].clone().to(device).requires_grad_(True)
    before = shard.detach().clone()
    full, target, upstream, mask = full, target.to(device), upstream.to(device), mask.to(device)
    if function == "mile_loss":
        stats = mile_loss_with_stats(shard, target, mask, tp_group=group, **kwargs)
        scale = 0.75
        stats.loss.backward(torch.tensor(scale, device=device))
        target, mask = target.cpu(), mask.cpu()
        expected = ref.mile_loss_reference(ref.RefBatch(full, target, mask), **kwargs, upstream=scale)[0]
        tokens = expected.tokens
        coefficient = expected.alpha * tokens.weight * mask.double() * scale / expected.num_tokens
        errors = {"loss": _value_error(stats.loss, expected.loss),
                  "ce": _value_error(stats.ce_sum, expected.ce_sum),
                  "entropy": _value_error(stats.entropy_sum, expected.entropy_sum)}
        expected_grad = expected.grad
    else:
        if function == "mile":
            out = vocab_parallel_mile_cross_entropy(shard, target, tp_group=group, **kwargs)
        else:
            out = vocab_parallel_focal_cross_entropy(shard, target, tp_group=group, **kwargs)
        out.loss.backward(upstream)
        target, upstream = target.cpu(), upstream.cpu()
        tokens = ref.token_losses(full, target, kind=function, sigma=kwargs.get("sigma", 1.0),
                                  gamma=kwargs["gamma"])
        coefficient = upstream.double() * tokens.weight
        errors = {"loss": _value_error(out.loss, tokens.loss), "ce": _value_error(out.ce, tokens.ce),
                  "entropy": _value_error(out.entropy, tokens.entropy)}
        expected_grad = ref.token_losses_grad(tokens, upstream.double())
    parts = [torch.empty_like(shard.grad) for _ in range(tp)]
    dist.all_gather(parts, shard.grad.contiguous(), group=group)
    errors["grad"] = _grad_error(torch.cat(parts, dim=-1).cpu(), expected_grad, coefficient, dtype)
    errors["input_unchanged"] = 0.0 if torch.equal(shard.detach(), before) else math.inf
    return errors


def _worker(rank: int, tp: int, device_type: str, rendezvous: str, results) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    try:
        import torch
        import torch.distributed as dist

        from mile_megatron.loss.settings import loss_backend

        torch.set_num_threads(1)
        if device_type == "cuda":
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
        else:
            device = torch.device("cpu")
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method=f"file://{rendezvous}",
                                rank=rank, world_size=tp, timeout=timedelta(seconds=60),
                                **({"device_id": device} if device_type == "cuda" else {}))
        group = dist.new_group(list(range(tp)))
        rows = [(case[0], _run_case(i, case, rank, tp, group, device)) for i, case in enumerate(CASES)]
        results.put((rank, True, {"rows": rows, "backend": loss_backend(device), "backend_name": dist.get_backend(),
                                  "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"}))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported by the parent
        results.put((rank, False, traceback.format_exc()))


def _device_plan(device: str) -> tuple[str, int]:
    """(device type, TP size) for --device; raises RuntimeError when CUDA is asked for and missing."""
    import torch

    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise RuntimeError("--device cuda: no CUDA GPU is visible (use --device cpu)")
    if device == "cpu" or not cuda:
        return "cpu", TP
    return "cuda", min(TP, torch.cuda.device_count())


def run(timeout: float = 120.0, device: str = "auto") -> tuple[int, str]:
    """Run the check; returns (exit code, report text)."""
    import multiprocessing as mp

    try:
        device_type, tp = _device_plan(device)
    except RuntimeError as error:
        return 2, f"mile-selfcheck: could not run the check\n{error}"
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="mile_selfcheck_") as tmp:
        procs = [ctx.Process(target=_worker, args=(rank, tp, device_type, os.path.join(tmp, "rdzv"), results),
                             daemon=True)
                 for rank in range(tp)]
        for proc in procs:
            proc.start()
        replies: dict[int, tuple[bool, object]] = {}
        deadline = time.monotonic() + timeout
        while len(replies) < tp and time.monotonic() < deadline:
            try:
                rank, ok, payload = results.get(timeout=0.5)
                replies[rank] = (ok, payload)
                if not ok:
                    deadline = min(deadline, time.monotonic() + 5.0)
            except queue.Empty:
                if any(not p.is_alive() and p.exitcode not in (0, None) for p in procs):
                    deadline = min(deadline, time.monotonic() + 2.0)
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
    failed = [f"rank {r}:\n{payload}" for r, (ok, payload) in sorted(replies.items()) if not ok]
    if failed or len(replies) < tp:
        missing = [r for r in range(tp) if r not in replies]
        text = "\n".join(failed) + (f"\nranks {missing} did not answer within {timeout:.0f} s" if missing else "")
        return 2, "mile-selfcheck: could not run the check\n" + text

    columns = ("loss", "ce", "entropy", "grad", "input_unchanged")
    first = replies[0][1]
    lines = [f"mile-selfcheck: TP={tp} ({first['backend_name']}, {first['device']}, {first['backend']} loss path) "
             "vs float64 reference; worst error over all ranks in multiples of the tolerance (<= 1 passes)",
             f"{'case':<22}" + "".join(f"{c:>17}" for c in columns)]
    worst = 0.0
    for index, case in enumerate(CASES):
        errors = {c: max(replies[rank][1]["rows"][index][1][c] for rank in range(tp)) for c in columns}
        worst = max([worst] + list(errors.values()))
        lines.append(f"{case[0]:<22}" + "".join(f"{errors[c]:>17.3g}" for c in columns))
    ok = worst <= 1.0
    lines.append("OK: every result within tolerance" if ok else
                 f"MISMATCH: worst error {worst:.3g} x tolerance")
    return (0 if ok else 1), "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mile-selfcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the processes")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: the GPUs when CUDA is available (Triton kernels, NCCL), else the CPU (gloo)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    code, text = run(args.timeout, args.device)
    print(text)
    print(f"({time.monotonic() - started:.1f} s)")
    return code


if __name__ == "__main__":
    sys.exit(main())
