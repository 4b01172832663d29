"""Megatron GPT pretraining with the MiLe loss (or the focal / cross-entropy baselines).

    mile-pretrain [--preset {tiny,468m,1.2b,6.7b}] [--cpu] [--loss {ce,focal,mile}]
                  [--mile-gamma G] [--mile-sigma S] [--mile-alpha {global,official,none}]
                  [--mile-loss-log PATH] [--peak-tflops-per-device T] <any Megatron flag>...

Runs megatron.training's own `pretrain` loop (0.19 call sequence: parse_and_validate_args ->
pretrain_cfg_container_from_args -> pretrain) on a LLaMA-architecture GPTModel. Through GPTModel's
output_processor the model returns its vocab-parallel logits [b, s, V_pad/tp] (a view of the output
layer's [s, b, V_pad/tp], in the model's dtype: no copy) and the loss comes from
mile_megatron.loss.mile_loss_terms. The optimised loss of a step is exact over the global batch:

    L = sum(alpha * w * CE * mask) / sum(w * mask)    (--mile-alpha global; denominator sum(mask) otherwise)

over every counted token of every micro-batch and data-parallel x context-parallel rank. Each micro-batch
back-propagates its numerator (Megatron's --calculate-per-token-loss, always on) and StepNormalization, the
model config's finalize_model_grads_func, divides the step's gradients once by the global denominator,
reduced where Megatron reduces its token count: no data-parallel collective in the forward.

Logged every step through Megatron's own logging (stdout, TensorBoard, W&B): `lm loss` (plain CE,
comparable across losses), `mile loss` (the optimised loss), `entropy` (mean predictive entropy),
`alpha`; plus tokens/s and model FLOPs utilisation (MFU needs a known peak: a recognised GPU
or --peak-tflops-per-device).

Test-only environment variables (never set them in real runs):
  MILE_MEGATRON_TEST_NONFINITE_ITERATION=K  sets one logit of every training micro-batch of
      iteration K to NaN, to check that Megatron's NaN checks stop the run.
  MILE_MEGATRON_TEST_HOLD_ITERATION=K  after logging the first micro-batch of training iteration K,
      the process waits until it is killed (the kill-and-relaunch test kills a worker there).
  MILE_MEGATRON_TEST_DUMP_DIR=DIR  every rank holding logits saves its first training micro-batch to
      DIR/rank{R}.pt (R = global rank) once the backward pass has reached the logits: tokens, labels,
      loss_mask, this rank's vocab-parallel logits, loss_sum, num_tokens, alpha (the report entry
      [alpha x tokens, tokens]), logits_grad (d loss_sum / d logits, the gradient Megatron
      back-propagates) and the TP / DP ranks and sizes (tests/test_cross_engine.py compares them with
      the Hugging Face model).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import sys
import time
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and megatron are imported lazily: CPU mode must act before megatron loads,
    import torch    # and checkpoint writers spawn processes that re-import this module.

from mile_megatron.presets import LLAMA_ARCHITECTURE_FLAGS, PRESET_NAMES, preset_flags

LOSS_CHOICES = ("ce", "focal", "mile")
ALPHA_CHOICES = ("global", "official", "none")
SPIKY_LOSS_FACTOR = 10  # as upstream pretrain_gpt.py: a loss 10x the largest seen so far is a spike
NONFINITE_TEST_ENV_VAR = "MILE_MEGATRON_TEST_NONFINITE_ITERATION"
HOLD_TEST_ENV_VAR = "MILE_MEGATRON_TEST_HOLD_ITERATION"
DUMP_TEST_ENV_VAR = "MILE_MEGATRON_TEST_DUMP_DIR"

# Peak dense bf16 tensor-core TFLOP/s per device, for MFU (matched against the device name).
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H200": 989.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0, "B100": 1750.0,
    "A100": 312.0, "A800": 312.0, "L40S": 362.0, "A10": 125.0,
}


class UsageError(Exception):
    """A combination of settings that cannot work; the message says what to do."""


# ----------------------------------------------------------------------------------------------
# Arguments.
def non_negative_float(text: str) -> float:
    """argparse type: a number >= 0."""
    value = float(text)
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text}")
    return value


def add_loss_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron extra_args_provider: the loss flags (--loss, --mile-*)."""
    group = parser.add_argument_group("MiLe loss")
    group.add_argument("--loss", choices=LOSS_CHOICES, default="mile",
                       help="training loss: MiLe (entropy-weighted CE), focal, or plain CE")
    group.add_argument("--mile-gamma", type=non_negative_float, default=1.0,
                       help="exponent gamma of the loss weight (MiLe: (sigma+H)^gamma; focal: (1-p)^gamma)")
    group.add_argument("--mile-sigma", type=non_negative_float, default=1.0,
                       help="MiLe weight offset sigma in (sigma + H)^gamma")
    group.add_argument("--mile-alpha", choices=ALPHA_CHOICES, default="global",
                       help="weight normalisation: global (token-weighted over DP), official (paper code), none")
    group.add_argument("--mile-loss-log", type=str, default=None, metavar="PATH",
                       help="append one JSON line per micro-batch (last pipeline stage, TP rank 0)")
    return parser


def _add_entry_point_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_loss_arguments(parser)
    parser.add_argument("--peak-tflops-per-device", type=float, default=None,
                        help="peak TFLOP/s of one device for MFU (default: known GPUs in bf16)")
    return parser


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
    from mile_megatron import cpu_mode

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
    from mile_megatron import cpu_mode

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


# ----------------------------------------------------------------------------------------------
# Model.
def vocab_parallel_logits(*, hidden_states: torch.Tensor, output_layer: Any, output_weight: torch.Tensor | None,
                          runtime_gather_output: bool | None = None, scale_logits: Any = None,
                          **_: Any) -> torch.Tensor:
    """GPTModel output_processor: this TP rank's vocab-parallel logits [s, b, V_pad/tp] as a [b, s, V_pad/tp] view.

    GPTModel itself would return the labels' per-token CE, or (without labels) a contiguous [b, s, V] copy of the
    logits; the loss here reads the output layer's own tensor (no copy) and computes the loss from it.
    """
    logits, _ = output_layer(hidden_states, weight=output_weight, runtime_gather_output=runtime_gather_output)
    if scale_logits is not None:
        logits = scale_logits(logits)  # MuP output multiplier (identity unless --use-mup)
    return logits.transpose(0, 1)


def model_forward_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for `model(tokens, position_ids, attention_mask, labels=..., **kwargs)` so that it returns
    the vocab-parallel logits in the model's dtype: the output processor above and, with --bf16 / --fp16,
    fp32_output=False (Megatron's Float16Module would otherwise return an fp32 copy; the loss computes in fp32
    internally and rounds the gradient once to the logits' dtype)."""
    kwargs: dict[str, Any] = {"output_processor": vocab_parallel_logits}
    if args.fp16 or args.bf16:
        kwargs["fp32_output"] = False
    return kwargs


class StepNormalization:
    """Megatron `finalize_model_grads_func` dividing the step's summed gradients by the step's loss denominator.

    Each training micro-batch back-propagates the numerator of mile_megatron.loss.MileLossTerms and its loss
    function adds the denominator here (last pipeline stage; no collective). At the end of the step Megatron's own
    finalize_model_grads runs without its token scaling, then the summed denominator is broadcast from the last
    pipeline stage and all-reduced over the data x context parallel ranks (the collectives and groups Megatron uses
    for --calculate-per-token-loss) and the gradients are scaled once by 1 / sum: one float64 scalar in place of
    Megatron's int token count (for alpha "global" the denominator sum(w * mask) is not an integer).
    A step whose loss function added nothing (another loss, e.g. knowledge distillation in the patched upstream
    script) is divided by Megatron's own token count, exactly as finalize_model_grads does.
    """

    def __init__(self, finalize: Any = None) -> None:
        self.finalize = finalize  # the hook it replaces (None: megatron.core's finalize_model_grads)
        self.pending: torch.Tensor | None = None

    def add(self, denominator: torch.Tensor) -> None:
        value = denominator.detach().double()
        self.pending = value if self.pending is None else self.pending + value

    def __call__(self, model: list, num_tokens: torch.Tensor | None = None, *args: Any, pg_collection: Any = None,
                 **kwargs: Any) -> None:
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.pipeline_parallel.utils import get_pp_last_rank

        finalize = self.finalize or finalize_model_grads
        total, self.pending = self.pending, None
        if num_tokens is None:  # Megatron averages per micro-batch itself (mile_loss_func refuses this setting)
            if total is not None:
                raise UsageError("the MiLe loss needs --calculate-per-token-loss (it normalises over the whole step)")
            return finalize(model, None, *args, pg_collection=pg_collection, **kwargs)
        finalize(model, None, *args, pg_collection=pg_collection, **kwargs)
        if total is None:  # Megatron's count: another loss on the last stage, or 0 before the broadcast elsewhere
            total = num_tokens.double()
        if pg_collection is not None:
            pp_group = pg_collection.pp
            dp_cp_group = getattr(pg_collection, "dp_cp_gtp_remat", None) or pg_collection.dp_cp
        else:
            pp_group = parallel_state.get_pipeline_model_parallel_group()
            dp_cp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        dist.broadcast(total, src=get_pp_last_rank(pp_group), group=pp_group)
        dist.all_reduce(total, group=dp_cp_group)
        scale = torch.where(total > 0, 1.0 / total, torch.ones_like(total)).float()
        for chunk in model:
            chunk.scale_gradients(scale)


_step_normalization: StepNormalization | None = None


def install_step_normalization(config: Any) -> StepNormalization:
    """Make `config.finalize_model_grads_func` (a TransformerConfig, or a GPTModelConfig that forwards to one) the
    process's StepNormalization, wrapping a hook already installed there. One instance per process, shared by
    every model chunk (virtual pipeline stages), so denominators added on one chunk reach the step's finalize."""
    global _step_normalization
    current = config.finalize_model_grads_func
    if isinstance(current, StepNormalization):
        return current
    if _step_normalization is None:
        _step_normalization = StepNormalization(current)
    config.finalize_model_grads_func = _step_normalization
    return _step_normalization


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None,
                   config: Any = None, pg_collection: Any = None) -> torch.nn.Module:
    """A LLaMA-architecture GPTModel whose step gradients StepNormalization divides (see forward_step)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.training import get_args
    from megatron.training.argument_utils import core_transformer_config_from_args

    args = get_args()
    if config is None:
        config = core_transformer_config_from_args(args)
    install_step_normalization(config)
    if args.transformer_impl == "transformer_engine":
        layer_spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        layer_spec = get_gpt_layer_local_spec(normalization=args.normalization)
    kwargs: dict[str, Any] = {}
    if pg_collection is not None:
        kwargs["pg_collection"] = pg_collection
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        fp16_lm_cross_entropy=False,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        vp_stage=vp_stage,
        **kwargs,
    )


# ----------------------------------------------------------------------------------------------
# Data.
def _is_dataset_built_on_rank(vp_stage: int | None = None) -> bool:
    from megatron.core import parallel_state
    from megatron.training.utils import is_first_or_last_pipeline_stage

    return is_first_or_last_pipeline_stage(vp_stage) and parallel_state.get_tensor_model_parallel_rank() == 0


def gpt_dataset_config(args: argparse.Namespace, tokenizer: Any = None, create_attention_mask: bool | None = None) -> Any:
    """megatron-core's GPTDatasetConfig from Megatron arguments (also used by the DeepSpeed entry's data adapter).

    tokenizer None: Megatron's global tokenizer; create_attention_mask None: --create-attention-mask-in-dataloader.
    """
    import dataclasses

    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.training.utils import get_blend_and_blend_per_split

    if tokenizer is None:
        from megatron.training import get_tokenizer

        tokenizer = get_tokenizer()
    if create_attention_mask is None:
        create_attention_mask = args.create_attention_mask_in_dataloader
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    values = {
        "random_seed": args.seed,
        "sequence_length": args.seq_length,
        "blend": blend,
        "blend_per_split": blend_per_split,
        "split": args.split,
        "multiple_validation_sets": args.multiple_validation_sets,
        "full_validation": args.full_validation,
        "num_dataset_builder_threads": args.num_dataset_builder_threads,
        "path_to_cache": args.data_cache_path,
        "mmap_bin_files": args.mmap_bin_files,
        "tokenizer": tokenizer,
        "reset_position_ids": args.reset_position_ids,
        "reset_attention_mask": args.reset_attention_mask,
        "eod_mask_loss": args.eod_mask_loss,
        "create_attention_mask": create_attention_mask,
        "mid_level_dataset_surplus": args.mid_level_dataset_surplus,
        "allow_ambiguous_pad_tokens": getattr(args, "allow_ambiguous_pad_tokens", False),
    }
    known = {field.name for field in dataclasses.fields(GPTDatasetConfig) if field.init}
    return GPTDatasetConfig(**{key: value for key, value in values.items() if key in known})


def train_valid_test_datasets_provider(train_val_test_num_samples: list[int], vp_stage: int | None = None):
    """Megatron indexed datasets (blends, per-split blends, multiple validation sets) or mock data."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset
    from megatron.training import get_args, print_rank_0

    args = get_args()
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    print_rank_0("> building train, validation, and test datasets for GPT ...")
    datasets = BlendedMegatronDatasetBuilder(
        dataset_type, train_val_test_num_samples, partial(_is_dataset_built_on_rank, vp_stage=vp_stage),
        gpt_dataset_config(args),
    ).build()
    print_rank_0("> finished creating GPT datasets ...")
    return datasets


train_valid_test_datasets_provider.is_distributed = True  # type: ignore[attr-defined]


def _causal_mask(seq_length: int, device: torch.device) -> torch.Tensor:
    """[1, 1, s, s] bool, True where attention is masked (future positions)."""
    import torch

    return torch.triu(torch.ones(seq_length, seq_length, dtype=torch.bool, device=device), 1)[None, None]


def get_batch(data_iterator: Any, vp_stage: int | None = None) -> tuple[Any, ...]:
    """tokens, labels, loss_mask, attention_mask, position_ids; TP rank 0 reads and broadcasts."""
    import torch
    from megatron.core import parallel_state, tensor_parallel
    from megatron.training import get_args
    from megatron.training.utils import is_first_or_last_pipeline_stage

    if not is_first_or_last_pipeline_stage(vp_stage):
        return None, None, None, None, None
    args = get_args()
    data = next(data_iterator) if parallel_state.get_tensor_model_parallel_rank() == 0 else None
    integers = tensor_parallel.broadcast_data(["tokens", "labels", "position_ids"], data, torch.int64)
    floats = tensor_parallel.broadcast_data(["loss_mask"], data, torch.float32)
    batch = {
        "tokens": integers["tokens"],
        "labels": integers["labels"],
        "loss_mask": floats["loss_mask"],
        "position_ids": integers["position_ids"],
    }
    if args.create_attention_mask_in_dataloader:
        masks = tensor_parallel.broadcast_data(["attention_mask"], data, torch.bool)
        batch["attention_mask"] = masks["attention_mask"]
    elif args.transformer_impl == "local":
        # The local attention would build a causal mask on "cuda" itself; pass it explicitly.
        batch["attention_mask"] = _causal_mask(batch["tokens"].shape[1], batch["tokens"].device)
    else:
        batch["attention_mask"] = None
    if args.context_parallel_size > 1:
        from megatron.core.utils import get_batch_on_this_cp_rank

        batch = get_batch_on_this_cp_rank(batch, False)
    return (batch["tokens"], batch["labels"], batch["loss_mask"], batch["attention_mask"],
            batch["position_ids"])


# ----------------------------------------------------------------------------------------------
# Loss.
class _LossLog:
    """Per-micro-batch JSON lines; one O_APPEND write per record so ranks never interleave."""

    def __init__(self) -> None:
        self._position: tuple[str, int] | None = None
        self._microbatch = 0

    def write(self, path: str, split: str, iteration: int, record: dict[str, Any]) -> None:
        if self._position != (split, iteration):
            self._position, self._microbatch = (split, iteration), 0
        from mile_megatron.data.fsutil import append_json_line

        append_json_line(path, {"split": split, "iteration": iteration, "microbatch": self._microbatch, **record})
        self._microbatch += 1


_loss_log = _LossLog()


def _inject_nonfinite(logits: torch.Tensor, model: Any, args: argparse.Namespace) -> torch.Tensor:
    """Test-only: NaN in one logit at the training iteration named by the env var."""
    target = os.environ.get(NONFINITE_TEST_ENV_VAR)
    if not target or (model is not None and not model.training):
        return logits
    if args.curr_iteration + 1 != int(target):
        return logits
    corrupted = logits.clone()
    corrupted[(0,) * corrupted.dim()] = float("nan")
    return corrupted


def _step_normalization_of(model: Any) -> StepNormalization:
    from megatron.core.utils import get_model_config

    hook = get_model_config(model).finalize_model_grads_func
    if not isinstance(hook, StepNormalization):
        raise UsageError("the model's config has no StepNormalization as finalize_model_grads_func: call "
                         "mile_megatron.pretrain_gpt.install_step_normalization(config) on the model config before "
                         "training (mile-pretrain and the Megatron-LM patch do)")
    return hook


def mile_loss_func(labels: torch.Tensor, loss_mask: torch.Tensor, output_tensor: torch.Tensor,
                   model: Any = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Megatron loss_func (--calculate-per-token-loss) on GPTModel's vocab-parallel logits, without result checks.

    Returns (numerator, num_tokens, report) of mile_megatron.loss.mile_loss_terms: Megatron back-propagates the
    numerator sum(alpha * w * CE * mask) of each micro-batch, and a training micro-batch adds its denominator
    (sum(w * mask) for --mile-alpha global, else sum(mask)) to the model's StepNormalization, which divides the
    step's gradients by the global sum. No data-parallel collective runs here (except the paper's per-micro-batch
    rule, --mile-alpha official). Report entries [sum, count], summed by Megatron over micro-batches and
    data-parallel ranks and printed as sum / count: 'lm loss' (plain CE), 'mile loss' (the step's optimised
    loss, exactly), 'entropy' (mean predictive entropy), 'alpha' (the step's alpha).
    """
    import torch
    from megatron.core import parallel_state
    from megatron.training import get_args

    from mile_megatron.loss import mile_loss_terms

    args = get_args()
    if not args.calculate_per_token_loss:
        raise UsageError("the MiLe loss needs --calculate-per-token-loss: it normalises the step's gradients once "
                         "over the global batch (mile-pretrain always sets it; add it to the patched script's flags)")
    logits = _inject_nonfinite(output_tensor, model, args)
    terms = mile_loss_terms(logits, labels, loss_mask, kind=args.loss, gamma=args.mile_gamma,
                            sigma=args.mile_sigma, alpha=args.mile_alpha)
    training = model is None or model.training
    if training and model is not None:
        _step_normalization_of(model).add(terms.denominator)
    tokens = terms.num_tokens.detach().float()
    numerator, denominator = terms.numerator.detach().float(), terms.denominator.detach().float()
    if args.mile_alpha == "global":
        alpha = torch.stack([tokens, terms.weight_sum.detach().float()])  # sum(mask) / sum(w * mask)
    else:
        alpha = torch.stack([terms.alpha.detach().float() * tokens, tokens])
    report = {
        "lm loss": torch.stack([terms.ce_sum.detach().float(), tokens]),
        "mile loss": torch.stack([numerator, denominator]),
        "entropy": torch.stack([terms.entropy_sum.detach().float(), tokens]),
        "alpha": alpha,
    }
    if args.mile_loss_log and parallel_state.get_tensor_model_parallel_rank() == 0:
        count = max(float(tokens), 1.0)
        _loss_log.write(
            args.mile_loss_log,
            "train" if training else "valid",
            int(args.curr_iteration) + 1,
            {
                "dp_rank": parallel_state.get_data_parallel_rank(),
                "ce": float(terms.ce_sum) / count,
                "loss": float(numerator) / float(denominator) if float(denominator) > 0 else 0.0,
                "entropy": float(terms.entropy_sum) / count,
                "alpha": float(alpha[0]) / float(alpha[1]) if float(alpha[1]) > 0 else 1.0,
                "tokens": int(tokens),
                "loss_sum": float(numerator),
                "denominator": float(denominator),
            },
        )
    _hold_if_requested(model, args)
    return terms.numerator, tokens.to(torch.int), report


def validate_loss(loss: torch.Tensor, args: argparse.Namespace) -> None:
    """Megatron's own checks on a rank's local loss, as upstream pretrain_gpt.loss_func runs them: NaN and Inf
    (--check-for-nan-in-loss-and-grad) stop the job; a spike (--check-for-spiky-loss: above SPIKY_LOSS_FACTOR x
    the largest loss seen so far) is handed to the rerun state machine (not fatal)."""
    import torch
    from megatron.core.rerun_state_machine import get_rerun_state_machine

    rerun_state_machine = get_rerun_state_machine()
    if args.check_for_nan_in_loss_and_grad:
        for rejection, what in ((torch.isnan, "NaN"), (torch.isinf, "Inf")):
            rerun_state_machine.validate_result(
                result=loss, rejection_func=rejection,
                message=f"found {what} in local forward loss calculation", tolerance=0.0, fatal=True,
            )
    if args.check_for_spiky_loss:
        rerun_state_machine.validate_result(
            result=loss,
            rejection_func=partial(rerun_state_machine.is_unexpectedly_large, threshold=SPIKY_LOSS_FACTOR,
                                   context="loss"),
            message="Spiky loss", tolerance=0.0, fatal=False,
        )


def logits_loss_func(labels: torch.Tensor, loss_mask: torch.Tensor, output_tensor: torch.Tensor,
                     model: Any = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """mile-pretrain's loss_func: mile_loss_func, then validate_loss on its result (Megatron's checks)."""
    from megatron.training import get_args

    loss, num_tokens, report = mile_loss_func(labels, loss_mask, output_tensor, model)
    validate_loss(loss, get_args())
    return loss, num_tokens, report


def _hold_if_requested(model: Any, args: argparse.Namespace) -> None:
    """Test-only: park this process at the iteration named by the env var until it is killed."""
    target = os.environ.get(HOLD_TEST_ENV_VAR)
    if target and (model is None or model.training) and args.curr_iteration + 1 == int(target):
        while True:
            time.sleep(3600)


_dumped = False


def _dumping_loss_func(loss_func: Any, tokens: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                       model: Any) -> Any:
    """Test-only (DUMP_TEST_ENV_VAR): wrap the first training micro-batch's loss_func to save its inputs,
    outputs and, from a hook on the logits, their gradient (the file is written when the hook fires)."""
    global _dumped
    import torch
    from megatron.core import parallel_state
    from megatron.core.utils import get_attr_wrapped_model

    directory = os.environ.get(DUMP_TEST_ENV_VAR)
    if (not directory or _dumped or (model is not None and not model.training)
            or not get_attr_wrapped_model(model, "post_process")):
        return loss_func
    _dumped = True

    def dump(output_tensor: torch.Tensor) -> Any:
        loss_sum, num_tokens, report = loss_func(output_tensor)
        record = {
            "tokens": tokens.detach().cpu(), "labels": labels.detach().cpu(), "loss_mask": loss_mask.detach().cpu(),
            "logits": output_tensor.detach().cpu().clone(), "loss_sum": loss_sum.detach().cpu().clone(),
            "num_tokens": num_tokens.detach().cpu(), "alpha": report["alpha"].detach().cpu(),
            "mile_loss": report["mile loss"].detach().cpu(),
            "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            "tp_size": parallel_state.get_tensor_model_parallel_world_size(),
            "dp_rank": parallel_state.get_data_parallel_rank(),
            "dp_size": parallel_state.get_data_parallel_world_size(),
        }

        def save_gradient(grad: torch.Tensor) -> None:
            record["logits_grad"] = grad.detach().cpu().clone()
            os.makedirs(directory, exist_ok=True)
            torch.save(record, os.path.join(directory, f"rank{torch.distributed.get_rank()}.pt"))

        output_tensor.register_hook(save_gradient)
        return loss_sum, num_tokens, report

    return dump


def forward_step(data_iterator: Any, model: Any, return_schedule_plan: bool = False):
    """Megatron forward_step_func: vocab-parallel logits from the model, the loss from logits_loss_func."""
    from megatron.core.utils import get_attr_wrapped_model
    from megatron.training import get_args, get_timers

    if return_schedule_plan:
        raise UsageError("MoE schedule plans (--overlap-moe-expert-parallel-comm) are not supported")
    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    vp_stage = get_attr_wrapped_model(model, "vp_stage")
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator, vp_stage)
    timers("batch-generator").stop()
    logits = model(tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask,
                   **model_forward_kwargs(get_args()))
    loss_func = partial(logits_loss_func, labels, loss_mask, model=model)
    if os.environ.get(DUMP_TEST_ENV_VAR):
        loss_func = _dumping_loss_func(loss_func, tokens, labels, loss_mask, model)
    return logits, loss_func


# ----------------------------------------------------------------------------------------------
# Throughput logging.
def _peak_tflops(args: argparse.Namespace) -> float | None:
    import torch

    from mile_megatron import cpu_mode

    if args.peak_tflops_per_device:
        return args.peak_tflops_per_device
    if cpu_mode.is_active() or not torch.cuda.is_available() or not args.bf16:
        return None
    name = torch.cuda.get_device_name().upper()
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


def _install_throughput_logging() -> None:
    """Wrap Megatron's training_log to also log tokens/s and MFU every --log-interval steps."""
    import megatron.training.training as megatron_training

    original = megatron_training.training_log
    state: dict[str, float] = {}

    def training_log(*args_: Any, **kwargs: Any) -> Any:
        result = original(*args_, **kwargs)
        from megatron.training import get_args, get_tensorboard_writer, get_wandb_writer, print_rank_last

        args = get_args()
        iteration = int(args_[3] if len(args_) > 3 else kwargs["iteration"])
        if iteration % args.log_interval:
            return result
        now = time.time()
        previous_time, previous_iteration = state.get("time"), state.get("iteration")
        state.update(time=now, iteration=iteration)
        if previous_time is None or iteration <= previous_iteration or now <= previous_time:
            return result
        steps = iteration - previous_iteration
        seconds = now - previous_time
        tokens_per_second = steps * args.global_batch_size * args.seq_length / seconds
        flops = megatron_training.num_floating_point_operations(args, args.global_batch_size) * steps
        achieved_tflops = flops / seconds / args.world_size / 1e12
        peak = _peak_tflops(args)
        mfu = achieved_tflops / peak if peak else None
        text = f" [mile-pretrain] iteration {iteration}: tokens/s {tokens_per_second:.1f} | " \
               f"TFLOP/s/device {achieved_tflops:.3f} | MFU " + (f"{100 * mfu:.2f}%" if mfu else "n/a")
        print_rank_last(text)
        writer, wandb_writer = get_tensorboard_writer(), get_wandb_writer()
        if writer:
            writer.add_scalar("throughput/tokens-per-sec", tokens_per_second, iteration)
            if mfu is not None:
                writer.add_scalar("throughput/mfu", mfu, iteration)
        if wandb_writer:
            metrics = {"throughput/tokens-per-sec": tokens_per_second}
            if mfu is not None:
                metrics["throughput/mfu"] = mfu
            wandb_writer.log(metrics, iteration)
        return result

    megatron_training.training_log = training_log


# ----------------------------------------------------------------------------------------------
# Entry point.
def _parse_megatron_args(megatron_argv: list[str], cpu: bool) -> argparse.Namespace:
    from megatron.training.arguments import parse_and_validate_args, parse_args

    program = sys.argv[0] if sys.argv else "mile-pretrain"
    sys.argv = [program] + megatron_argv
    check_supported(parse_args(_add_entry_point_arguments), cpu)
    try:
        return parse_and_validate_args(extra_args_provider=_add_entry_point_arguments)
    except AssertionError as error:
        raise UsageError(f"Megatron rejected the arguments: {error}") from error


def print_help() -> None:
    """Help for every flag: ours and Megatron's (some Megatron help texts hold a bare '%', which argparse's
    formatter rejects; those are escaped here)."""
    from megatron.training.arguments import add_megatron_arguments

    parser = argparse.ArgumentParser(prog="mile-pretrain", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    ours = parser.add_argument_group("mile-pretrain")
    ours.add_argument("--preset", choices=PRESET_NAMES, help="paper recipe (flags inserted before yours)")
    ours.add_argument("--cpu", action="store_true", help="CPU mode: gloo, local layers (or MILE_MEGATRON_CPU=1)")
    _add_entry_point_arguments(add_megatron_arguments(parser))
    for action in parser._actions:
        if action.help:
            try:
                action.help % dict(vars(action), prog=parser.prog)
            except (ValueError, TypeError, KeyError):
                action.help = action.help.replace("%", "%%")
    parser.print_help()


def run(argv: Sequence[str]) -> None:
    from mile_megatron import cpu_mode

    if any(item in ("-h", "--help") for item in argv):
        print_help()
        return
    preset, cpu_flag, user_argv = _split_entry_point_flags(argv)
    cpu = cpu_flag or cpu_mode.cpu_mode_requested()
    if cpu:
        cpu_mode.activate()
    megatron_argv = build_megatron_argv(user_argv, preset, cpu)
    args = _parse_megatron_args(megatron_argv, cpu)

    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    if args.mile_loss_log:
        os.makedirs(os.path.dirname(os.path.abspath(args.mile_loss_log)), exist_ok=True)
    _install_throughput_logging()
    config_container = pretrain_cfg_container_from_args(args)
    pretrain(config_container, train_valid_test_datasets_provider, ModelType.encoder_or_decoder,
             forward_step, model_provider=model_provider)


def main(argv: Sequence[str] | None = None) -> None:
    """Console script `mile-pretrain` / `python -m mile_megatron.pretrain_gpt`."""
    import torch

    from mile_megatron import cpu_mode

    try:
        run(sys.argv[1:] if argv is None else argv)
    except (UsageError, cpu_mode.CpuModeError) as error:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"mile-pretrain: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
