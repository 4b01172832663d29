"""Step time, tokens/s and peak memory of a mile-pretrain step: the MiLe loss against cross-entropy.

    .venv/bin/python benchmarks/pretrain_step_bench.py           # one CUDA GPU; writes results/pretrain_step_bench.json
    .venv/bin/python benchmarks/pretrain_step_bench.py --variants mile megatron-ce paper-eager-mile compile-mile
    .venv/bin/python benchmarks/pretrain_step_bench.py --smoke   # CPU, tiny preset: checks that the script works

Each variant is one run of the real entry point (mile_megatron.engines.megatron under torchrun, one process):
468m preset, bf16, local layer spec, 16 sequences x 1024 tokens = 16384 tokens per step (global batch 16),
mock data with a 32000-entry NullTokenizer vocabulary, --train-iters steps, logging every step. Variants:
  mile               mile-pretrain --loss mile (this project's loss with the output layer fused into it, the
                     default; backend auto = the Triton kernels on CUDA)
  mile-unfused       the same with --no-mile-fused-output-layer (the loss computed from the materialised logits)
  ce                 mile-pretrain --loss ce (the same code with w = 1)
  megatron-ce        Megatron's own cross-entropy: Megatron's GPTModel gets the labels and computes
                     vocab_parallel_cross_entropy itself, as in Megatron's own GPT training script. mile-pretrain
                     has no flag for this (its model returns the logits through GPTModel's output_processor and the
                     loss is computed from them), so this benchmark swaps in that forward step inside the same
                     entry point.
  megatron-fused-ce  the same with --cross-entropy-loss-fusion --cross-entropy-fusion-impl native
  mile-torch         --loss mile with MILE_MEGATRON_LOSS_BACKEND=torch (the exact torch path)
  paper-eager-mile   the paper's formula in eager torch (benchmarks/loss_bench.py: paper_mile_terms) in place of
                     mile_loss_terms; alpha = 1 / mean(w) over this rank's positions
  compile-mile       the same formula under torch.compile
The step time is the median of Megatron's "elapsed time per iteration" over the steps after --skip warm-up
steps; tokens/s = tokens per step / step time. Peak memory is torch.cuda.max_memory_allocated() over the whole
run (read by the worker after training; CPU runs report the peak RSS instead). Without TransformerEngine the
runs add the flags that turn off fusions whose kernels are missing (see fusion_flags()).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORKER_FLAG = "--worker"
RESULT_TAG = "PRETRAIN_STEP_BENCH_RESULT"
ITERATION_RE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([0-9.]+)")
LM_LOSS_RE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*? lm loss: ([-+0-9.eEnaif]+) \|")
THROUGHPUT_RE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*? tokens/s: ([-+0-9.eE]+) \|")


@dataclass(frozen=True)
class Variant:
    name: str
    loss: str                       # mile-pretrain --loss value
    description: str
    extra_flags: tuple[str, ...] = ()
    env: dict = field(default_factory=dict)


VARIANTS: tuple[Variant, ...] = (
    Variant("mile", "mile", "mile-pretrain --loss mile (output layer fused into the loss, backend auto)"),
    Variant("mile-unfused", "mile", "mile-pretrain --loss mile --no-mile-fused-output-layer (loss on the logits)",
            extra_flags=("--no-mile-fused-output-layer",)),
    Variant("megatron-ce", "ce", "Megatron's vocab_parallel_cross_entropy computed inside GPTModel (labels given)"),
    Variant("ce", "ce", "mile-pretrain --loss ce (this project's loss with w = 1, backend auto)"),
    Variant("megatron-fused-ce", "ce", "Megatron's fused cross-entropy (--cross-entropy-loss-fusion, native)",
            extra_flags=("--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "native")),
    Variant("mile-torch", "mile", "mile-pretrain --loss mile with the torch path (MILE_MEGATRON_LOSS_BACKEND=torch)",
            env={"MILE_MEGATRON_LOSS_BACKEND": "torch"}),
    Variant("paper-eager-mile", "mile", "the paper's formula in eager torch in place of mile_loss_terms"),
    Variant("compile-mile", "mile", "the paper's formula under torch.compile in place of mile_loss_terms"),
)
VARIANT_NAMES = tuple(variant.name for variant in VARIANTS)
DEFAULT_VARIANTS = ("mile", "mile-unfused", "megatron-ce", "ce", "megatron-fused-ce")
SMOKE_VARIANTS = ("mile", "megatron-ce")


# ----------------------------------------------------------------------------------------------
# Worker: runs inside torchrun, one process per variant.
def masked_sum_loss(loss_mask, per_token_loss, model=None):
    """Megatron loss_func for per-token losses [b, s] (with --calculate-per-token-loss): (sum, tokens, report)."""
    import torch

    mask = loss_mask.reshape(-1).float()
    total = torch.sum(per_token_loss.reshape(-1).float() * mask)
    tokens = mask.sum()
    return total, tokens.to(torch.int), {"lm loss": torch.stack([total.detach(), tokens])}


def megatron_ce_forward_step(data_iterator, model, return_schedule_plan: bool = False):
    """forward_step that lets GPTModel compute Megatron's own cross-entropy from the labels."""
    from megatron.core.utils import get_attr_wrapped_model

    from mile_megatron.engines.megatron.batch import get_batch

    batch = get_batch(data_iterator, get_attr_wrapped_model(model, "vp_stage"))
    per_token_ce = model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                         labels=batch["labels"])  # [b, s] fp32
    return per_token_ce, partial(masked_sum_loss, batch["loss_mask"], model=model)


def paper_mile_terms_function(compiled: bool):
    """A stand-in for mile_loss_terms that evaluates the paper's formula (TP=1: full vocabulary); the paper's alpha
    1 / mean(w) over this rank's positions goes into the numerator, the denominator is the token count."""
    import torch

    sys.path.insert(0, str(HERE))
    from loss_bench import paper_mile_terms

    from mile_megatron.loss import MileLossTerms

    def sums(logits, target, mask, gamma, sigma):
        ce, entropy, weight = paper_mile_terms(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), gamma, sigma)
        alpha = 1.0 / weight.mean()  # the paper: over all positions of this rank
        return (alpha * weight * ce * mask).sum(), (ce.detach() * mask).sum(), (entropy * mask).sum(), alpha

    compute = torch.compile(sums, dynamic=False) if compiled else sums

    def terms(logits, target, loss_mask=None, *, kind="mile", gamma=1.0, sigma=1.0, alpha="global",
              tp_group=None, dp_group=None):
        mask = (torch.ones(target.shape, device=target.device) if loss_mask is None else loss_mask).reshape(-1).float()
        loss_sum, ce_sum, entropy_sum, scale = compute(logits, target, mask, gamma, sigma)
        num_tokens = mask.sum()
        return MileLossTerms(numerator=loss_sum, denominator=num_tokens, ce_sum=ce_sum, entropy_sum=entropy_sum,
                             weight_sum=num_tokens / scale.detach(), num_tokens=num_tokens, alpha=scale.detach())

    return terms


def run_worker(variant_name: str, flags: list[str]) -> int:
    sys.path.insert(0, str(REPO))
    import torch

    from mile_megatron import loss as loss_module
    from mile_megatron.engines.megatron import cli

    forward_step = None
    if variant_name in ("megatron-ce", "megatron-fused-ce"):
        forward_step = megatron_ce_forward_step  # no output_processor: GPTModel's own cross-entropy
    elif variant_name in ("paper-eager-mile", "compile-mile"):
        loss_module.mile_loss_terms = paper_mile_terms_function(compiled=variant_name == "compile-mile")
    began = time.perf_counter()
    cli.main(flags, forward_step=forward_step)
    result = {"variant": variant_name, "seconds": time.perf_counter() - began,
              "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        result.update(device=torch.cuda.get_device_name(),
                      max_memory_allocated=torch.cuda.max_memory_allocated(),
                      max_memory_reserved=torch.cuda.max_memory_reserved())
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{RESULT_TAG} {json.dumps(result)}", flush=True)
    return 0


# ----------------------------------------------------------------------------------------------
# Driver.
def have_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def fusion_flags() -> list[str]:
    """Turn off the fusions whose kernels are missing (TransformerEngine / apex / Megatron's compiled softmax)."""
    flags = []
    if not have_module("transformer_engine"):
        flags += ["--no-rope-fusion"]  # TransformerEngine's fused RoPE
    if not have_module("fused_weight_gradient_mlp_cuda"):
        flags += ["--no-gradient-accumulation-fusion"]  # apex extension
    if not have_module("scaled_masked_softmax_cuda"):
        flags += ["--no-masked-softmax-fusion"]  # Megatron's fused softmax kernels
    if not (have_module("transformer_engine") or have_module("apex")):
        flags += ["--no-persist-layer-norm"]
    return flags


def common_flags(args: argparse.Namespace) -> list[str]:
    """The mile-pretrain flags shared by every variant."""
    flags = ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(args.vocab_size), "--mock-data",
             "--micro-batch-size", str(args.micro_batch_size), "--global-batch-size", str(args.micro_batch_size),
             "--seq-length", str(args.seq_length), "--max-position-embeddings", str(args.seq_length),
             "--train-iters", str(args.iterations), "--log-interval", "1", "--eval-iters", "0",
             "--eval-interval", "1000000", "--lr-warmup-iters", "1", "--seed", "1234"]
    if args.smoke:
        return ["--cpu", "--preset", "tiny", *flags, "--num-workers", "0"]
    return ["--preset", args.preset, "--bf16", "--transformer-impl", "local", *fusion_flags(), *flags]


_running: list[subprocess.Popen] = []  # runs in flight (each in its own process group)


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop_running_and_exit(signum, _frame) -> None:
    """SIGTERM / SIGINT (e.g. from `timeout`): the runs live in their own sessions, so end them first."""
    for process in _running:
        kill_group(process)
    raise SystemExit(128 + signum)


def launch(variant: Variant, args: argparse.Namespace, log_path: Path) -> subprocess.Popen:
    flags = common_flags(args) + ["--loss", variant.loss, *variant.extra_flags]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
               str(Path(__file__).resolve()), WORKER_FLAG, variant.name, "--", *flags]
    env = dict(os.environ)
    for key in ("MILE_MEGATRON_LOSS_BACKEND", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    env.update(variant.env)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    if args.smoke:
        env.update(CUDA_VISIBLE_DEVICES="", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    _running.append(process)
    return process


def wait(process: subprocess.Popen, timeout: float) -> int | None:
    """The return code, or None after killing the run's process group at the timeout."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(process)
        process.wait()
        return None
    finally:
        _running.remove(process)


def parse_run(variant: Variant, output: str, returncode: int | None, args: argparse.Namespace) -> dict:
    tokens_per_step = args.micro_batch_size * args.seq_length
    row = {"variant": variant.name, "description": variant.description, "loss_flag": variant.loss,
           "status": "ok", "reason": None, "returncode": returncode, "tokens_per_step": tokens_per_step,
           "iterations": args.iterations, "skipped_iterations": args.skip, "timed_iterations": 0,
           "step_ms": None, "step_ms_min": None, "step_ms_max": None, "tokens_per_s": None,
           "tokens_per_s_logged": None, "peak_allocated_gib": None, "peak_reserved_gib": None, "max_rss_mib": None,
           "lm_loss_first": None, "lm_loss_last": None, "device": None}
    step_ms = {int(i): float(ms) for i, ms in ITERATION_RE.findall(output)}
    losses = {int(i): float(value) for i, value in LM_LOSS_RE.findall(output)}
    logged = {int(i): float(rate) for i, rate in THROUGHPUT_RE.findall(output)}
    timed = [ms for i, ms in sorted(step_ms.items()) if i > args.skip]
    if timed:
        median = statistics.median(timed)
        row.update(timed_iterations=len(timed), step_ms=median, step_ms_min=min(timed), step_ms_max=max(timed),
                   tokens_per_s=tokens_per_step / (median / 1e3))
    rates = [rate for i, rate in logged.items() if i > args.skip]
    if rates:
        row["tokens_per_s_logged"] = statistics.median(rates)
    if losses:
        row.update(lm_loss_first=losses[min(losses)], lm_loss_last=losses[max(losses)])
    results = [line.split(" ", 1)[1] for line in output.splitlines() if line.startswith(RESULT_TAG + " ")]
    if results:
        measured = json.loads(results[-1])
        row["max_rss_mib"] = measured["max_rss_mib"]
        row["device"] = measured.get("device")
        if "max_memory_allocated" in measured:
            row["peak_allocated_gib"] = measured["max_memory_allocated"] / 2**30
            row["peak_reserved_gib"] = measured["max_memory_reserved"] / 2**30
    if returncode is None:
        row.update(status="error", reason=f"timed out after {args.timeout:.0f} s")
    elif returncode != 0:
        tail = [line for line in output.splitlines() if line.strip()][-3:]
        row.update(status="error", reason=f"exit status {returncode}: " + " / ".join(tail)[-400:])
    elif not timed or not results:
        row.update(status="error", reason="no timed iterations or no result line in the output (see the log)")
    return row


def comparisons(rows: list[dict]) -> dict:
    """MiLe against each cross-entropy variant: step-time and peak-memory ratios (< 1 = MiLe better)."""
    by_name = {row["variant"]: row for row in rows if row["status"] == "ok"}
    out = {}
    for mile in ("mile", "mile-torch", "paper-eager-mile", "compile-mile"):
        for ce in ("megatron-ce", "megatron-fused-ce", "ce"):
            if mile in by_name and ce in by_name:
                a, b = by_name[mile], by_name[ce]
                memory = "peak_allocated_gib" if a["peak_allocated_gib"] is not None else "max_rss_mib"
                out[f"{mile}_vs_{ce}"] = {
                    "step_time_ratio": a["step_ms"] / b["step_ms"],
                    "peak_memory_ratio": a[memory] / b[memory] if b[memory] else None,
                    "peak_memory_measure": memory,
                }
    return out


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def fmt(value, spec: str) -> str:
    width = int(spec.split(".")[0] or 0)
    return "-".rjust(width) if value is None else format(value, spec)


def print_table(result: dict) -> None:
    print(f"device: {result['environment']['device']} | torch {result['environment']['torch']} | "
          f"megatron-core {result['environment']['megatron_core']} | {result['settings']['preset_used']} preset, "
          f"{result['rows'][0]['tokens_per_step'] if result['rows'] else '?'} tokens/step")
    header = (f"{'variant':<18} {'step ms':>9} {'min':>8} {'max':>8} {'tokens/s':>10} {'peak alloc GiB':>14} "
              f"{'max RSS MiB':>11} {'lm loss':>8}  note")
    print(header)
    print("-" * len(header))
    for row in result["rows"]:
        note = row["reason"] or ""
        print(f"{row['variant']:<18} {fmt(row['step_ms'], '9.1f')} {fmt(row['step_ms_min'], '8.1f')} "
              f"{fmt(row['step_ms_max'], '8.1f')} {fmt(row['tokens_per_s'], '10.0f')} "
              f"{fmt(row['peak_allocated_gib'], '14.2f')} {fmt(row['max_rss_mib'], '11.0f')} "
              f"{fmt(row['lm_loss_last'], '8.3f')}  {'' if row['status'] == 'ok' else row['status'] + ': '}{note}")
    for name, ratio in result["comparisons"].items():
        memory = fmt(ratio["peak_memory_ratio"], ".3f")
        print(f"{name}: step time x{ratio['step_time_ratio']:.3f}, "
              f"peak memory x{memory} ({ratio['peak_memory_measure']})")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", choices=VARIANT_NAMES, default=None,
                        help=f"default: {' '.join(DEFAULT_VARIANTS)} (smoke: {' '.join(SMOKE_VARIANTS)})")
    parser.add_argument("--preset", default="468m", choices=("468m", "1.2b", "6.7b"))
    parser.add_argument("--micro-batch-size", type=int, default=None, help="sequences per step (default 16; smoke 2)")
    parser.add_argument("--seq-length", type=int, default=None, help="default 1024 (smoke 64)")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--iterations", type=int, default=None, help="training steps per run (default 12; smoke 3)")
    parser.add_argument("--skip", type=int, default=None, help="warm-up steps left out (default 3; smoke 1)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run before it is killed")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU (--cpu), tiny preset, runs in parallel: checks that the script works")
    parser.add_argument("--json", default=None,
                        help="output (default benchmarks/results/pretrain_step_bench.json; smoke: ..._smoke.json)")
    parser.add_argument("--log-dir", default=None, help="one log per variant (default: next to the JSON)")
    args = parser.parse_args(argv)
    args.variants = args.variants or list(SMOKE_VARIANTS if args.smoke else DEFAULT_VARIANTS)
    args.micro_batch_size = args.micro_batch_size or (2 if args.smoke else 16)
    args.seq_length = args.seq_length or (64 if args.smoke else 1024)
    args.iterations = args.iterations or (3 if args.smoke else 12)
    args.skip = (1 if args.smoke else 3) if args.skip is None else args.skip
    if args.iterations <= args.skip:
        parser.error(f"--iterations ({args.iterations}) must exceed --skip ({args.skip})")
    stem = "pretrain_step_bench_smoke" if args.smoke else "pretrain_step_bench"
    args.json = args.json or str(HERE / "results" / f"{stem}.json")
    args.log_dir = args.log_dir or str(Path(args.json).with_suffix("")) + "_logs"
    args.preset_used = "tiny" if args.smoke else args.preset
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [WORKER_FLAG]:
        if len(argv) < 3 or argv[2] != "--":
            raise SystemExit(f"usage: pretrain_step_bench.py {WORKER_FLAG} VARIANT -- <mile-pretrain flags>")
        return run_worker(argv[1], argv[3:])
    args = parse_args(argv)
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("pretrain_step_bench: no CUDA device; real numbers need a GPU "
                             "(use --smoke to check the script on CPU)")
    import torch

    signal.signal(signal.SIGTERM, stop_running_and_exit)
    signal.signal(signal.SIGINT, stop_running_and_exit)
    variants = [variant for variant in VARIANTS if variant.name in args.variants]
    result = {"benchmark": "pretrain_step_bench", "command": " ".join([sys.executable, *sys.argv]),
              "settings": vars(args), "common_flags": common_flags(args),
              "environment": {"device": None, "torch": torch.__version__, "triton": version("triton"),
                              "megatron_core": version("megatron-core"), "python": platform.python_version(),
                              "machine": platform.platform(),
                              "transformer_engine": have_module("transformer_engine"), "apex": have_module("apex")},
              "complete": False, "rows": [], "comparisons": {}}
    if torch.cuda.is_available() and not args.smoke:
        result["environment"]["device"] = torch.cuda.get_device_name()
    else:
        result["environment"]["device"] = "cpu (" + (platform.processor() or platform.machine()) + ")"
    log_dir = Path(args.log_dir)

    def record(variant: Variant, returncode: int | None) -> None:
        output = (log_dir / f"{variant.name}.log").read_text(errors="replace")
        result["rows"].append(parse_run(variant, output, returncode, args))
        result["comparisons"] = comparisons(result["rows"])
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")  # after every run: survives a timeout

    if args.smoke:  # CPU: runs in parallel (timing is not the point)
        started = [(variant, launch(variant, args, log_dir / f"{variant.name}.log")) for variant in variants]
        for variant, process in started:
            record(variant, wait(process, args.timeout))
    else:  # one GPU: one run at a time
        for variant in variants:
            began = time.perf_counter()
            record(variant, wait(launch(variant, args, log_dir / f"{variant.name}.log"), args.timeout))
            print(f"pretrain_step_bench: {variant.name} done in {time.perf_counter() - began:.0f} s", file=sys.stderr,
                  flush=True)
    result["complete"] = True
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {args.json} (logs in {log_dir})")
    failed = [row for row in result["rows"] if row["status"] != "ok"]
    for row in failed:
        print(f"pretrain_step_bench: error: {row['variant']}: {row['reason']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
