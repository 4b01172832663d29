"""Output layer + MiLe loss, fused (mile_megatron.loss.linear) against unfused: time and peak memory.

    .venv/bin/python benchmarks/linear_loss_bench.py           # one CUDA GPU; writes results/linear_loss_bench.json
    .venv/bin/python benchmarks/linear_loss_bench.py --smoke   # CPU, tiny shapes: checks that the script works

For each shape tokens x hidden x vocabulary (default 16384x4096x32000 and 8192x4096x128256, bf16, TP=1), one timed
iteration is the output layer and the scalar MiLe loss over all tokens, forward and backward into the hidden
states and the output weight (both leaves):

  unfused  logits = hidden @ weight.T (bf16, as Megatron's ColumnParallelLinear), then mile_loss on them (the
           Triton kernels on CUDA), backward through both
  fused    linear_mile_loss_terms(hidden, weight, target): chunked over tokens, the logits never exist whole
           (--chunk-tokens, default: the library's)

Numbers per row: time_ms (median of --repeats after --warmup; CUDA events, wall clock on CPU), peak_mib
(max_memory_allocated during one forward + backward minus what was allocated before it: the inputs; CUDA only),
and the fused row's ratios to the unfused one with the targets of one H100 (peak <= 1/8 of unfused at the 128K
shape, time <= 1.1 x unfused), and the loss and gradient differences between the two.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from mile_megatron.loss import linear_mile_loss_terms, mile_loss_terms  # noqa: E402

DEFAULT_SHAPES = ("16384x4096x32000", "8192x4096x128256")
SMOKE_SHAPES = ("256x32x1000", "96x24x517")
MIB = 2**20


def step(method: str, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int | None):
    """One forward + backward; returns (loss value, the terms' numerator)."""
    hidden.grad = weight.grad = None
    if method == "fused":
        terms = linear_mile_loss_terms(hidden, weight, target, alpha="none", chunk_tokens=chunk)
    else:
        terms = mile_loss_terms(hidden @ weight.t(), target, alpha="none")
    loss = terms.numerator / terms.num_tokens
    loss.backward()
    return loss.detach()


def measure(method: str, hidden, weight, target, chunk, warmup: int, repeats: int) -> dict:
    device = hidden.device
    cuda = device.type == "cuda"
    for _ in range(warmup):
        step(method, hidden, weight, target, chunk)
    peak = None
    if cuda:
        torch.cuda.synchronize(device)
        hidden.grad = weight.grad = None
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(method, hidden, weight, target, chunk)
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - before) / MIB
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step(method, hidden, weight, target, chunk)
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            loss = step(method, hidden, weight, target, chunk)
            times.append((time.perf_counter() - began) * 1e3)
    return {"time_ms": statistics.median(times), "peak_mib": peak, "loss": float(loss),
            "grad_hidden": hidden.grad.detach().clone(), "grad_weight": weight.grad.detach().clone()}


def run_shape(text: str, args: argparse.Namespace, device: torch.device) -> list[dict]:
    tokens, hidden_size, vocab = (int(x) for x in text.split("x"))
    generator = torch.Generator(device=device).manual_seed(0)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    hidden = (torch.randn(tokens, hidden_size, generator=generator, device=device) / 2).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=generator, device=device) * 0.02).to(dtype).requires_grad_()
    target = torch.randint(0, vocab, (tokens,), generator=generator, device=device)
    rows = {}
    for method in ("unfused", "fused"):
        rows[method] = measure(method, hidden, weight, target, args.chunk_tokens, args.warmup, args.repeats)
    unfused, fused = rows["unfused"], rows["fused"]

    def rel(a, b):
        return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))

    result = []
    for method, row in rows.items():
        entry = {"shape": text, "tokens": tokens, "hidden": hidden_size, "vocab": vocab, "dtype": str(dtype),
                 "method": method, "time_ms": row["time_ms"], "peak_mib": row["peak_mib"], "loss": row["loss"]}
        if method == "fused":
            entry.update(time_ratio=fused["time_ms"] / unfused["time_ms"],
                         peak_ratio=(fused["peak_mib"] / unfused["peak_mib"]
                                     if fused["peak_mib"] and unfused["peak_mib"] else None),
                         loss_abs_diff=abs(fused["loss"] - unfused["loss"]),
                         grad_hidden_rel_diff=rel(fused["grad_hidden"], unfused["grad_hidden"]),
                         grad_weight_rel_diff=rel(fused["grad_weight"], unfused["grad_weight"]))
        result.append(entry)
    return result


def render(rows: list[dict]) -> str:
    header = (f"{'shape':<20} {'method':<8} {'time ms':>9} {'peak MiB':>10} {'time x':>7} {'peak x':>7} "
              f"{'loss diff':>10} {'dx diff':>9} {'dW diff':>9}")
    lines = [header, "-" * len(header)]
    for row in rows:
        def number(key, fmt):
            value = row.get(key)
            return format(value, fmt) if value is not None else f"{'-':>{int(fmt.split('.')[0])}}"
        lines.append(f"{row['shape']:<20} {row['method']:<8} {number('time_ms', '9.3f')} {number('peak_mib', '10.1f')} "
                     f"{number('time_ratio', '7.3f')} {number('peak_ratio', '7.3f')} {number('loss_abs_diff', '10.2e')} "
                     f"{number('grad_hidden_rel_diff', '9.2e')} {number('grad_weight_rel_diff', '9.2e')}")
    lines.append("targets on one H100: peak x <= 0.125 at 8192x4096x128256, time x <= 1.1")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=None, help="tokens x hidden x vocabulary")
    parser.add_argument("--chunk-tokens", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes")
    parser.add_argument("--json", default=None, help="default benchmarks/results/linear_loss_bench.json")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and not args.smoke:
        print("linear_loss_bench: no CUDA GPU; use --smoke for the CPU check", file=sys.stderr)
        return 2
    args.shapes = args.shapes or list(SMOKE_SHAPES if args.smoke else DEFAULT_SHAPES)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.smoke else 2)
    args.repeats = args.repeats if args.repeats is not None else (1 if args.smoke else 5)
    rows: list[dict] = []
    output = Path(args.json or HERE / "results" / "linear_loss_bench.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    for shape in args.shapes:
        rows += run_shape(shape, args, device)
        result = {"benchmark": "linear_loss_bench", "device": torch.cuda.get_device_name(device)
                  if device.type == "cuda" else platform.processor() or "cpu", "torch": torch.__version__,
                  "rows": rows, "complete": shape == args.shapes[-1]}
        output.write_text(json.dumps(result, indent=1) + "\n")
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
