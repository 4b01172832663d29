"""Peak memory of `mile-convert-hf` as the model grows deeper: it should track one layer, not the model.

For each depth L, a random LLaMA model (hidden H, FFN F, fp32) is written with transformers, turned into a
Megatron torch_dist checkpoint at TP=2 with `mile-convert-megatron`, and converted back with `mile-convert-hf`
in a fresh process whose peak RSS (getrusage) is recorded. Prints a table and writes JSON.

    .venv/bin/python benchmarks/convert_memory_bench.py [--hidden 1024 --ffn 2816 --layers 2 8 16]

Memory is meant to be bounded by one layer plus one output shard (safetensors serialises a shard in memory,
so about twice --max-shard-size): once every model exceeds one shard, peak RSS should stay flat as L grows
(the rest is the interpreter and the torch/transformers imports).
"""

from __future__ import annotations

import argparse
import json
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


def write_hf_model(directory: Path, layers: int, hidden: int, ffn: int, vocab: int) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=vocab,
                         max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory, max_shard_size="200MB")
    return sum(p.numel() for p in model.parameters())


def measure(layers: int, args: argparse.Namespace, work: Path) -> dict:
    hf = work / f"hf_{layers}"
    parameters = write_hf_model(hf, layers, args.hidden, args.ffn, args.vocab)
    megatron = work / f"megatron_{layers}"
    subprocess.run([sys.executable, "-m", "mile_megatron.convert.to_megatron", str(hf), "--output", str(megatron),
                    "--tensor-model-parallel-size", "2"], check=True, capture_output=True, text=True)
    run = subprocess.run([sys.executable, "-c", MEASURE, str(megatron), "--output", str(work / f"back_{layers}"),
                          "--no-tokenizer", "--dtype", "fp32", "--max-shard-size", args.max_shard_size, "--quiet"],
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"mile-convert-hf failed for {layers} layers:\n{run.stdout}\n{run.stderr}")
    peak_kb = int(run.stdout.rsplit("PEAK_RSS_KB", 1)[1].split()[0])
    layer_bytes = 4 * (4 * args.hidden * args.hidden + 3 * args.hidden * args.ffn + 2 * args.hidden)
    return {"layers": layers, "parameters": parameters, "model_mb": parameters * 4 / 2**20,
            "layer_mb": layer_bytes / 2**20, "peak_rss_mb": peak_kb / 1024}


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
