"""The training loop of mile-pretrain-ds: a Hugging Face LLaMA under a DeepSpeed ZeRO engine on Megatron's data.

Model: transformers' LlamaForCausalLM with the recipe's shapes (mile_megatron.hf.models), or a Hugging Face
checkpoint (--hf-init). Data: Megatron's indexed datasets and blend files through megatron-core's own dataset
classes and sampler (mile_megatron.hf.data). Loss: mile_megatron.hf.loss.causal_lm_loss_terms, the same
implementation as mile-pretrain, with the same exact step objective (train_step).

CPU (--cpu or MILE_MEGATRON_CPU=1): DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu) with gloo, fp32, and
torch.optim.AdamW as the optimizer (DeepSpeed's CPU optimizers compile C++ on first use). On GPUs: nccl and
DeepSpeed's FusedAdam from the config's "optimizer" section (its "torch_adam" switch, torch.optim.AdamW, when
FusedAdam is neither prebuilt nor buildable for lack of nvcc); bf16 when the recipe trains in bf16. The model is
created on its device (no full fp32 copy per process in host memory); ZeRO-3 partitions it only once DeepSpeed
takes over, so every process must hold the whole fp32 model first.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path
from typing import Any

from mile_megatron.utils.errors import UsageError
from mile_megatron.utils.fs import append_json_line

from .checkpoint import print0, checkpoint_tag, export_hf, load_checkpoint, save_checkpoint, tokenizer_writer
from .config import deepspeed_config, learning_rate, parameter_groups


def _set_launcher_defaults() -> None:
    """One process without a launcher: a world of one on a free local port."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    from mile_megatron.utils.net import free_port

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


class StepObserver:
    """Optional seams of the training loop, for instrumentation and tests; this base observes nothing.

    micro_batch(...) runs after a micro-batch's forward and before its backward (the logits still carry their
    graph) and may return a function to run after the backward; finished(...) runs after the last step.
    """

    def micro_batch(self, *, iteration: int, micro: int, batch: dict, logits: Any, terms: Any, **extra: Any) -> Any:
        return None

    def finished(self, *, engine: Any, device: Any, dataset: Any, args: argparse.Namespace) -> None:
        return None


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
               iteration: int, observer: StepObserver) -> Any:
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
        after_backward = observer.micro_batch(iteration=iteration + 1, micro=micro, batch=batch, logits=logits,
                                              terms=terms, total_tokens=total_tokens, dp_size=dp_size,
                                              accumulation=len(step_batches), coefficient=coefficient)
        engine.backward(terms.numerator * coefficient.to(terms.numerator.dtype), scale_wrt_gas=False)
        if after_backward is not None:
            after_backward()
        if last and rescale:
            scale_gradients(engine, float(sums[4] / torch.clamp(sums[5], min=1e-30)))
        engine.step()
    return sums.cpu()


def train(args: argparse.Namespace, observer: StepObserver | None = None) -> None:
    """Train as `args` say (cli.parse_args); `observer` sees every micro-batch and the end of training."""
    observer = observer or StepObserver()
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

    print0(f"[mile-pretrain-ds] {dp_size} data-parallel process(es) on {device.type}, ZeRO stage "
            f"{engine.zero_optimization_stage()}, {args.precision}, micro batch {args.micro_batch_size} x "
            f"accumulation {accumulation} x {dp_size} = global batch {args.global_batch_size} sequences of "
            f"{args.seq_length}; loss {args.loss} (gamma {args.mile_gamma}, sigma {args.mile_sigma}, alpha "
            f"{args.mile_alpha}); optimizer {optimizer_name}"
            f"; {parameters / 1e6:.2f}M parameters")

    if (args.mile_alpha == "global" and args.loss != "ce" and accumulation > 1
            and (engine.zero_optimization_stage() in (1, 2) or args.precision == "bf16")
            and not engine.zero_optimization_partition_weights()):
        print0("[mile-pretrain-ds] note: --mile-alpha global with gradient accumulation divides the step's "
                "gradients by sum(w * mask) through DeepSpeed's public gradient API: one extra all-reduce of the "
                "gradients per step with this ZeRO stage (none with ZeRO-3 or one micro-batch per step)")
    iteration, consumed_samples = load_checkpoint(engine, args)
    if iteration < args.train_iters:
        dataset = build_train_dataset(args, tokenizer)
        batches = data.micro_batches(dataset, consumed_samples=consumed_samples,
                                     micro_batch_size=args.micro_batch_size, dp_rank=rank, dp_size=dp_size)
        engine.train()
        dp_group = dist.group.WORLD if dp_size > 1 else None
        while iteration < args.train_iters:
            started = time.perf_counter()
            lr = float(engine.get_lr()[0])  # what this step's update uses (the schedule, restored on resume)
            step_batches = [next(batches) for _ in range(accumulation)]
            sums = train_step(engine, step_batches, args, device, dp_group, iteration, observer)
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
                print0(f"[mile-pretrain-ds] iteration {iteration}/{args.train_iters} | consumed samples "
                        f"{consumed_samples} | lr {lr:.3E} | ce {record['ce']:.6f} | loss {record['loss']:.6f} | "
                        f"entropy {record['entropy']:.6f} | alpha {record['alpha']:.6f} | grad norm "
                        + ("n/a" if grad_norm is None else f"{float(grad_norm):.4f}")
                        + f" | tokens/s {record['tokens_per_second']:.1f}")
            if args.save and (iteration % args.save_interval == 0 or iteration == args.train_iters):
                save_checkpoint(engine, args, iteration, consumed_samples)
        observer.finished(engine=engine, device=device, dataset=dataset, args=args)
    elif args.save and not os.path.isdir(os.path.join(args.save, checkpoint_tag(iteration))):
        save_checkpoint(engine, args, iteration, consumed_samples)
    if args.export_hf:
        export_hf(engine, args, iteration, write_tokenizer)
