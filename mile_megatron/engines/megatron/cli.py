"""`mile-pretrain`: Megatron GPT pretraining with the MiLe loss (or the focal / cross-entropy baselines).

    mile-pretrain [--preset {tiny,468m,1.2b,6.7b}] [--cpu] [--loss {ce,focal,mile}]
                  [--mile-gamma G] [--mile-sigma S] [--mile-alpha {global,official,none}]
                  [--mile-loss-log PATH] [--peak-tflops-per-device T] <any Megatron flag>...

Runs megatron.training's own `pretrain` loop (0.19 call sequence: parse_and_validate_args ->
gpt_config_from_args -> pretrain_cfg_container_from_args -> pretrain) on a LLaMA-architecture GPTModel built by
Megatron's GPT model builder (model.py), with Megatron's datasets and batch helpers (batch.py) and the MiLe step
objective (loss_func.py). Logged every step through Megatron's own logging (stdout, TensorBoard, W&B):
`lm loss` (plain CE, comparable across losses), `mile loss` (the optimised loss), `entropy`, `alpha`,
`tokens/s` and `MFU` (metrics.py), beside Megatron's own throughput (--log-throughput).

run(argv, hooks=..., forward_step=...) is the programmatic entry: hooks (loss_func.ForwardHooks) reach every
forward step; forward_step replaces loss_func.forward_step altogether (benchmarks compare Megatron's own loss).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from functools import partial

from mile_megatron.recipes import LLAMA_ARCHITECTURE_FLAGS, PRESET_NAMES, preset_flags
from mile_megatron.utils.errors import UsageError

from .loss_func import ForwardHooks, add_megatron_loss_arguments
from .loss_func import forward_step as default_forward_step
from .metrics import add_metrics_arguments

PROGRAM = "mile-pretrain"
# The megatron-core releases this engine uses the public seams of (GPTModel's output_processor, a
# finalize_model_grads_func kept by the training loop, the batch helpers); the tested pin: tools/constraints.txt.
SUPPORTED_MEGATRON_CORE = ((0, 19), (0, 20))  # >= 0.19, < 0.20
SUPPORTED_RANGE_TEXT = ">=0.19,<0.20"


def check_megatron_core_version(version: str | None = None) -> None:
    """UsageError naming the supported range when the installed megatron-core is outside it."""
    import importlib.metadata

    if version is None:
        try:
            version = importlib.metadata.version("megatron-core")
        except importlib.metadata.PackageNotFoundError:
            raise UsageError(f"megatron-core is not installed; install megatron-core{SUPPORTED_RANGE_TEXT}") from None
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    low, high = SUPPORTED_MEGATRON_CORE
    if not low <= tuple(parts) < high:
        raise UsageError(f"megatron-core {version} is installed; mile-pretrain supports megatron-core"
                         f"{SUPPORTED_RANGE_TEXT} (tested: tools/constraints.txt)")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron extra_args_provider of mile-pretrain: the loss flags, --mile-loss-log, --peak-tflops-per-device."""
    return add_metrics_arguments(add_megatron_loss_arguments(parser))


def _split_entry_point_flags(argv: Sequence[str]) -> tuple[str | None, bool, list[str]]:
    """Remove --preset NAME / --preset=NAME and --cpu from argv (they are not Megatron flags)."""
    preset, cpu, rest = None, False, []
    items = list(argv)
    index = 0
    while index < len(items):
        item = items[index]
        if item == "--cpu":
            cpu = True
        elif item == "--preset":
            if index + 1 >= len(items):
                raise UsageError(f"--preset needs a value: one of {', '.join(PRESET_NAMES)}")
            preset = items[index + 1]
            index += 1
        elif item.startswith("--preset="):
            preset = item.split("=", 1)[1]
        else:
            rest.append(item)
        index += 1
    if preset is not None and preset not in PRESET_NAMES:
        raise UsageError(f"unknown --preset {preset!r}; choose one of {', '.join(PRESET_NAMES)}")
    return preset, cpu, rest


def _have_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _transformer_engine_available() -> bool:
    if not _have_module("transformer_engine"):
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def _fused_kernels_available() -> bool:
    """TransformerEngine or apex: what Megatron needs for SP norms and the fused optimizer."""
    return _transformer_engine_available() or _have_module("apex")


def build_megatron_argv(user_argv: Sequence[str], preset: str | None, cpu: bool) -> list[str]:
    """LLaMA architecture, CPU flags, implementation default, preset, then the user's flags."""
    from mile_megatron.utils import cpu_mode

    argv = list(LLAMA_ARCHITECTURE_FLAGS)
    if cpu:
        argv += list(cpu_mode.CPU_MEGATRON_FLAGS)
    elif not _transformer_engine_available():
        # Megatron's GPU defaults assume fused kernels from TE / apex; without them, turn those fusions off.
        argv += ["--transformer-impl", "local", "--no-rope-fusion"]
        if not _have_module("fused_weight_gradient_mlp_cuda"):
            argv += ["--no-gradient-accumulation-fusion"]
        if not _have_module("scaled_masked_softmax_cuda"):
            argv += ["--no-masked-softmax-fusion"]
    if preset is not None:
        argv += preset_flags(preset)
    argv += ["--calculate-per-token-loss"]
    return argv + list(user_argv)


def _has_checkpoint(load_dir: str | None) -> bool:
    return bool(load_dir) and os.path.isfile(os.path.join(load_dir, "latest_checkpointed_iteration.txt"))


def check_supported(args: argparse.Namespace, cpu: bool) -> None:
    """Refuse combinations that cannot work, with the reason and the fix."""
    from mile_megatron.data.gpt_dataset import unsupported_data_settings
    from mile_megatron.utils import cpu_mode

    problems: list[str] = []
    fused = _fused_kernels_available()
    if cpu:
        try:
            cpu_mode.check_megatron_args(args)
        except cpu_mode.CpuModeError as error:
            problems.append(str(error))
    if args.sequence_parallel and not fused and not cpu:
        problems.append("--sequence-parallel needs TransformerEngine or apex (their norms keep the "
                        "sequence-parallel gradient reduction); install one or drop --sequence-parallel")
    if getattr(args, "num_experts", None):
        problems.append("MoE (--num-experts) is not supported: the MiLe loss path has no router aux loss")
    if getattr(args, "mtp_num_layers", None):
        problems.append("multi-token prediction (--mtp-num-layers) is not supported by mile-pretrain")
    if getattr(args, "overlap_moe_expert_parallel_comm", False):
        problems.append("--overlap-moe-expert-parallel-comm (MoE schedule plans) is not supported")
    if getattr(args, "mile_fused_output_layer", False) and getattr(args, "use_mup", False):
        problems.append("--use-mup scales the logits, which the fused output layer never forms; add "
                        "--no-mile-fused-output-layer")
    if not getattr(args, "calculate_per_token_loss", True):
        problems.append("the MiLe loss needs --calculate-per-token-loss")
    problems += unsupported_data_settings(args)
    if (args.use_distributed_optimizer and not fused and not args.no_load_optim
            and (_has_checkpoint(args.load) or _has_checkpoint(getattr(args, "pretrained_checkpoint", None)))):
        problems.append(
            "reloading the distributed optimizer state (--use-distributed-optimizer with --load of an "
            "existing checkpoint) fails in megatron-core 0.19 on the plain-PyTorch optimizer used "
            "without TransformerEngine or apex. Either install TransformerEngine or apex, resume "
            "without --use-distributed-optimizer (save with it off), or add --no-load-optim to "
            "load the weights and restart the optimizer state"
        )
    if args.context_parallel_size > 1 and not _transformer_engine_available():
        problems.append("--context-parallel-size > 1 needs TransformerEngine attention")
    if problems:
        raise UsageError("cannot run this configuration:\n  - " + "\n  - ".join(problems))


def _parse_megatron_args(megatron_argv: list[str], cpu: bool) -> argparse.Namespace:
    from megatron.training.arguments import parse_and_validate_args, parse_args

    program = sys.argv[0] if sys.argv else PROGRAM
    sys.argv = [program] + megatron_argv
    check_supported(parse_args(add_arguments), cpu)
    try:
        return parse_and_validate_args(extra_args_provider=add_arguments)
    except AssertionError as error:
        import traceback

        # Megatron's asserts often carry no message: name the failing check itself
        detail = str(error) or (traceback.extract_tb(error.__traceback__)[-1].line or "an assertion")
        raise UsageError(f"Megatron rejected the arguments: {detail}") from error


def print_help() -> None:
    """Help for every flag: ours and Megatron's (some Megatron help texts hold a bare '%', which argparse's
    formatter rejects; those are escaped here)."""
    from megatron.training.arguments import add_megatron_arguments

    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                     allow_abbrev=False)
    ours = parser.add_argument_group(PROGRAM)
    ours.add_argument("--preset", choices=PRESET_NAMES, help="paper recipe (flags inserted before yours)")
    ours.add_argument("--cpu", action="store_true", help="CPU mode: gloo, local layers (or MILE_MEGATRON_CPU=1)")
    add_arguments(add_megatron_arguments(parser))
    for action in parser._actions:
        if action.help:
            try:
                action.help % dict(vars(action), prog=parser.prog)
            except (ValueError, TypeError, KeyError):
                action.help = action.help.replace("%", "%%")
    parser.print_help()


def run(argv: Sequence[str], *, hooks: ForwardHooks | None = None, forward_step: Callable | None = None) -> None:
    """Train as the command line says; hooks reach every forward step (forward_step: another forward step)."""
    from mile_megatron.utils import cpu_mode

    if any(item in ("-h", "--help") for item in argv):
        print_help()
        return
    check_megatron_core_version()
    preset, cpu_flag, user_argv = _split_entry_point_flags(argv)
    cpu = cpu_flag or cpu_mode.cpu_mode_requested()
    if cpu:
        cpu_mode.activate()
    args = _parse_megatron_args(build_megatron_argv(user_argv, preset, cpu), cpu)

    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    from .batch import train_valid_test_datasets_provider
    from .model import gpt_model_config

    if args.mile_loss_log:
        os.makedirs(os.path.dirname(os.path.abspath(args.mile_loss_log)), exist_ok=True)
    config_container = pretrain_cfg_container_from_args(args, gpt_model_config(args))
    pretrain(config_container, train_valid_test_datasets_provider, ModelType.encoder_or_decoder,
             forward_step or partial(default_forward_step, hooks=hooks))


def main(argv: Sequence[str] | None = None, *, hooks: ForwardHooks | None = None,
         forward_step: Callable | None = None) -> None:
    """Console script `mile-pretrain` / `python -m mile_megatron.engines.megatron`."""
    import torch

    from mile_megatron.utils import cpu_mode

    try:
        run(sys.argv[1:] if argv is None else argv, hooks=hooks, forward_step=forward_step)
    except (UsageError, cpu_mode.CpuModeError) as error:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{PROGRAM}: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
