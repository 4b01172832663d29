"""Peak memory of `mile-convert-hf` as the model grows deeper: it should track one layer, not the model.

For each depth L, `mile-pretrain --cpu` (Megatron's own training loop, TP=2 on 2 CPU processes) initialises a
LLaMA model (hidden H, FFN F, fp32), runs one step at learning rate 0 on mock data and saves a torch_dist
checkpoint: the chunk layout every real training run writes (one chunk per layer and TP rank). The
checkpoint is then converted with `mile-convert-hf` in a fresh process whose peak RSS (getrusage) is
recorded. Prints a table and writes JSON.

    .venv/bin/python benchmarks/convert_memory_bench.py [--hidden 1024 --ffn 2816 --layers 6 16]

Memory is meant to be bounded by one layer plus one output shard (safetensors serialises a shard in memory,
so about twice --max-shard-size): once every model exceeds one shard, peak RSS should stay flat as L grows
(the rest is the interpreter and the torch/transformers imports).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MEASURE = """
import resource, sys
from mile_megatron.convert import to_hf
status = to_hf.main(sys.argv[1:])
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(status)
"""


def write_megatron_checkpoint(directory: Path, layers: int, args: argparse.Namespace) -> None:
    flags = ["--cpu", "--preset", "tiny", "--tensor-model-parallel-size", "2", "--num-layers", str(layers),
             "--hidden-size", str(args.hidden), "--ffn-hidden-size", str(args.ffn),
             "--num-attention-heads", str(args.hidden // 64), "--kv-channels", "64",
             "--tokenizer-type", "NullTokenizer", "--vocab-size", str(args.vocab - 1), "--mock-data",
             "--train-iters", "1", "--lr", "0", "--min-lr", "0", "--lr-warmup-iters", "0",
             "--micro-batch-size", "1", "--global-batch-size", "1", "--eval-iters", "0",
             "--save", str(directory), "--save-interval", "1"]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--local-addr", "127.0.0.1",
                          "--nproc-per-node", "2", "-m", "mile_megatron.engines.megatron", *flags],
                         capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise SystemExit(f"mile-pretrain failed for {layers} layers:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}")


def measure(layers: int, args: argparse.Namespace, work: Path) -> dict:
    megatron = work / f"megatron_{layers}"
    write_megatron_checkpoint(megatron, layers, args)
    run = subprocess.run([sys.executable, "-c", MEASURE, str(megatron), "--output", str(work / f"back_{layers}"),
                          "--no-tokenizer", "--vocab-size", str(args.vocab), "--dtype", "fp32",
                          "--max-shard-size", args.max_shard_size, "--quiet"],
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"mile-convert-hf failed for {layers} layers:\n{run.stdout}\n{run.stderr}")
    peak_kb = int(run.stdout.rsplit("PEAK_RSS_KB", 1)[1].split()[0])
    layer_parameters = 4 * args.hidden * args.hidden + 3 * args.hidden * args.ffn + 2 * args.hidden
    parameters = layers * layer_parameters + 2 * args.vocab * args.hidden + args.hidden
    return {"layers": layers, "parameters": parameters, "model_mb": parameters * 4 / 2**20,
            "layer_mb": layer_parameters * 4 / 2**20, "peak_rss_mb": peak_kb / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--layers", type=int, nargs="+", default=[6, 16])
    parser.add_argument("--max-shard-size", default="100MB",
                        help="output shard size; every measured model should exceed it (default 100MB)")
    parser.add_argument("--json", default=str(HERE / "results" / "convert_memory_bench.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(layers, args, Path(tmp)) for layers in args.layers]
    print(f"{'layers':>6} {'params':>12} {'model MB':>9} {'layer MB':>9} {'peak RSS MB':>12}")
    for row in rows:
        print(f"{row['layers']:>6} {row['parameters']:>12,} {row['model_mb']:>9.0f} {row['layer_mb']:>9.0f} "
              f"{row['peak_rss_mb']:>12.0f}")
    growth = rows[-1]["peak_rss_mb"] - rows[0]["peak_rss_mb"]
    model_growth = rows[-1]["model_mb"] - rows[0]["model_mb"]
    print(f"peak RSS grew {growth:.0f} MB while the model grew {model_growth:.0f} MB")
    result = {"settings": vars(args), "machine": platform.platform(), "rows": rows,
              "peak_rss_growth_mb": growth, "model_growth_mb": model_growth}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
