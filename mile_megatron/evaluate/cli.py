"""``mile-eval``: evaluate a converted Hugging Face LLaMA model (output of mile-convert-hf).

    mile-eval harness MODEL_DIR [--tasks mmlu|commonsense|closed_book_qa|paper|NAME[:N],...]
                      [--num-fewshot N] [--device cuda] [--dtype bfloat16] [--batch-size 8]
                      [--limit N] [--include-path DIR] [--offline] [--dry-run] [--output FILE]
    mile-eval perplexity MODEL_DIR (--data PREPROCESS_OUT | --validation-sets FILE |
                      --prefix NAME=PREFIX ...) [--method packed|document] [--context-length L]
                      [--batch-size 8] [--max-tokens-per-domain N] [--eod-mask-loss] [--output FILE]

Exit status: 0 success, 2 bad input (nothing evaluated, no output written), 1 evaluation failure,
130 interrupted. Results JSON is written atomically (a complete file or none).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .common import DTYPES, EvalError, write_json_atomic


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _limit(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0 (an example count, or a fraction < 1)")
    return int(value) if value >= 1 and value.is_integer() else value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mile-eval", description="Evaluate a converted Hugging Face LLaMA model: "
        "lm-evaluation-harness tasks, or per-domain perplexity on Megatron indexed datasets.")
    sub = parser.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("model", help="Hugging Face LLaMA directory written by mile-convert-hf")
    common.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    common.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="weights/compute dtype (default auto: bfloat16 on CUDA, float32 on CPU)")
    common.add_argument("--output", "-o", default=None, help="results JSON path (default: print only)")
    common.add_argument("--quiet", action="store_true", help="no progress lines on stderr")

    harness = sub.add_parser("harness", parents=[common], help="lm-evaluation-harness tasks (default MMLU 5-shot)",
                             description="Runs lm_eval.simple_evaluate on the model. Suites: mmlu "
                             "(5-shot), commonsense (0-shot), closed_book_qa (0-shot), paper (all).")
    harness.add_argument("--tasks", default="mmlu",
                         help="comma-separated suites or lm_eval task names, NAME:N for N shots "
                         "(default mmlu = mmlu:5)")
    harness.add_argument("--num-fewshot", type=int, default=None, help="override the shots of every task")
    harness.add_argument("--batch-size", default="8", help="integer, 'auto' or 'auto:N' (default 8)")
    harness.add_argument("--max-batch-size", type=_positive_int, default=64, help="upper bound for --batch-size auto")
    harness.add_argument("--max-length", type=_positive_int, default=None,
                         help="context length for lm_eval (default: the model's max_position_embeddings)")
    harness.add_argument("--limit", type=_limit, default=None,
                         help="examples per task (testing only; a fraction < 1 is a share)")
    harness.add_argument("--include-path", action="append", default=[], metavar="DIR",
                         help="directory of extra lm_eval task YAMLs (repeatable)")
    harness.add_argument("--seed", type=int, default=1234, help="random/numpy/torch/few-shot seed (default 1234)")
    harness.add_argument("--bootstrap-iters", type=int, default=100000,
                         help="bootstrap iterations for stderr (0 = skip)")
    harness.add_argument("--no-bos", dest="add_bos", action="store_false",
                         help="do not prepend BOS (only for data preprocessed with --no-prepend-bos)")
    harness.add_argument("--offline", action="store_true",
                         help="never contact the Hugging Face Hub (task datasets must be cached or local)")
    harness.add_argument("--dry-run", action="store_true",
                         help="check inputs and print the resolved tasks and settings as JSON; evaluate nothing")

    ppl = sub.add_parser("perplexity", parents=[common], help="per-domain perplexity on Megatron indexed datasets",
                         description="Token-weighted NLL and perplexity per domain, the uniform average "
                         "over domains and the worst domain. Fully offline.")
    source = ppl.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="mile-preprocess output directory (uses blends/validation_sets.json)")
    source.add_argument("--validation-sets", help="a validation_sets.json written by mile-preprocess")
    source.add_argument("--prefix", action="append", metavar="NAME=PREFIX",
                        help="a dataset prefix (no .bin/.idx) and its domain name (repeatable)")
    ppl.add_argument("--method", default="packed", choices=("packed", "document"),
                     help="packed: domain stream cut into windows (Megatron-style, default); "
                     "document: each document separately")
    ppl.add_argument("--context-length", type=_positive_int, default=None,
                     help="tokens of context per window (default: max_position_embeddings)")
    ppl.add_argument("--batch-size", type=_positive_int, default=8, help="windows per forward pass (default 8)")
    ppl.add_argument("--max-tokens-per-domain", type=_positive_int, default=None,
                     help="evaluate only the first N predicted tokens of each domain")
    ppl.add_argument("--eod-mask-loss", action="store_true",
                     help="skip targets whose input token is EOD (as Megatron's --eod-mask-loss)")
    return parser


def _emit(results: dict, table: str, output: str | None) -> None:
    print(table)
    if output:
        path = write_json_atomic(output, results)
        print(f"results: {path}")


def _harness(args: argparse.Namespace) -> int:
    if args.offline:
        from .harness import set_offline_environment

        set_offline_environment()
    from .harness import build_plan, render_table, run_plan

    plan = build_plan(args.model, args.tasks, num_fewshot=args.num_fewshot, device=args.device,
                      dtype=args.dtype, batch_size=args.batch_size, max_batch_size=args.max_batch_size,
                      max_length=args.max_length, limit=args.limit, include_paths=args.include_path,
                      seed=args.seed, bootstrap_iters=args.bootstrap_iters, add_bos=args.add_bos,
                      offline=args.offline)
    if args.dry_run:
        print(json.dumps(plan.describe(), indent=2))
        return 0
    results = run_plan(plan, progress=not args.quiet)
    _emit(results, render_table(results), args.output)
    return 0


def _perplexity(args: argparse.Namespace) -> int:
    from .perplexity import (domains_from_args, domains_from_validation_sets, evaluate_perplexity,
                             read_preprocess_summary, render_table)

    listing = None
    if args.prefix:
        domains = domains_from_args(args.prefix)
    else:
        domains, listing = domains_from_validation_sets(args.data or args.validation_sets)
    source = {"validation_sets": str(listing) if listing else None,
              "preprocess": read_preprocess_summary(listing)}
    results = evaluate_perplexity(
        args.model, domains, context_length=args.context_length, method=args.method,
        batch_size=args.batch_size, device=args.device, dtype=args.dtype,
        max_tokens_per_domain=args.max_tokens_per_domain, eod_mask_loss=args.eod_mask_loss,
        progress=not args.quiet, source=source)
    _emit(results, render_table(results), args.output)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.output and Path(args.output).is_dir():
        print(f"mile-eval: error: --output {args.output} is a directory; give a file path", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return _harness(args) if args.command == "harness" else _perplexity(args)
    except EvalError as error:
        print(f"mile-eval {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mile-eval: interrupted; no results written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
