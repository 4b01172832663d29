"""The main job on a CPU machine in a few minutes: `mile-demo`.

    Pile-format corpus (Python's own documentation text, tagged with the 22 Pile domains)
      -> SentencePiece tokenizer (mile-train-tokenizer)
      -> per-domain Megatron indexed datasets + blend files (mile-preprocess)
      -> 2-process TP=2 pretraining of the tiny preset with MiLe (mile-pretrain on Megatron's own loop, CPU mode)
      -> checkpoint, per-domain validation loss, loss curves (PNG)
      -> Hugging Face LLaMA model (mile-convert-hf --verify: logit parity with the Megatron model)
      -> a short greedy generation and per-domain validation perplexity (mile-eval perplexity), summary (JSON)

Everything is written under --output-dir; nothing is downloaded. Exit status is nonzero if any stage fails, the
converted model's logits differ from Megatron's by more than 1e-4, or the training cross-entropy does not fall by
--min-ce-drop nats.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

MARKER = ".mile-demo"
VALIDATION_LINE = re.compile(r"validation-(?P<name>\S+) loss at iteration (?P<iteration>\d+) \| lm loss value: (?P<ce>\S+)")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mile-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="demo_out", help="where everything goes (default: ./demo_out)")
    parser.add_argument("--train-iters", type=int, default=150, help="optimizer steps (default 150)")
    parser.add_argument("--documents-per-shard", type=int, default=220)
    parser.add_argument("--vocab-size", type=int, default=1000)
    parser.add_argument("--min-ce-drop", type=float, default=1.0,
                        help="required fall of the training cross-entropy, first 5 vs last 5 steps (nats)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed for the training launch")
    return parser.parse_args(argv)


def _prepare_output_dir(out: Path) -> None:
    """Reuse a directory only if an earlier demo made it; never delete anything else."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise SystemExit(
                f"mile-demo: {out} exists and was not created by mile-demo; choose another --output-dir "
                "(nothing was changed)"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("created by mile-demo; rerunning the demo replaces this directory\n")


def _stage(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.perf_counter()


def _run_console(main, argv: list[str], what: str) -> None:
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    if status not in (None, 0):
        raise SystemExit(f"mile-demo: {what} failed (exit status {status})")


def _train(out: Path, tokenizer_model: Path, blends: Path, validation: dict, train_iters: int,
           timeout: float) -> tuple[str, float]:
    loss_log = out / "loss_log.jsonl"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--local-addr", "127.0.0.1",
        "--nproc-per-node", "2",
        "-m", "mile_megatron.engines.megatron", "--cpu", "--preset", "tiny",
        "--tensor-model-parallel-size", "2",
        "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", str(tokenizer_model),
        "--per-split-data-args-path", str(blends / "per_split_data_args.json"),
        *validation["megatron_args"],
        "--eod-mask-loss",
        "--train-iters", str(train_iters), "--lr-decay-iters", str(train_iters),
        "--eval-interval", str(train_iters), "--eval-iters", "1",
        "--save", str(out / "checkpoints"), "--save-interval", str(train_iters),
        "--log-interval", "10",
        "--loss", "mile", "--mile-gamma", "1.0", "--mile-sigma", "1.0", "--mile-alpha", "global",
        "--mile-loss-log", str(loss_log),
    ]
    env = dict(os.environ)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    print(" ".join(command), flush=True)
    start = time.perf_counter()
    log_path = out / "train.log"
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        lines: list[str] = []
        try:
            for line in process.stdout:
                log.write(line)
                lines.append(line)
                training_line = " iteration " in line and "lm loss" in line and "validation" not in line
                if training_line or "saved checkpoint" in line:
                    print("  " + line.rstrip()[:200], flush=True)
            process.wait(timeout=timeout)
        finally:
            if process.poll() is None:
                process.kill()
    if process.returncode != 0:
        print("".join(lines[-60:]), file=sys.stderr)
        raise SystemExit(f"mile-demo: training failed (exit status {process.returncode}); full log: {log_path}")
    return "".join(lines), time.perf_counter() - start


def _train_curves(loss_log: Path) -> dict[int, dict[str, float]]:
    """Token-weighted per-iteration means of the per-micro-batch records (all data-parallel ranks)."""
    sums: dict[int, dict[str, float]] = {}
    for line in loss_log.read_text().splitlines():
        record = json.loads(line)
        if record["split"] != "train":
            continue
        step = sums.setdefault(record["iteration"], {"tokens": 0.0, "ce": 0.0, "loss": 0.0, "entropy": 0.0})
        step["tokens"] += record["tokens"]
        for key in ("ce", "loss", "entropy"):
            step[key] += record[key] * record["tokens"]
        step["alpha"] = record["alpha"]
    return {
        iteration: {key: (value / step["tokens"] if key in ("ce", "loss", "entropy") else value)
                    for key, value in step.items()}
        for iteration, step in sorted(sums.items())
    }


def _plot(curves: dict[int, dict[str, float]], validation: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(curves)
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.plot(steps, [curves[s]["ce"] for s in steps], label="cross-entropy (lm loss)")
    left.plot(steps, [curves[s]["loss"] for s in steps], label="MiLe loss (optimised)")
    left.plot(steps, [curves[s]["entropy"] for s in steps], label="mean predictive entropy", linestyle="--")
    left.set_xlabel("iteration")
    left.set_ylabel("nats / token")
    left.set_title("Training, tiny preset, TP=2, CPU")
    left.legend()
    left.grid(alpha=0.3)
    names = sorted(validation, key=validation.get)
    values = [validation[n] for n in names]
    right.barh(names, values)
    if values:
        right.set_xlim(min(values) - 0.1, max(values) + 0.05)
    right.set_xlabel("validation cross-entropy (nats / token)")
    right.set_title("Per-domain validation at the last step")
    right.tick_params(axis="y", labelsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _generate(hf_dir: Path, prompt: str, new_tokens: int = 24) -> tuple[str, int]:
    """Greedy continuation of `prompt` by the converted model (BOS prepended, as in training)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        output = model.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                                pad_token_id=tokenizer.eos_token_id)
    generated = output[0, ids.shape[1]:]
    return tokenizer.decode(generated, skip_special_tokens=True), int(generated.numel())


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    out = Path(args.output_dir).resolve()
    _prepare_output_dir(out)
    timings: dict[str, float] = {}

    from mile_megatron.data import preprocess, train_tokenizer
    from mile_megatron.data.synthetic import write_pile_like_corpus

    start = _stage("1/6 corpus: Pile-format shards from Python's documentation text")
    corpus = write_pile_like_corpus(out / "corpus", train_shards=3, documents_per_shard=args.documents_per_shard,
                                    valid_documents=88, seed=0)
    train_files = [str(p) for p in corpus.train_files]
    print(f"  {len(train_files)} train shards + {corpus.val_file.name} in {out / 'corpus'}")
    timings["corpus_s"] = time.perf_counter() - start

    start = _stage("2/6 tokenizer: mile-train-tokenizer")
    prefix = out / "tokenizer" / "spm"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    _run_console(train_tokenizer.main, ["--input", *train_files, "--model-prefix", str(prefix),
                                        "--vocab-size", str(args.vocab_size), "--soft-vocab-limit"],
                 "tokenizer training")
    tokenizer_model = prefix.with_suffix(".model")
    timings["tokenizer_s"] = time.perf_counter() - start

    start = _stage("3/6 data: mile-preprocess -> per-domain Megatron indexed datasets + blend files")
    data = out / "data"
    _run_console(preprocess.main, ["run", "--train", *train_files, "--valid", str(corpus.val_file),
                                   "--tokenizer-model", str(tokenizer_model), "--output-dir", str(data),
                                   "--workers", "2", "--no-progress"], "preprocessing")
    validation_sets = json.loads((data / "blends" / "validation_sets.json").read_text())
    timings["preprocess_s"] = time.perf_counter() - start

    _stage(f"4/6 pretraining: tiny preset, MiLe, TP=2 on 2 CPU processes, {args.train_iters} iterations")
    log_text, timings["train_s"] = _train(out, tokenizer_model, data / "blends", validation_sets,
                                          args.train_iters, args.timeout)

    from mile_megatron.convert import to_hf
    from mile_megatron.evaluate import cli as evaluate_cli

    start = _stage("5/6 conversion: mile-convert-hf --verify (Megatron TP=2 checkpoint -> Hugging Face LLaMA)")
    hf_dir = out / "hf"
    _run_console(to_hf.main, [str(out / "checkpoints"), "--output", str(hf_dir), "--tokenizer-model",
                              str(tokenizer_model), "--dtype", "fp32", "--verify", "--tolerance", "1e-4"],
                 "conversion or its logit-parity check")
    timings["convert_s"] = time.perf_counter() - start

    start = _stage("6/6 the converted model: greedy generation and per-domain perplexity (mile-eval)")
    prompt = "The for statement"
    continuation, generated_tokens = _generate(hf_dir, prompt)
    print(f"  {prompt!r} -> {continuation!r}")
    _run_console(evaluate_cli.main, ["perplexity", str(hf_dir), "--data", str(data), "--context-length", "64",
                                     "--eod-mask-loss", "-o", str(out / "perplexity.json")], "mile-eval perplexity")
    perplexity = json.loads((out / "perplexity.json").read_text())
    timings["evaluate_s"] = time.perf_counter() - start

    curves = _train_curves(out / "loss_log.jsonl")
    validation = {m["name"]: float(m["ce"]) for m in VALIDATION_LINE.finditer(log_text)}
    steps = list(curves)
    if len(steps) < 10:
        raise SystemExit(f"mile-demo: the loss log has only {len(steps)} training iterations")
    first = sum(curves[s]["ce"] for s in steps[:5]) / 5
    last = sum(curves[s]["ce"] for s in steps[-5:]) / 5
    _plot(curves, validation, out / "loss_curves.png")
    summary = {
        "train_iterations": len(steps),
        "train_ce_first5": first,
        "train_ce_last5": last,
        "train_ce_drop": first - last,
        "final": curves[steps[-1]],
        "validation_ce_per_domain": validation,
        "validation_ce_uniform_average": sum(validation.values()) / len(validation) if validation else None,
        "validation_ce_worst_domain": max(validation.items(), key=lambda kv: kv[1]) if validation else None,
        "checkpoint": str(out / "checkpoints"),
        "hf_model": str(hf_dir),
        "generation": {"prompt": prompt, "continuation": continuation, "new_tokens": generated_tokens},
        "perplexity": str(out / "perplexity.json"),
        "hf_validation_perplexity": perplexity["summary"],
        "plot": str(out / "loss_curves.png"),
        "timings_s": timings,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    print("\n=== result")
    print(f"  training cross-entropy  {first:.3f} -> {last:.3f} nats/token (first/last 5 iterations)")
    print(f"  MiLe loss (last)        {curves[steps[-1]]['loss']:.3f};  entropy {curves[steps[-1]]['entropy']:.3f};"
          f"  alpha {curves[steps[-1]]['alpha']:.3f}")
    if validation:
        worst = summary["validation_ce_worst_domain"]
        print(f"  validation CE           uniform average {summary['validation_ce_uniform_average']:.3f} over "
              f"{len(validation)} domains; worst {worst[0]} {worst[1]:.3f}")
    print(f"  checkpoint              {out / 'checkpoints'}")
    print(f"  Hugging Face model      {hf_dir} (logits verified against Megatron)")
    print(f"  generation              {prompt!r} -> {continuation!r}")
    print(f"  perplexity (mile-eval)  uniform average {perplexity['summary']['uniform_perplexity']:.1f}, worst "
          f"{perplexity['summary']['worst_domain']} {perplexity['summary']['worst_perplexity']:.1f}  "
          f"({out / 'perplexity.json'})")
    print(f"  plot / summary          {out / 'loss_curves.png'}  {out / 'summary.json'}")
    if first - last < args.min_ce_drop:
        print(f"mile-demo: cross-entropy fell by only {first - last:.3f} nats (< {args.min_ce_drop})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
