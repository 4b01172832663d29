"""The DeepSpeed side of mile-pretrain-ds: its config, the optimizer's parameter groups and the LR schedule.

The packaged ZeRO configs (configs/zero{0,1,2,3}.json; stage 2 is the paper's) or a user's --deepspeed-config,
with batch sizes, clipping, precision and optimizer values filled from the command line (the command line owns
them: a config value that contradicts a flag is refused by name). The learning rate follows Megatron's schedule
(linear warmup from 0, cosine decay to min_lr), so both engines step identically.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from mile_megatron.utils.errors import UsageError

ZERO_STAGES = (0, 1, 2, 3)
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
AUTO = "auto"


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
    """The packaged ZeRO config of `stage` (configs/zero{stage}.json)."""
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
