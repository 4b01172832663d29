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

Launch it like any DeepSpeed script: `deepspeed --hostfile H --module mile_megatron.hf.pretrain_ds ...` or
`torchrun ... -m mile_megatron.hf.pretrain_ds ...` (examples/deepspeed/); one process runs without a launcher.

Model: transformers' LlamaForCausalLM with the preset's shapes (mile_megatron.hf.models), or a Hugging Face
checkpoint (--hf-init, e.g. a Megatron checkpoint converted by mile-convert-hf). Data: Megatron's indexed
datasets and blend files through megatron-core's own dataset classes and sampler (mile_megatron.hf.data).
Loss: mile_megatron.hf.loss.causal_lm_loss, the same implementation as mile-pretrain.

Recipe (--preset fills the defaults, flags given on the command line win): AdamW with decoupled weight decay
on every parameter of two or more dimensions (embeddings, projections, output layer) and none on 1-D ones
(RMSNorm weights), as Megatron; betas (0.9, 0.95), eps 1e-8, gradient clipping on the global norm. Learning
rate per optimizer step n = 0, 1, ... (Megatron's schedule, so both engines step identically):
    n <= W:  lr * n / W                                   (linear warmup from 0; W = --lr-warmup-iters)
    n >  W:  min_lr + (lr - min_lr) * (1 + cos(pi * (n - W) / (T - W))) / 2        (T = --train-iters)

Objective of one optimizer step, over the global batch (micro-batch x gradient-accumulation steps x
data-parallel ranks), exactly as mile-pretrain (mile_megatron.loss, module docstring):
    L = sum_{micro-batches, ranks, tokens} alpha * w * CE * mask / D
    D = sum(w * mask) for --mile-alpha global (alpha = N / D),  D = N = the counted tokens otherwise
so 2 ranks x 2 micro-batches, 1 rank x 4 micro-batches and 4 ranks x 1 micro-batch optimise the same L. Each
micro-batch back-propagates its numerator with no data-parallel collective in the forward (except the paper's
per-micro-batch rule, --mile-alpha official); see train_step for how the gradients are divided by D. With ZeRO-1/2
(and bf16 ZeRO-0), alpha global and gradient accumulation, that division reads every gradient through DeepSpeed's
public API (deepspeed.utils.safe_update_full_grad_vectorized): one extra all-reduce of the gradients per step.
ZeRO-3, one micro-batch per step, --mile-alpha none/official and --loss ce need none.

Logged every step (rank 0): a JSON line to --loss-log {"iteration", "consumed_samples", "lr", "ce", "loss",
"entropy", "alpha", "tokens", "grad_norm", "step_seconds", "tokens_per_second"} where ce / entropy are means
over the step's counted tokens of all ranks, loss = L above and alpha the step's alpha (N / D for global, the
token-weighted mean of the per-micro-batch values for official); and every --log-interval steps a text line on
stdout.

Checkpoints: engine.save_checkpoint(DIR, tag="iter_NNNNNNN", client_state={iteration, consumed_samples, args})
every --save-interval steps and at the end, DeepSpeed's layout (DIR/latest names the newest tag; model,
optimizer and scheduler states inside the tag directory) plus rng_state_rank{R}.pt per rank. --load DIR
resumes the newest tag there (weights, optimizer, schedule, data position, RNG); a DIR without a checkpoint
starts from scratch, so --save and --load may name the same directory. Resume with the same number of
processes.

Export (--export-hf DIR, needs --save): after the last step, rank 0 consolidates the last checkpoint with
DeepSpeed's deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint (the fp32 master weights;
ZeRO stage 0 has none: its module weights are used) and writes save_pretrained (safetensors) + the tokenizer
files (--hf-tokenizer, or a --tokenizer-model SentencePiece model as a LlamaTokenizer). DIR must be new, empty
or an earlier export (it holds mile_export.json).

CPU (--cpu or MILE_MEGATRON_CPU=1): DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu) with gloo, fp32, and
torch.optim.AdamW as the optimizer (DeepSpeed's CPU optimizers compile C++ on first use). On GPUs: nccl and
DeepSpeed's FusedAdam from the config's "optimizer" section (its "torch_adam" switch, torch.optim.AdamW, when
FusedAdam is neither prebuilt nor buildable for lack of nvcc); bf16 when the preset trains in bf16. The model
is created on its device (no full fp32 copy per process in host memory); ZeRO-3 partitions it only once
DeepSpeed takes over, so every process must hold the whole fp32 model first.

Test-only environment variable (never set it in real runs):
  MILE_MEGATRON_TEST_DS_DUMP_DIR=DIR  every rank writes DIR/step1_rank{R}_micro{K}.pt for the micro-batches of
      the run's first step (tokens, labels, loss_mask, logits, the logits' gradient, loss statistics, N, dp
      size, accumulation steps) and DIR/final_rank{R}.pt (logits of the trained model on the dataset's first
      micro_batch_size samples).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mile_megatron.data.fsutil import append_json_line
from mile_megatron.presets import PRESET_NAMES
from mile_megatron.pretrain_gpt import ALPHA_CHOICES, LOSS_CHOICES, non_negative_float
from mile_megatron.settings import env_flag

ZERO_STAGES = (0, 1, 2, 3)
CONFIG_DIR = Path(__file__).resolve().parent / "deepspeed_configs"
EXPORT_MARKER = "mile_export.json"
DUMP_ENV_VAR = "MILE_MEGATRON_TEST_DS_DUMP_DIR"
CPU_ENV_VAR = "MILE_MEGATRON_CPU"
AUTO = "auto"

# The paper's optimiser (mile_megatron.presets) when no preset is given.
PAPER_DEFAULTS: dict[str, Any] = {
    "lr": 3e-4, "min_lr": 0.0, "lr_warmup_iters": 2000, "adam_beta1": 0.9, "adam_beta2": 0.95, "adam_eps": 1e-8,
    "weight_decay": 0.1, "clip_grad": 1.0, "seed": 111, "log_interval": 10, "save_interval": 1000,
}

# Megatron preset flag -> (our argument, type). Architecture flags are read by mile_megatron.hf.models.
_PRESET_TRAINING_FLAGS: dict[str, tuple[str, type]] = {
    "--seq-length": ("seq_length", int), "--micro-batch-size": ("micro_batch_size", int),
    "--global-batch-size": ("global_batch_size", int), "--train-iters": ("train_iters", int),
    "--lr": ("lr", float), "--min-lr": ("min_lr", float), "--lr-warmup-iters": ("lr_warmup_iters", int),
    "--adam-beta1": ("adam_beta1", float), "--adam-beta2": ("adam_beta2", float), "--adam-eps": ("adam_eps", float),
    "--weight-decay": ("weight_decay", float), "--clip-grad": ("clip_grad", float),
    "--init-method-std": ("init_method_std", float), "--seed": ("seed", int),
    "--log-interval": ("log_interval", int), "--save-interval": ("save_interval", int),
}


class UsageError(Exception):
    """A combination of settings that cannot work; the message says what to do."""


# ----------------------------------------------------------------------------------------------
# Arguments.
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


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
    model.add_argument("--make-vocab-size-divisible-by", type=_positive_int, default=1,
                       help="pad a fresh model's vocabulary to a multiple of this (1: the tokenizer's size)")

    tokenizer = parser.add_argument_group("tokenizer (exactly one)")
    tokenizer.add_argument("--tokenizer-model", metavar="PATH", help="SentencePiece .model (e.g. LLaMA's)")
    tokenizer.add_argument("--hf-tokenizer", metavar="DIR", help="Hugging Face tokenizer directory")
    tokenizer.add_argument("--vocab-size", type=_positive_int, help="synthetic ids 0..N-1 (NullTokenizer, eod N-1)")

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
    training.add_argument("--seq-length", type=_positive_int)
    training.add_argument("--micro-batch-size", type=_positive_int, help="sequences per process and micro-batch")
    training.add_argument("--global-batch-size", type=_positive_int,
                          help="sequences per optimizer step = micro batch x accumulation x data-parallel size")
    training.add_argument("--train-iters", type=_positive_int, help="optimizer steps")
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
    output.add_argument("--save-interval", type=_positive_int, help="save every N steps (and at the end)")
    output.add_argument("--load", metavar="DIR", help="resume from the newest checkpoint in DIR (if any)")
    output.add_argument("--export-hf", metavar="DIR", help="write a Hugging Face model here at the end")
    output.add_argument("--export-dtype", choices=("fp32", "bf16"), default="fp32",
                        help="dtype of the exported weights (default fp32, the master weights)")
    output.add_argument("--log-interval", type=_positive_int, help="stdout line every N steps")
    output.add_argument("--loss-log", metavar="PATH", help="append one JSON line per step")

    loss = parser.add_argument_group("MiLe loss")
    loss.add_argument("--loss", choices=LOSS_CHOICES, default="mile",
                      help="training loss: MiLe (entropy-weighted CE), focal, or plain CE")
    loss.add_argument("--mile-gamma", type=non_negative_float, default=1.0,
                      help="exponent gamma of the loss weight (MiLe: (sigma+H)^gamma; focal: (1-p)^gamma)")
    loss.add_argument("--mile-sigma", type=non_negative_float, default=1.0, help="MiLe weight offset sigma")
    loss.add_argument("--mile-alpha", choices=ALPHA_CHOICES, default="global",
                      help="weight normalisation: global (token-weighted over DP), official (paper code), none")
    parser.set_defaults(precision=None)
    return parser


def preset_defaults(preset: str) -> dict[str, Any]:
    """Training defaults of a preset from its Megatron flags (mile_megatron.presets)."""
    from mile_megatron.hf.models import preset_values

    values = preset_values(preset)
    defaults = {dest: kind(values[flag]) for flag, (dest, kind) in _PRESET_TRAINING_FLAGS.items() if flag in values}
    defaults["eod_mask_loss"] = "--eod-mask-loss" in values
    defaults["gradient_checkpointing"] = "--recompute-granularity" in values
    defaults["preset_bf16"] = "--bf16" in values
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


def export_dir_problem(directory: Path) -> str | None:
    """Why `directory` must not receive an export (None: new, empty, or an earlier export of ours)."""
    if not directory.exists():
        return None
    if not directory.is_dir():
        return f"--export-hf {directory} exists and is not a directory"
    if any(directory.iterdir()) and not (directory / EXPORT_MARKER).is_file():
        return (f"--export-hf {directory} is not empty and was not written by mile-pretrain-ds (no {EXPORT_MARKER}); "
                "give a new or empty directory")
    return None


# ----------------------------------------------------------------------------------------------
# Schedule and DeepSpeed configuration.
def learning_rate(step: int, *, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Learning rate of optimizer step `step` (0-based count of completed steps): see the module docstring."""
    if warmup > 0 and step <= warmup:
        return lr * step / warmup
    if step > total or total <= warmup:
        return min_lr
    ratio = (step - warmup) / (total - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * ratio))


def _load_json_config(text: str) -> dict[str, Any]:
    """A --deepspeed-config value: inline JSON ({...}) or a path to a JSON file."""
    try:
        if text.lstrip().startswith("{"):
            return json.loads(text)
        with open(text) as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise UsageError(f"--deepspeed-config {text}: no such file") from None
    except json.JSONDecodeError as error:
        raise UsageError(f"--deepspeed-config {text}: not valid JSON ({error})") from None


def packaged_config(stage: int) -> dict[str, Any]:
    """The packaged ZeRO config of `stage` (hf/deepspeed_configs/zero{stage}.json)."""
    with open(CONFIG_DIR / f"zero{stage}.json") as handle:
        return json.load(handle)


def _fill(config: dict[str, Any], path: tuple[str, ...], value: Any, flag: str) -> None:
    """Set config[path] = value; a value already there must be "auto" or equal (the flag owns this setting)."""
    node = config
    for key in path[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise UsageError(f"DeepSpeed config: {'.'.join(path[:-1])} must be an object")
    current = node.get(path[-1], AUTO)
    same = current == value or (isinstance(value, float) and isinstance(current, (int, float))
                                and math.isclose(current, value, rel_tol=1e-12))
    if current != AUTO and not same:
        raise UsageError(f"DeepSpeed config sets {'.'.join(path)} = {current!r} but {flag} gives {value!r}; the "
                         f"command line owns this setting: remove it from the config (or write \"auto\") and use "
                         f"{flag}")
    node[path[-1]] = value


def deepspeed_config(args: argparse.Namespace, dp_size: int) -> dict[str, Any]:
    """The DeepSpeed config of this run: the user's --deepspeed-config (or the packaged zero{stage}.json) with
    batch sizes, clipping, precision and optimizer values filled from the command line."""
    if args.deepspeed_config:
        config = _load_json_config(args.deepspeed_config)
        file_stage = config.get("zero_optimization", {}).get("stage", 0)
        if args.zero_stage is not None and file_stage != args.zero_stage:
            raise UsageError(f"--zero-stage {args.zero_stage} contradicts zero_optimization.stage = {file_stage} in "
                             "--deepspeed-config; give one of them")
    else:
        config = packaged_config(2 if args.zero_stage is None else args.zero_stage)
    micro, total = args.micro_batch_size, args.global_batch_size
    if total % (micro * dp_size):
        raise UsageError(f"--global-batch-size {total} is not a multiple of --micro-batch-size {micro} x "
                         f"{dp_size} data-parallel processes")
    _fill(config, ("train_micro_batch_size_per_gpu",), micro, "--micro-batch-size")
    _fill(config, ("gradient_accumulation_steps",), total // (micro * dp_size), "--global-batch-size")
    _fill(config, ("train_batch_size",), total, "--global-batch-size")
    _fill(config, ("gradient_clipping",), float(args.clip_grad), "--clip-grad")
    _fill(config, ("bf16", "enabled"), args.precision == "bf16", "--bf16 / --fp32")
    if config.get("fp16", {}).get("enabled") not in (None, False, AUTO):
        raise UsageError("fp16 is not supported by mile-pretrain-ds (the paper trains in bf16): use --bf16")
    config.setdefault("fp16", {})["enabled"] = False
    if "scheduler" in config:
        raise UsageError("the DeepSpeed config has a \"scheduler\" section; the learning-rate schedule is the "
                         "command line's (--lr, --min-lr, --lr-warmup-iters, --train-iters): remove it")
    optimizer = config.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if str(optimizer.get("type", "AdamW")).lower() not in ("adamw", "adam"):
        raise UsageError(f"DeepSpeed config optimizer type {optimizer.get('type')!r}: mile-pretrain-ds trains with "
                         "AdamW (decoupled weight decay, the paper's); use type AdamW")
    optimizer["type"] = "AdamW"
    _fill(config, ("optimizer", "params", "lr"), float(args.lr), "--lr")
    _fill(config, ("optimizer", "params", "betas"), [float(args.adam_beta1), float(args.adam_beta2)],
          "--adam-beta1 / --adam-beta2")
    _fill(config, ("optimizer", "params", "eps"), float(args.adam_eps), "--adam-eps")
    _fill(config, ("optimizer", "params", "weight_decay"), float(args.weight_decay), "--weight-decay")
    if args.cpu:
        # DeepSpeed's CPU Adam compiles C++ on first use: the entry passes torch.optim.AdamW instead.
        config.pop("optimizer")
        config["zero_allow_untested_optimizer"] = True
    leftover = [key for key, value in _walk(config) if value == AUTO]
    if leftover:
        raise UsageError(f"DeepSpeed config keeps \"auto\" at {', '.join(leftover)}: mile-pretrain-ds fills only "
                         "batch sizes, clipping, precision and optimizer values; give the others explicitly")
    return config


def _walk(node: Any, prefix: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix, node


def parameter_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on parameters with >= 2 dimensions, none on 1-D ones (norms), as Megatron."""
    decay, no_decay = [], []
    for _, parameter in model.named_parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


# ----------------------------------------------------------------------------------------------
# Distributed set-up.
def _set_launcher_defaults() -> None:
    """One process without a launcher: a world of one on a free local port."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    from mile_megatron.parallel import free_port

    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def init_distributed(cpu: bool) -> Any:
    """DeepSpeed's accelerator and process group: CPU + gloo, or CUDA + nccl. Returns the torch device."""
    if cpu:
        os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed is imported anywhere
    _set_launcher_defaults()
    import torch

    if not cpu and not torch.cuda.is_available():
        raise UsageError("no CUDA GPU is visible; pass --cpu (or MILE_MEGATRON_CPU=1) to train on CPU")
    if not cpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    import deepspeed

    if cpu:
        # DeepSpeed's CPU communication backend JIT-compiles a shared-memory kernel that only its inference
        # all-reduce uses; training collectives are torch.distributed (gloo) calls. Mark it unavailable.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl", auto_mpi_discovery=False, verbose=False)
    return torch.device("cpu") if cpu else torch.device("cuda", torch.cuda.current_device())


def fused_adam_available() -> bool:
    """Whether DeepSpeed's FusedAdam can load: prebuilt into the wheel, or a CUDA toolkit (nvcc) to JIT-build it."""
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import CUDA_HOME

    if installed_ops.get("fused_adam"):
        return True
    return CUDA_HOME is not None and os.path.isfile(os.path.join(CUDA_HOME, "bin", "nvcc"))


def _quiet_deepspeed() -> None:
    import logging

    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)


# ----------------------------------------------------------------------------------------------
# Model, tokenizer, data.
def _padded(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def build_model(args: argparse.Namespace, tokenizer: Any, device: Any) -> Any:
    """A fresh paper LLaMA (hf.models) or the --hf-init checkpoint, fp32, created on `device` (on GPUs this
    avoids a full fp32 copy per process in host memory; DeepSpeed then casts to bf16 when asked)."""
    import torch

    from mile_megatron.hf import models

    if args.hf_init:
        from transformers import AutoConfig, LlamaForCausalLM

        config = AutoConfig.from_pretrained(args.hf_init)
        if getattr(config, "model_type", None) != "llama":
            raise UsageError(f"--hf-init {args.hf_init}: model_type {config.model_type!r}; only LLaMA models "
                             "train here")
        if config.vocab_size < tokenizer.vocab_size:
            raise UsageError(f"--hf-init {args.hf_init} has {config.vocab_size} vocabulary rows but the tokenizer has "
                             f"{tokenizer.vocab_size} ids; use the tokenizer the model was trained with")
        placement = {} if device.type == "cpu" else {"device_map": {"": device}}
        model = LlamaForCausalLM.from_pretrained(args.hf_init, dtype=torch.float32, **placement)
    else:
        bos = getattr(tokenizer, "bos", None)
        config = models.llama_config(
            args.preset, _padded(tokenizer.vocab_size, args.make_vocab_size_divisible_by), seq_length=args.seq_length,
            bos_token_id=bos if isinstance(bos, int) and bos >= 0 else None, eos_token_id=tokenizer.eod,
            init_std=args.init_method_std)
        with torch.device(device):
            model = models.build_model(config, seed=args.seed)
    model.config.use_cache = False
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def build_tokenizer(args: argparse.Namespace) -> Any:
    from mile_megatron.hf import data

    try:
        return data.build_tokenizer(tokenizer_model=args.tokenizer_model, hf_tokenizer=args.hf_tokenizer,
                                    vocab_size=args.vocab_size)
    except ValueError as error:
        raise UsageError(str(error)) from None


def tokenizer_writer(args: argparse.Namespace) -> Any:
    """A function writing the Hugging Face tokenizer files into a directory, or None (synthetic ids)."""
    if args.hf_tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.hf_tokenizer)
        return lambda directory: tokenizer.save_pretrained(str(directory))
    if args.tokenizer_model:
        from mile_megatron.convert import ConversionError
        from mile_megatron.convert.hf_tokenizer import tokenizer_info

        try:
            info = tokenizer_info(argparse.Namespace(tokenizer_type="GPTSentencePieceTokenizer",
                                                     tokenizer_model=args.tokenizer_model))
        except ConversionError as error:
            raise UsageError(f"--export-hf: {error}") from None
        return info.write
    return None


def build_train_dataset(args: argparse.Namespace, tokenizer: Any) -> Any:
    from mile_megatron.hf import data

    extra = ["--data-cache-path", args.data_cache_path] if args.data_cache_path else []
    try:
        train, _, _ = data.build_datasets(
            tokenizer, data.train_valid_test_num_samples(args.train_iters, args.global_batch_size),
            seq_length=args.seq_length, seed=args.seed, data_path=args.data_path,
            per_split_data_args_path=args.per_split_data_args_path, data_args_path=args.data_args_path,
            split=args.split, eod_mask_loss=args.eod_mask_loss, mock_data=args.mock_data, extra_flags=extra)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if train is None:
        raise UsageError("the training split is empty: check --split and the blend files")
    return train


# ----------------------------------------------------------------------------------------------
# Checkpoints.
def checkpoint_tag(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine: Any, args: argparse.Namespace, iteration: int, consumed_samples: int) -> None:
    """DeepSpeed checkpoint DIR/iter_N (every rank calls) + this rank's RNG state; DIR/latest names it."""
    import torch
    import torch.distributed as dist

    tag = checkpoint_tag(iteration)
    client_state = {"iteration": iteration, "consumed_samples": consumed_samples,
                    "args": {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list))
                             or v is None}}
    engine.save_checkpoint(args.save, tag=tag, client_state=client_state)
    torch.save(_rng_state(), os.path.join(args.save, tag, f"rng_state_rank{dist.get_rank()}.pt"))
    dist.barrier()


def load_checkpoint(engine: Any, args: argparse.Namespace) -> tuple[int, int]:
    """(iteration, consumed_samples) of the newest checkpoint in --load, or (0, 0) when there is none."""
    import torch
    import torch.distributed as dist

    if not args.load or not os.path.isfile(os.path.join(args.load, "latest")):
        if args.load:
            _print0(f"[mile-pretrain-ds] no checkpoint in --load {args.load} (no 'latest' file): starting from scratch")
        return 0, 0
    path, client_state = engine.load_checkpoint(args.load, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None or client_state is None or "iteration" not in client_state:
        raise UsageError(f"--load {args.load}: DeepSpeed could not load its newest checkpoint (see the log above)")
    iteration, consumed = int(client_state["iteration"]), int(client_state["consumed_samples"])
    tag = Path(path).parent.name
    rng_path = os.path.join(args.load, tag, f"rng_state_rank{dist.get_rank()}.pt")
    if os.path.isfile(rng_path):
        _set_rng_state(torch.load(rng_path, weights_only=False))
    saved = client_state.get("args", {})
    if saved.get("global_batch_size") not in (None, args.global_batch_size):
        _print0(f"[mile-pretrain-ds] note: the checkpoint was trained with --global-batch-size "
                f"{saved['global_batch_size']}; continuing with {args.global_batch_size} from sample {consumed}")
    _print0(f"[mile-pretrain-ds] resumed {path}: iteration {iteration}, consumed samples {consumed}")
    return iteration, consumed


def export_hf(engine: Any, args: argparse.Namespace, iteration: int, write_tokenizer: Any) -> None:
    """Rank 0: consolidate the checkpoint of `iteration` with DeepSpeed's zero_to_fp32 and save_pretrained it."""
    import torch
    import torch.distributed as dist

    if dist.get_rank() == 0:
        directory = Path(args.export_hf)
        problem = export_dir_problem(directory)
        if problem:
            raise UsageError(problem)
        tag = checkpoint_tag(iteration)
        if engine.zero_optimization_stage() == 0:
            # No ZeRO partitions to merge: every rank holds the whole model (bf16 runs: the bf16 weights).
            state = {name: tensor.detach().float().cpu() for name, tensor in engine.module.state_dict().items()}
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(args.save, tag=tag)
        dtype = torch.float32 if args.export_dtype == "fp32" else torch.bfloat16
        _write_hf_model(engine.module.config, state, dtype, directory)
        if write_tokenizer is not None:
            write_tokenizer(directory)
        files = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()
                       and p.name != EXPORT_MARKER)
        (directory / EXPORT_MARKER).write_text(json.dumps({
            "written_by": "mile-pretrain-ds", "checkpoint": os.path.join(os.path.abspath(args.save), tag),
            "iteration": iteration, "dtype": args.export_dtype, "files": files}, indent=1) + "\n")
        _print0(f"[mile-pretrain-ds] exported {os.path.join(args.save, tag)} as a Hugging Face model to {directory}")
    dist.barrier()


def _write_hf_model(config: Any, state: dict[str, Any], dtype: Any, directory: Path) -> None:
    import copy

    import torch
    from transformers import LlamaForCausalLM

    config = copy.deepcopy(config)
    config.dtype = dtype
    config.use_cache = True
    state = {name: tensor.to(dtype) for name, tensor in state.items()}
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / EXPORT_MARKER
    if marker.is_file():  # an earlier export of ours: replace its files
        for name in json.loads(marker.read_text()).get("files", []):
            (directory / name).unlink(missing_ok=True)
    model.save_pretrained(str(directory), state_dict=state)


# ----------------------------------------------------------------------------------------------
# Training.
def _print0(text: str) -> None:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(text, flush=True)


class _Dump:
    """Test-only records (MILE_MEGATRON_TEST_DS_DUMP_DIR); inactive unless the variable is set."""

    def __init__(self, rank: int) -> None:
        self.directory = os.environ.get(DUMP_ENV_VAR)
        self.rank = rank
        self.fixed_batch: Any = None  # the dataset's first micro-batch (the same in every run and on resume)

    def micro_batch(self, micro: int, batch: dict, logits: Any, stats: Any, **extra: Any) -> Any:
        """Returns a function to call after backward (it writes the record with the logits' gradient)."""
        if not self.directory:
            return lambda: None
        import torch

        gradient: list = []
        logits.register_hook(lambda grad: gradient.append(grad.detach().clone()))

        def write() -> None:
            record = {key: value.detach().clone() for key, value in batch.items()}
            record.update(logits=logits.detach().clone(), logits_grad=gradient[0] if gradient else None,
                          **{field: value.detach().clone() for field, value in stats._asdict().items()}, **extra)
            os.makedirs(self.directory, exist_ok=True)
            torch.save(record, os.path.join(self.directory, f"step1_rank{self.rank}_micro{micro}.pt"))

        return write

    def final(self, engine: Any, device: Any) -> None:
        if not self.directory or self.fixed_batch is None:
            return
        import torch

        engine.eval()
        with torch.no_grad():
            tokens = self.fixed_batch["tokens"].to(device)
            logits = engine(input_ids=tokens, position_ids=self.fixed_batch["position_ids"].to(device),
                            use_cache=False).logits
        engine.train()
        os.makedirs(self.directory, exist_ok=True)
        torch.save({"tokens": tokens.cpu(), "position_ids": self.fixed_batch["position_ids"],
                    "logits": logits.float().cpu()}, os.path.join(self.directory, f"final_rank{self.rank}.pt"))


def scale_gradients(engine: Any, factor: float) -> None:
    """Multiply the step's accumulated (reduced) gradients by `factor`, through DeepSpeed's public gradient API
    (deepspeed.utils), after the accumulation boundary's backward and before engine.step() (so clipping and the
    update see the scaled gradients). ZeRO-3: each rank's own gradient partitions (no communication). ZeRO 0-2:
    safe_update_full_grad_vectorized, which reads each partitioned fp32 gradient whole (one all-reduce of the
    gradients per step for ZeRO-1/2 and bf16; local for fp32 ZeRO-0)."""
    from deepspeed.utils import safe_get_local_grad, safe_set_local_grad, safe_update_full_grad_vectorized

    parameters = [p for p in engine.module.parameters() if p.requires_grad]
    if engine.zero_optimization_partition_weights():
        for parameter in parameters:
            safe_set_local_grad(parameter, safe_get_local_grad(parameter) * factor)
    else:
        safe_update_full_grad_vectorized(parameters, lambda grad, _: grad * factor)


def train_step(engine: Any, step_batches: list[dict], args: argparse.Namespace, device: Any, dp_group: Any,
               iteration: int, dump: _Dump | None) -> Any:
    """One optimizer step over this rank's micro-batches; returns [ce, numerator, entropy, alpha x tokens, tokens,
    denominator] summed over the step's micro-batches and the data-parallel group (float64, on the CPU).

    The objective is the step loss of mile_megatron.loss (module docstring): each micro-batch back-propagates
    c * numerator with c = dp_size / N (N: the step's counted tokens, known before the first backward; DeepSpeed's
    data-parallel average divides by dp_size), with DeepSpeed's 1/gas scaling off. After the last forward one
    all-reduce gives the step's sums (every rank then sees the same finite/non-finite verdict). With alpha
    "global" the denominator sum(w * mask) is known only then: with one micro-batch per step c becomes
    dp_size / sum(w * mask) before the only backward; with accumulation the gradients are scaled by
    N / sum(w * mask) before engine.step() (scale_gradients)."""
    import torch
    import torch.distributed as dist

    from mile_megatron.hf.loss import causal_lm_loss_terms

    dp_size = dist.get_world_size()
    # N: counted tokens of the global batch, known before the first backward.
    total_tokens = torch.stack([b["loss_mask"].sum() for b in step_batches]).sum().double().to(device)
    if dp_size > 1:
        dist.all_reduce(total_tokens, group=dp_group)
    coefficient = dp_size / torch.clamp(total_tokens, min=1.0)
    rescale = args.mile_alpha == "global" and args.loss != "ce"  # denominator sum(w * mask) != N
    sums = torch.zeros(6, dtype=torch.float64, device=device)
    for micro, batch in enumerate(step_batches):
        last = micro == len(step_batches) - 1
        logits = engine(input_ids=batch["tokens"].to(device), position_ids=batch["position_ids"].to(device),
                        use_cache=False).logits
        terms = causal_lm_loss_terms(logits, batch["labels"].to(device), kind=args.loss, gamma=args.mile_gamma,
                                     sigma=args.mile_sigma, alpha=args.mile_alpha, dp_group=dp_group, shift=False,
                                     loss_mask=batch["loss_mask"].to(device))
        tokens = terms.num_tokens.detach().double()
        sums += torch.stack([terms.ce_sum.detach().double(), terms.numerator.detach().double(),
                             terms.entropy_sum.detach().double(), terms.alpha.detach().double() * tokens, tokens,
                             terms.denominator.detach().double()])
        if last:
            if dp_size > 1:
                dist.all_reduce(sums, group=dp_group)
            if not bool(torch.isfinite(sums).all()):  # the same verdict on every rank: all stop, none hangs
                raise RuntimeError(f"non-finite loss at iteration {iteration + 1} on rank {dist.get_rank()} (the "
                                   f"step's sums over all {dp_size} data-parallel ranks: {sums.tolist()}); "
                                   "stopping before the update")
            if rescale and len(step_batches) == 1:
                coefficient, rescale = dp_size / torch.clamp(sums[5], min=1e-30), False
        after_backward = (dump.micro_batch(micro, batch, logits, terms, total_tokens=total_tokens, dp_size=dp_size,
                                           accumulation=len(step_batches), coefficient=coefficient)
                          if dump else lambda: None)
        engine.backward(terms.numerator * coefficient.to(terms.numerator.dtype), scale_wrt_gas=False)
        after_backward()
        if last and rescale:
            scale_gradients(engine, float(sums[4] / torch.clamp(sums[5], min=1e-30)))
        engine.step()
    return sums.cpu()


def train(args: argparse.Namespace) -> None:
    device = init_distributed(args.cpu)
    import deepspeed
    import torch
    import torch.distributed as dist

    from mile_megatron.hf import data

    _quiet_deepspeed()
    rank, dp_size = dist.get_rank(), dist.get_world_size()
    if args.precision is None:
        args.precision = "bf16" if args.preset_bf16 and not args.cpu else "fp32"
    config = deepspeed_config(args, dp_size)
    accumulation = config["gradient_accumulation_steps"]
    if args.cpu:
        optimizer_name = "torch AdamW"
    elif config["optimizer"]["params"].get("torch_adam") or not fused_adam_available():
        # DeepSpeed's own switch to torch.optim.AdamW (same update; FusedAdam would need nvcc to build).
        config["optimizer"]["params"]["torch_adam"] = True
        optimizer_name = "torch AdamW (DeepSpeed's torch_adam: FusedAdam is not prebuilt and nvcc is missing)"
    else:
        optimizer_name = "DeepSpeed FusedAdam (AdamW)"
    write_tokenizer = tokenizer_writer(args) if args.export_hf and rank == 0 else None

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer(args)
    model = build_model(args, tokenizer, device)
    groups = parameter_groups(model, args.weight_decay)
    parameters = sum(p.numel() for p in model.parameters())

    def schedule(step: int) -> float:
        value = learning_rate(step, lr=args.lr, min_lr=args.min_lr, warmup=args.lr_warmup_iters,
                              total=args.train_iters)
        return value / args.lr if args.lr > 0 else 0.0

    def make_scheduler(optimizer: Any) -> Any:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    if args.cpu:
        optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                                      eps=args.adam_eps, weight_decay=args.weight_decay)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                               lr_scheduler=make_scheduler(optimizer), config=config)
    else:
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, lr_scheduler=make_scheduler,
                                               config=config)
    if args.save and rank == 0:
        os.makedirs(args.save, exist_ok=True)
        Path(args.save, "deepspeed_config.json").write_text(json.dumps(config, indent=1) + "\n")
    if args.loss_log and rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.loss_log)), exist_ok=True)

    _print0(f"[mile-pretrain-ds] {dp_size} data-parallel process(es) on {device.type}, ZeRO stage "
            f"{engine.zero_optimization_stage()}, {args.precision}, micro batch {args.micro_batch_size} x "
            f"accumulation {accumulation} x {dp_size} = global batch {args.global_batch_size} sequences of "
            f"{args.seq_length}; loss {args.loss} (gamma {args.mile_gamma}, sigma {args.mile_sigma}, alpha "
            f"{args.mile_alpha}); optimizer {optimizer_name}"
            f"; {parameters / 1e6:.2f}M parameters")

    if (args.mile_alpha == "global" and args.loss != "ce" and accumulation > 1
            and (engine.zero_optimization_stage() in (1, 2) or args.precision == "bf16")
            and not engine.zero_optimization_partition_weights()):
        _print0("[mile-pretrain-ds] note: --mile-alpha global with gradient accumulation divides the step's "
                "gradients by sum(w * mask) through DeepSpeed's public gradient API: one extra all-reduce of the "
                "gradients per step with this ZeRO stage (none with ZeRO-3 or one micro-batch per step)")
    iteration, consumed_samples = load_checkpoint(engine, args)
    dump = _Dump(rank)
    if iteration < args.train_iters:
        dataset = build_train_dataset(args, tokenizer)
        batches = data.micro_batches(dataset, consumed_samples=consumed_samples,
                                     micro_batch_size=args.micro_batch_size, dp_rank=rank, dp_size=dp_size)
        if dump.directory:
            dump.fixed_batch = next(data.micro_batches(dataset, consumed_samples=0,
                                                       micro_batch_size=args.micro_batch_size))
        engine.train()
        first_iteration = iteration
        dp_group = dist.group.WORLD if dp_size > 1 else None
        while iteration < args.train_iters:
            started = time.perf_counter()
            lr = float(engine.get_lr()[0])  # what this step's update uses (the schedule, restored on resume)
            step_batches = [next(batches) for _ in range(accumulation)]
            sums = train_step(engine, step_batches, args, device, dp_group, iteration,
                              dump if iteration == first_iteration else None)
            iteration += 1
            consumed_samples += args.global_batch_size
            seconds = time.perf_counter() - started
            count = max(float(sums[4]), 1.0)
            grad_norm = engine.get_global_grad_norm()
            alpha = float(sums[4] / sums[5]) if args.mile_alpha == "global" and sums[5] > 0 else float(sums[3]) / count
            record = {
                "iteration": iteration, "consumed_samples": consumed_samples, "lr": lr,
                "ce": float(sums[0]) / count, "loss": float(sums[1] / sums[5]) if sums[5] > 0 else 0.0,
                "entropy": float(sums[2]) / count, "alpha": alpha, "tokens": int(sums[4]),
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "step_seconds": seconds, "tokens_per_second": args.global_batch_size * args.seq_length / seconds,
            }
            if rank == 0 and args.loss_log:
                append_json_line(args.loss_log, record)
            if iteration % args.log_interval == 0 or iteration == args.train_iters:
                _print0(f"[mile-pretrain-ds] iteration {iteration}/{args.train_iters} | consumed samples "
                        f"{consumed_samples} | lr {lr:.3E} | ce {record['ce']:.6f} | loss {record['loss']:.6f} | "
                        f"entropy {record['entropy']:.6f} | alpha {record['alpha']:.6f} | grad norm "
                        + ("n/a" if grad_norm is None else f"{float(grad_norm):.4f}")
                        + f" | tokens/s {record['tokens_per_second']:.1f}")
            if args.save and (iteration % args.save_interval == 0 or iteration == args.train_iters):
                save_checkpoint(engine, args, iteration, consumed_samples)
        dump.final(engine, device)
    elif args.save and not os.path.isdir(os.path.join(args.save, checkpoint_tag(iteration))):
        save_checkpoint(engine, args, iteration, consumed_samples)
    if args.export_hf:
        export_hf(engine, args, iteration, write_tokenizer)


def run(argv: Sequence[str]) -> None:
    args = parse_args(argv)
    check_args(args)
    train(args)


def main(argv: Sequence[str] | None = None) -> None:
    """Console script `mile-pretrain-ds` / `python -m mile_megatron.hf.pretrain_ds`."""
    try:
        run(sys.argv[1:] if argv is None else argv)
    except UsageError as error:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"mile-pretrain-ds: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
