"""The loss side of mile-pretrain: Megatron's forward_step and loss_func with the MiLe step objective.

    L = sum(alpha * w * CE * mask) / sum(w * mask)    (--mile-alpha global; denominator sum(mask) otherwise)

over every counted token of every micro-batch and data-parallel x context-parallel rank of an optimizer step
(mile_megatron.loss.objective). Each micro-batch back-propagates its numerator (Megatron's
--calculate-per-token-loss, always on) and adds its denominator to StepNormalization, the model config's
finalize_model_grads_func, which divides the step's gradients once by the global sum, reduced where Megatron
reduces its token count: the forward has no data-parallel collective.

forward_step takes optional ForwardHooks: explicit seams for instrumentation (the tests inject NaN logits, park a
process, or record a micro-batch through them); nothing in this module reads test switches.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from mile_megatron.loss.arguments import add_loss_arguments, positive_int
from mile_megatron.utils.errors import UsageError

if TYPE_CHECKING:
    import torch

SPIKY_LOSS_FACTOR = 10  # as upstream pretrain_gpt.py: a loss 10x the largest seen so far is a spike


def add_megatron_loss_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron extra_args_provider: the loss flags (mile_megatron.loss.arguments), --mile-loss-log and the fused
    output layer's flags."""
    add_loss_arguments(parser)
    group = parser.add_argument_group("MiLe loss: output layer and logging")
    group.add_argument("--mile-fused-output-layer", action=argparse.BooleanOptionalAction, default=True,
                       help="fuse the output layer into the loss, chunked over tokens, so the logits never exist "
                            "whole (default on; --no-mile-fused-output-layer computes the loss from the logits)")
    group.add_argument("--mile-chunk-tokens", type=positive_int, default=None, metavar="T",
                       help="tokens per chunk of the fused output layer (default: about tokens x hidden / (V/tp))")
    group.add_argument("--mile-loss-log", type=str, default=None, metavar="PATH",
                       help="append one JSON line per micro-batch (last pipeline stage, TP rank 0)")
    return parser


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
    `step_seconds` is the wall time between the last two steps' ends on this rank (metrics.py reads it).
    """

    def __init__(self, finalize: Any = None) -> None:
        self.finalize = finalize  # the hook it replaces (None: megatron.core's finalize_model_grads)
        self.pending: torch.Tensor | None = None
        self.step_seconds: float | None = None
        self._last_end: float | None = None

    def add(self, denominator: torch.Tensor) -> None:
        value = denominator.detach().double()
        self.pending = value if self.pending is None else self.pending + value

    def __call__(self, model: list, num_tokens: torch.Tensor | None = None, *args: Any, pg_collection: Any = None,
                 **kwargs: Any) -> None:
        import time

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
        now = time.perf_counter()
        if self._last_end is not None:
            self.step_seconds = now - self._last_end
        self._last_end = now


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


def step_normalization_of(model: Any) -> StepNormalization:
    """The StepNormalization installed on `model`'s config (UsageError naming the fix when there is none)."""
    from megatron.core.utils import get_model_config

    hook = get_model_config(model).finalize_model_grads_func
    if not isinstance(hook, StepNormalization):
        raise UsageError("the model's config has no StepNormalization as finalize_model_grads_func: call "
                         "mile_megatron.engines.megatron.install_step_normalization(model_config) before training "
                         "(mile-pretrain and the Megatron-LM patch do)")
    return hook


class _LossLog:
    """Per-micro-batch JSON lines; one O_APPEND write per record so ranks never interleave."""

    def __init__(self) -> None:
        self._position: tuple[str, int] | None = None
        self._microbatch = 0

    def write(self, path: str, split: str, iteration: int, record: dict[str, Any]) -> None:
        from mile_megatron.utils.fs import append_json_line

        if self._position != (split, iteration):
            self._position, self._microbatch = (split, iteration), 0
        append_json_line(path, {"split": split, "iteration": iteration, "microbatch": self._microbatch, **record})
        self._microbatch += 1


_loss_log = _LossLog()


def mile_loss_func(labels: torch.Tensor, loss_mask: torch.Tensor, output_tensor: torch.Tensor,
                   model: Any = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Megatron loss_func (--calculate-per-token-loss) on GPTModel's output, without result checks: the packed loss
    terms of the fused output layer (model.fused_loss_terms), or with --no-mile-fused-output-layer the
    vocab-parallel logits, whose terms are computed here (mile_megatron.loss.mile_loss_terms).

    Returns (numerator, num_tokens, report) of the terms: Megatron back-propagates the
    numerator sum(alpha * w * CE * mask) of each micro-batch, and a training micro-batch adds its denominator
    (sum(w * mask) for --mile-alpha global, else sum(mask)) to the model's StepNormalization, which divides the
    step's gradients by the global sum. No data-parallel collective runs here (except the paper's per-micro-batch
    rule, --mile-alpha official). Report entries [sum, count], summed by Megatron over micro-batches and
    data-parallel ranks and printed as sum / count: 'lm loss' (plain CE), 'mile loss' (the step's optimised
    loss, exactly), 'entropy' (mean predictive entropy), 'alpha' (the step's alpha), and in training
    'tokens/s' and 'MFU' of the previous step (metrics.py).
    """
    import torch
    from megatron.core import parallel_state
    from megatron.training import get_args

    from mile_megatron.loss import mile_loss_terms

    from . import metrics
    from .model import unpack_terms

    args = get_args()
    if not args.calculate_per_token_loss:
        raise UsageError("the MiLe loss needs --calculate-per-token-loss: it normalises the step's gradients once "
                         "over the global batch (mile-pretrain always sets it; add it to the patched script's flags)")
    if getattr(args, "mile_fused_output_layer", False):
        terms = unpack_terms(output_tensor)
    else:
        terms = mile_loss_terms(output_tensor, labels, loss_mask, kind=args.loss, gamma=args.mile_gamma,
                                sigma=args.mile_sigma, alpha=args.mile_alpha)
    training = model is None or model.training
    normalization = step_normalization_of(model) if model is not None else None
    if training and normalization is not None:
        normalization.add(terms.denominator)
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
    if training and normalization is not None:
        report.update(metrics.throughput_report(args, normalization.step_seconds, like=tokens))
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


@dataclass(frozen=True)
class ForwardHooks:
    """Optional seams of forward_step, for instrumentation and tests.

    logits(output, model) -> output: sees (and may replace) the model's output before the loss (last pipeline
        stage only): the logits, or the packed loss terms of the fused output layer (model.pack_terms).
    loss_func(loss_func, batch, model) -> loss_func: wraps the micro-batch's loss function; batch is get_batch's.
    """

    logits: Callable[[Any, Any], Any] | None = None
    loss_func: Callable[[Callable, dict, Any], Callable] | None = None


def forward_step(data_iterator: Any, model: Any, return_schedule_plan: bool = False, *,
                 hooks: ForwardHooks | None = None):
    """Megatron forward_step_func: the model's output (model.model_forward_kwargs: packed loss terms, or the
    vocab-parallel logits), the loss from logits_loss_func."""
    from megatron.core.utils import get_attr_wrapped_model
    from megatron.training import get_args, get_timers

    from .batch import get_batch
    from .model import model_forward_kwargs

    if return_schedule_plan:
        raise UsageError("MoE schedule plans (--overlap-moe-expert-parallel-comm) are not supported")
    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    batch = get_batch(data_iterator, get_attr_wrapped_model(model, "vp_stage"))
    timers("batch-generator").stop()
    logits = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"],
                   loss_mask=batch["loss_mask"], **model_forward_kwargs(get_args()))
    if hooks is not None and hooks.logits is not None and get_attr_wrapped_model(model, "post_process"):
        logits = hooks.logits(logits, model)
    loss_func = partial(logits_loss_func, batch["labels"], batch["loss_mask"], model=model)
    if hooks is not None and hooks.loss_func is not None:
        loss_func = hooks.loss_func(loss_func, batch, model)
    return logits, loss_func
