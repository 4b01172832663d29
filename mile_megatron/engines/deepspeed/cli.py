"""MiLe pretraining of Hugging Face LLaMA models with DeepSpeed ZeRO: the paper's own engine, on Megatron data.

    mile-pretrain-ds --preset {tiny,468m,1.2b,6.7b} [--hf-init DIR]
                     (--tokenizer-model SP.model | --hf-tokenizer DIR | --vocab-size N)
                     (--data-path [W] PREFIX ... | --data-args-path FILE | --per-split-data-args-path JSON
                      | --mock-data) [--split 969,30,1]
                     [--zero-stage {0,1,2,3}] [--deepspeed-config JSON] [--bf16 | --fp32] [--cpu]
                     [--save DIR --save-interval N] [--load DIR] [--export-hf DIR] [--loss-log PATH]
                     [--loss {mile,focal,ce}] [--mile-gamma G] [--mile-sigma S] [--mile-alpha {global,official,none}]
                     [--seq-length --micro-batch-size --global-batch-size --train-iters --lr --min-lr
                      --lr-warmup-iters --weight-decay --adam-beta1 --adam-beta2 --adam-eps --clip-grad --seed ...]

Launch it like any DeepSpeed script: `deepspeed --hostfile H --module mile_megatron.engines.deepspeed ...` or
`torchrun ... -m mile_megatron.engines.deepspeed ...` (examples/deepspeed/); one process runs without a launcher.

    cli.py         this command line: flags, recipe defaults (mile_megatron.recipes; flags given win), refusals
    config.py      the DeepSpeed config (configs/zero{0,1,2,3}.json), AdamW parameter groups, Megatron's LR schedule
    trainer.py     model, tokenizer, data, the training loop and its exact step objective
    checkpoint.py  DeepSpeed checkpoints with data position and RNG, the Hugging Face export

Objective of one optimizer step, over the global batch (micro-batch x gradient-accumulation steps x
data-parallel ranks), exactly as mile-pretrain (mile_megatron.loss.objective):
    L = sum_{micro-batches, ranks, tokens} alpha * w * CE * mask / D
    D = sum(w * mask) for --mile-alpha global (alpha = N / D),  D = N = the counted tokens otherwise
so 2 ranks x 2 micro-batches, 1 rank x 4 micro-batches and 4 ranks x 1 micro-batch optimise the same L
(trainer.train_step says how the gradients are divided by D, and what that costs per ZeRO stage).

Logged every step (rank 0): a JSON line to --loss-log {"iteration", "consumed_samples", "lr", "ce", "loss",
"entropy", "alpha", "tokens", "grad_norm", "step_seconds", "tokens_per_second"} where ce / entropy are means
over the step's counted tokens of all ranks, loss = L above and alpha the step's alpha (N / D for global, the
token-weighted mean of the per-micro-batch values for official); and every --log-interval steps a text line on
stdout.

run(argv, observer=...) is the programmatic entry: the observer (trainer.StepObserver) sees every micro-batch
and the end of training.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mile_megatron.loss.arguments import add_loss_arguments, non_negative_float, positive_int
from mile_megatron.loss.settings import env_flag
from mile_megatron.recipes import PRESET_NAMES, RECIPES, recipe
from mile_megatron.utils.errors import UsageError

from .checkpoint import export_dir_problem
from .config import ZERO_STAGES
from .trainer import StepObserver, train

PROGRAM = "mile-pretrain-ds"
CPU_ENV_VAR = "MILE_MEGATRON_CPU"
_PAPER = RECIPES["468m"]
# The paper's optimiser and bookkeeping (mile_megatron.recipes) when no preset is given.
PAPER_DEFAULTS: dict[str, Any] = {
    "lr": _PAPER.optimizer.lr, "min_lr": _PAPER.optimizer.min_lr, "lr_warmup_iters": _PAPER.optimizer.warmup_iters,
    "adam_beta1": _PAPER.optimizer.adam_beta1, "adam_beta2": _PAPER.optimizer.adam_beta2,
    "adam_eps": _PAPER.optimizer.adam_eps, "weight_decay": _PAPER.optimizer.weight_decay,
    "clip_grad": _PAPER.optimizer.clip_grad, "seed": _PAPER.training.seed, "log_interval": _PAPER.training.log_interval,
    "save_interval": _PAPER.training.save_interval,
}


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mile-pretrain-ds", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    model = parser.add_argument_group("model")
    model.add_argument("--preset", choices=PRESET_NAMES,
                       help="paper recipe: architecture and training defaults (flags given here win)")
    model.add_argument("--hf-init", metavar="DIR",
                       help="start from this Hugging Face LlamaForCausalLM: architecture and weights from DIR "
                            "(a --preset then only gives the training recipe)")
    model.add_argument("--init-method-std", type=float, default=None, help="weight init std (preset's by default)")
    model.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                       help="recompute activations in the backward pass (on for the 6.7b preset)")
    model.add_argument("--make-vocab-size-divisible-by", type=positive_int, default=1,
                       help="pad a fresh model's vocabulary to a multiple of this (1: the tokenizer's size)")

    tokenizer = parser.add_argument_group("tokenizer (exactly one)")
    tokenizer.add_argument("--tokenizer-model", metavar="PATH", help="SentencePiece .model (e.g. LLaMA's)")
    tokenizer.add_argument("--hf-tokenizer", metavar="DIR", help="Hugging Face tokenizer directory")
    tokenizer.add_argument("--vocab-size", type=positive_int, help="synthetic ids 0..N-1 (NullTokenizer, eod N-1)")

    data = parser.add_argument_group("data (exactly one source; the files mile-preprocess writes)")
    data.add_argument("--data-path", nargs="+", metavar="[WEIGHT] PREFIX", help="Megatron --data-path")
    data.add_argument("--data-args-path", metavar="FILE", help="blends/data_args.txt (with --split)")
    data.add_argument("--per-split-data-args-path", metavar="JSON", help="blends/per_split_data_args.json")
    data.add_argument("--mock-data", action="store_true", help="Megatron's synthetic data (throughput checks)")
    data.add_argument("--split", default=None, help="train,valid,test weights (default 969,30,1)")
    data.add_argument("--eod-mask-loss", action=argparse.BooleanOptionalAction, default=None,
                      help="no loss at positions holding EOD (on for the paper presets)")
    data.add_argument("--data-cache-path", metavar="DIR", help="where Megatron caches dataset indices")

    training = parser.add_argument_group("training")
    training.add_argument("--seq-length", type=positive_int)
    training.add_argument("--micro-batch-size", type=positive_int, help="sequences per process and micro-batch")
    training.add_argument("--global-batch-size", type=positive_int,
                          help="sequences per optimizer step = micro batch x accumulation x data-parallel size")
    training.add_argument("--train-iters", type=positive_int, help="optimizer steps")
    training.add_argument("--lr", type=non_negative_float)
    training.add_argument("--min-lr", type=non_negative_float)
    training.add_argument("--lr-warmup-iters", type=_non_negative_int)
    training.add_argument("--weight-decay", type=non_negative_float)
    training.add_argument("--adam-beta1", type=float)
    training.add_argument("--adam-beta2", type=float)
    training.add_argument("--adam-eps", type=float)
    training.add_argument("--clip-grad", type=non_negative_float, help="global gradient-norm clip (0: off)")
    training.add_argument("--seed", type=int)

    engine = parser.add_argument_group("DeepSpeed")
    engine.add_argument("--zero-stage", type=int, choices=ZERO_STAGES, default=None,
                        help="ZeRO stage (default 2, the paper's; packaged configs in hf/deepspeed_configs/)")
    engine.add_argument("--deepspeed-config", metavar="JSON",
                        help="DeepSpeed config file (or inline JSON) replacing the packaged zero*.json; batch "
                             "sizes, clipping, precision and optimizer values come from the flags (leave them "
                             "out or 'auto')")
    precision = engine.add_mutually_exclusive_group()
    precision.add_argument("--bf16", dest="precision", action="store_const", const="bf16",
                           help="bf16 weights/activations, fp32 master weights (GPU default for paper presets)")
    precision.add_argument("--fp32", dest="precision", action="store_const", const="fp32", help="all fp32")
    engine.add_argument("--cpu", action="store_true", help="CPU: DeepSpeed's CPU accelerator, gloo, torch AdamW "
                                                           "(or MILE_MEGATRON_CPU=1)")
    engine.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)

    output = parser.add_argument_group("checkpoints, export and logging")
    output.add_argument("--save", metavar="DIR", help="DeepSpeed checkpoint directory")
    output.add_argument("--save-interval", type=positive_int, help="save every N steps (and at the end)")
    output.add_argument("--load", metavar="DIR", help="resume from the newest checkpoint in DIR (if any)")
    output.add_argument("--export-hf", metavar="DIR", help="write a Hugging Face model here at the end")
    output.add_argument("--export-dtype", choices=("fp32", "bf16"), default="fp32",
                        help="dtype of the exported weights (default fp32, the master weights)")
    output.add_argument("--log-interval", type=positive_int, help="stdout line every N steps")
    output.add_argument("--loss-log", metavar="PATH", help="append one JSON line per step")

    add_loss_arguments(parser)
    parser.set_defaults(precision=None)
    return parser


def preset_defaults(preset: str) -> dict[str, Any]:
    """Training defaults of recipe `preset` (mile_megatron.recipes), as parser defaults."""
    chosen = recipe(preset)
    optimizer, training = chosen.optimizer, chosen.training
    defaults = {
        "seq_length": chosen.architecture.seq_length, "micro_batch_size": training.micro_batch_size,
        "global_batch_size": training.global_batch_size, "train_iters": training.train_iters,
        "lr": optimizer.lr, "min_lr": optimizer.min_lr, "lr_warmup_iters": optimizer.warmup_iters,
        "adam_beta1": optimizer.adam_beta1, "adam_beta2": optimizer.adam_beta2, "weight_decay": optimizer.weight_decay,
        "clip_grad": optimizer.clip_grad, "init_method_std": training.init_method_std, "seed": training.seed,
        "log_interval": training.log_interval, "eod_mask_loss": training.eod_mask_loss,
        "gradient_checkpointing": training.recompute, "preset_bf16": training.bf16,
    }
    if optimizer.adam_eps is not None:
        defaults["adam_eps"] = optimizer.adam_eps
    if training.save_interval is not None:
        defaults["save_interval"] = training.save_interval
    return defaults


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse argv with the preset's defaults under the user's flags; fill the paper's optimiser otherwise."""
    parser = build_parser()
    first, _ = parser.parse_known_args(list(argv))
    if first.preset is not None:
        parser.set_defaults(**{k: v for k, v in preset_defaults(first.preset).items() if k != "preset_bf16"})
    args = parser.parse_args(list(argv))
    args.preset_bf16 = first.preset is not None and preset_defaults(first.preset)["preset_bf16"]
    for name, value in PAPER_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.eod_mask_loss = bool(args.eod_mask_loss)
    args.gradient_checkpointing = bool(args.gradient_checkpointing)
    args.cpu = args.cpu or env_flag(CPU_ENV_VAR, False)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Refuse incomplete or contradictory settings before anything starts, naming the fix."""
    problems: list[str] = []
    if args.preset is None and args.hf_init is None:
        problems.append("give --preset (the paper's architectures: " + ", ".join(PRESET_NAMES)
                        + ") or --hf-init DIR (a Hugging Face LLaMA model)")
    if args.hf_init is not None and not os.path.isfile(os.path.join(args.hf_init, "config.json")):
        problems.append(f"--hf-init {args.hf_init}: no config.json there (give a save_pretrained directory, e.g. "
                        "from mile-convert-hf)")
    tokenizers = [name for name in ("tokenizer_model", "hf_tokenizer", "vocab_size") if getattr(args, name)]
    if len(tokenizers) != 1:
        problems.append("give exactly one of --tokenizer-model (SentencePiece), --hf-tokenizer (directory) or "
                        f"--vocab-size (synthetic ids); got {', '.join(tokenizers) or 'none'}")
    sources = [name for name in ("data_path", "data_args_path", "per_split_data_args_path", "mock_data")
               if getattr(args, name)]
    if len(sources) != 1:
        problems.append("give exactly one data source: --data-path, --data-args-path, --per-split-data-args-path "
                        f"or --mock-data; got {', '.join(sources) or 'none'}")
    for name in ("seq_length", "micro_batch_size", "global_batch_size", "train_iters"):
        if getattr(args, name) is None:
            problems.append(f"--{name.replace('_', '-')} is not set (no --preset gives it)")
    if args.min_lr > args.lr:
        problems.append(f"--min-lr {args.min_lr} is above --lr {args.lr}")
    if args.train_iters is not None and args.lr_warmup_iters > args.train_iters:
        problems.append(f"--lr-warmup-iters {args.lr_warmup_iters} exceeds --train-iters {args.train_iters}")
    if args.export_hf is not None and args.save is None:
        problems.append("--export-hf needs --save: the export consolidates the last DeepSpeed checkpoint")
    if args.export_hf is not None:
        problem = export_dir_problem(Path(args.export_hf))
        if problem:
            problems.append(problem)
    if args.cpu and args.precision == "bf16":
        problems.append("--bf16 with --cpu: DeepSpeed's CPU path trains in fp32 here; drop --bf16")
    if problems:
        raise UsageError("cannot run this configuration:\n  - " + "\n  - ".join(problems))


def run(argv: Sequence[str], *, observer: StepObserver | None = None) -> None:
    """Train as the command line says; observer sees every micro-batch and the end of training."""
    args = parse_args(argv)
    check_args(args)
    train(args, observer or StepObserver())


def main(argv: Sequence[str] | None = None, *, observer: StepObserver | None = None) -> None:
    """Console script `mile-pretrain-ds` / `python -m mile_megatron.engines.deepspeed`."""
    try:
        run(sys.argv[1:] if argv is None else argv, observer=observer)
    except UsageError as error:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{PROGRAM}: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
