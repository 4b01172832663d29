"""Checkpoints of mile-pretrain-ds: DeepSpeed's own save/load with the data position and RNG, and the export.

    DIR/latest, DIR/iter_NNNNNNN/  DeepSpeed's layout (model, optimizer and scheduler states in the tag directory)
                                   plus rng_state_rank{R}.pt per rank; client_state {iteration, consumed_samples,
                                   args}. --load DIR resumes the newest tag there; a DIR without a checkpoint starts
                                   from scratch, so --save and --load may name the same directory.
    --export-hf DIR                after the last step, rank 0 consolidates the last checkpoint with DeepSpeed's
                                   zero_to_fp32 (the fp32 master weights; ZeRO-0 has none: the module's weights)
                                   and writes save_pretrained (safetensors) + the tokenizer files; DIR must be new,
                                   empty or an earlier export (it holds mile_export.json).
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path
from typing import Any

from mile_megatron.utils.errors import UsageError

EXPORT_MARKER = "mile_export.json"


def print0(text: str) -> None:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(text, flush=True)


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
            print0(f"[mile-pretrain-ds] no checkpoint in --load {args.load} (no 'latest' file): starting from scratch")
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
        print0(f"[mile-pretrain-ds] note: the checkpoint was trained with --global-batch-size "
                f"{saved['global_batch_size']}; continuing with {args.global_batch_size} from sample {consumed}")
    print0(f"[mile-pretrain-ds] resumed {path}: iteration {iteration}, consumed samples {consumed}")
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
        print0(f"[mile-pretrain-ds] exported {os.path.join(args.save, tag)} as a Hugging Face model to {directory}")
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
