"""``mile-convert-hf``: Megatron GPT checkpoint (torch_dist or torch, any TP/PP/VPP) -> Hugging Face LLaMA.

    mile-convert-hf CHECKPOINT --output HF_DIR [--iteration N] [--dtype bf16|fp16|fp32]
                    [--tokenizer-model PATH | --no-tokenizer] [--vocab-size V]
                    [--max-shard-size 2GB] [--overwrite] [--verify [--tolerance T]]

CHECKPOINT is a Megatron save directory (converts the iteration in latest_checkpointed_iteration.txt)
or one iter_NNNNNNN / release directory inside it. Writes config.json, generation_config.json,
model-XXXXX-of-YYYYY.safetensors + model.safetensors.index.json and the tokenizer files. Tensors
are read and converted one transformer layer at a time (memory: one layer plus one output shard for
checkpoints with Megatron's per-layer chunks; benchmarks/convert_memory_bench.py). The output
appears atomically (written to a hidden sibling directory, then renamed).

--verify runs the Megatron model (CPU, TP=1, in a subprocess) and the converted model on sample
tokens and fails (exit 1) when the largest absolute logit difference exceeds --tolerance
(default 1e-4 when the conversion is lossless, e.g. fp32 -> fp32 or bf16 -> bf16; 5e-2 otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import torch

from mile_megatron.convert import ConversionError
from mile_megatron.convert.hf_config import DTYPES, ModelShape, llama_config, shape_from_megatron_args

LOSSLESS_TOLERANCE = 1e-4
LOSSY_TOLERANCE = 5e-2
DEFAULT_MAX_SHARD = "2GB"


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 500MB, 2GB)")
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return max(1, int(float(match.group(1)) * units[(match.group(2) or "").upper()]))


def _progress(total: int, description: str, enabled: bool) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        return None
    return tqdm(total=total, desc=description, unit="tensor group", disable=not enabled, file=sys.stderr)


def checkpoint_dtype(args: argparse.Namespace) -> torch.dtype:
    if getattr(args, "bf16", False):
        return torch.bfloat16
    if getattr(args, "fp16", False):
        return torch.float16
    return torch.float32


def hf_tensors(checkpoint: Any, shape: ModelShape) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """(group name, HF tensors) in file order: embedding, layers, final norm and LM head."""
    from mile_megatron.convert import layout

    embedding = checkpoint.model_tensor("word_embeddings")
    _check_rows("word_embeddings", embedding, shape)
    yield "embeddings", {layout.HF_EMBEDDING: embedding[: shape.vocab_size]}
    del embedding
    for index in range(shape.num_layers):
        yield f"layer {index}", layout.layer_to_hf(index, checkpoint.layer(index), shape.num_attention_heads,
                                                   shape.num_query_groups, shape.head_dim, shape.zero_centered_norm)
    final = {layout.HF_FINAL_NORM: layout.norm_to_hf(checkpoint.model_tensor("final_layernorm"),
                                                     shape.zero_centered_norm)}
    if not shape.tied_embeddings:
        output = checkpoint.model_tensor("output_layer")
        _check_rows("output_layer", output, shape)
        final[layout.HF_LM_HEAD] = output[: shape.vocab_size]
    yield "final norm and output layer", final


def _check_rows(name: str, tensor: torch.Tensor, shape: ModelShape) -> None:
    if tuple(tensor.shape) != (shape.padded_vocab_size, shape.hidden_size):
        raise ConversionError(f"{name} has shape {tuple(tensor.shape)}, the saved arguments imply "
                              f"({shape.padded_vocab_size}, {shape.hidden_size})")


def planned_sizes(shape: ModelShape, element_size: int) -> list[tuple[str, int]]:
    """(HF name, bytes) of every tensor in file order (what the shard plan is made from)."""
    from mile_megatron.convert import layout

    h, f, d = shape.hidden_size, shape.ffn_hidden_size, shape.head_dim
    entries = [(layout.HF_EMBEDDING, shape.vocab_size * h)]
    for index in range(shape.num_layers):
        names = layout.hf_layer_names(index)
        entries += [(names["input_layernorm"], h), (names["self_attn.q_proj"], shape.num_attention_heads * d * h),
                    (names["self_attn.k_proj"], shape.num_query_groups * d * h),
                    (names["self_attn.v_proj"], shape.num_query_groups * d * h),
                    (names["self_attn.o_proj"], h * shape.num_attention_heads * d),
                    (names["post_attention_layernorm"], h), (names["mlp.gate_proj"], f * h),
                    (names["mlp.up_proj"], f * h), (names["mlp.down_proj"], h * f)]
    entries.append((layout.HF_FINAL_NORM, h))
    if not shape.tied_embeddings:
        entries.append((layout.HF_LM_HEAD, shape.vocab_size * h))
    return [(name, count * element_size) for name, count in entries]


def plan_shards(entries: list[tuple[str, int]], max_bytes: int) -> dict[str, int]:
    """Greedy: consecutive tensors share a shard until the next would exceed max_bytes."""
    assignment, shard, used = {}, 0, 0
    for name, size in entries:
        if used and used + size > max_bytes:
            shard, used = shard + 1, 0
        assignment[name] = shard
        used += size
    return assignment


def write_hf_model(checkpoint: Any, shape: ModelShape, directory: Path, dtype: torch.dtype,
                   max_shard_bytes: int, show_progress: bool) -> dict[str, Any]:
    """Write config-independent safetensors shards and the index; returns the index."""
    from safetensors.torch import save_file

    element_size = torch.empty((), dtype=dtype).element_size()
    entries = planned_sizes(shape, element_size)
    assignment = plan_shards(entries, max_shard_bytes)
    shards = max(assignment.values()) + 1
    file_names = [f"model-{index + 1:05d}-of-{shards:05d}.safetensors" for index in range(shards)]
    weight_map = {name: file_names[shard] for name, shard in assignment.items()}
    pending: dict[str, torch.Tensor] = {}
    current = 0
    progress = _progress(shape.num_layers + 2, "converting", show_progress)

    def flush() -> None:
        nonlocal pending
        if pending:
            save_file(pending, str(directory / file_names[current]), metadata={"format": "pt"})
            pending = {}

    for group, tensors in hf_tensors(checkpoint, shape):
        for name, tensor in tensors.items():
            if name not in assignment:
                raise ConversionError(f"internal error: unplanned tensor {name}")
            if assignment[name] != current:
                flush()
                current = assignment[name]
            pending[name] = tensor.to(dtype).contiguous()
        if progress is not None:
            progress.set_postfix_str(group)
            progress.update(1)
    flush()
    if progress is not None:
        progress.close()
    total = sum(size for _, size in entries)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mile-convert-hf", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("checkpoint", help="Megatron save directory, or an iter_NNNNNNN / release directory")
    parser.add_argument("--output", "-o", required=True, help="Hugging Face model directory to create")
    parser.add_argument("--iteration", type=int, default=None, help="convert iter_N instead of the latest")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="weight dtype of the HF model (default: the checkpoint's training dtype)")
    parser.add_argument("--tokenizer-model", default=None,
                        help="tokenizer model/directory, if the path saved in the checkpoint moved")
    parser.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer files")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="true vocabulary size (default: from the tokenizer); padding rows beyond it are cut")
    parser.add_argument("--max-shard-size", type=parse_size, default=parse_size(DEFAULT_MAX_SHARD),
                        help=f"largest safetensors shard (default {DEFAULT_MAX_SHARD})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output directory")
    parser.add_argument("--verify", action="store_true",
                        help="compare Megatron and HF logits on sample tokens; exit 1 above --tolerance")
    parser.add_argument("--tolerance", type=float, default=None,
                        help=f"largest allowed absolute logit difference (default {LOSSLESS_TOLERANCE} "
                             f"lossless, {LOSSY_TOLERANCE} when --dtype rounds the stored weights)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _is_lossless(stored: torch.dtype, target: torch.dtype) -> bool:
    return stored == target or target == torch.float32


def convert(options: argparse.Namespace) -> dict[str, Any]:
    """Convert; returns a summary (paths, shape, verification result)."""
    from mile_megatron.convert.checkpoint_reader import open_checkpoint
    from mile_megatron.convert.hf_tokenizer import tokenizer_info

    output = Path(options.output).resolve()
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not options.overwrite:
        raise ConversionError(f"{output} exists and is not empty; choose another --output or add --overwrite")
    with open_checkpoint(options.checkpoint, options.iteration) as checkpoint:
        args = checkpoint.args
        if options.no_tokenizer:
            from mile_megatron.convert.hf_tokenizer import TokenizerInfo

            tokenizer = TokenizerInfo(getattr(args, "vocab_size", None), None, None, "none (--no-tokenizer)", None)
        else:
            tokenizer = tokenizer_info(args, options.tokenizer_model)
        vocab = options.vocab_size or tokenizer.vocab_size
        _check_vocab_padding(args, vocab)
        shape = shape_from_megatron_args(args, vocab, tokenizer.bos_token_id, tokenizer.eos_token_id)
        stored = checkpoint_dtype(args)
        dtype = DTYPES[options.dtype] if options.dtype else stored
        staging = output.parent / f".{output.name}.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            from transformers import GenerationConfig

            llama_config(shape, dtype).save_pretrained(str(staging))
            GenerationConfig(bos_token_id=shape.bos_token_id, eos_token_id=shape.eos_token_id).save_pretrained(
                str(staging))
            if tokenizer.write is not None:
                tokenizer.write(staging)
            index = write_hf_model(checkpoint, shape, staging, dtype, options.max_shard_size,
                                   show_progress=not options.quiet)
            if output.exists():
                shutil.rmtree(output)
            os.replace(staging, output)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        location = checkpoint.location
    summary = {
        "checkpoint": str(location.directory), "format": location.format, "iteration": location.iteration,
        "output": str(output), "dtype": str(dtype).removeprefix("torch."),
        "tensor_model_parallel_size": int(args.tensor_model_parallel_size),
        "pipeline_model_parallel_size": int(args.pipeline_model_parallel_size),
        "virtual_pipeline_model_parallel_size": getattr(args, "virtual_pipeline_model_parallel_size", None),
        "vocab_size": shape.vocab_size, "padded_vocab_size": shape.padded_vocab_size,
        "tokenizer": tokenizer.description, "parameters_bytes": index["metadata"]["total_size"],
        "lossless": _is_lossless(stored, dtype),
    }
    return summary


def _check_vocab_padding(args: argparse.Namespace, vocab: int | None) -> None:
    from mile_megatron.convert.layout import padded_vocab_size

    if vocab is None or not getattr(args, "pad_vocab_size", True):
        return
    expected = padded_vocab_size(vocab, int(args.make_vocab_size_divisible_by), int(args.tensor_model_parallel_size))
    if expected != int(args.padded_vocab_size):
        raise ConversionError(
            f"a vocabulary of {vocab} tokens pads to {expected} rows with --make-vocab-size-divisible-by "
            f"{args.make_vocab_size_divisible_by} x TP {args.tensor_model_parallel_size}, but the checkpoint has "
            f"{args.padded_vocab_size}: wrong tokenizer (--tokenizer-model) or --vocab-size?")


def run_verification(checkpoint: str, iteration: int | None, hf_dir: str, tolerance: float,
                     timeout: float = 3600) -> dict[str, Any]:
    """Run mile_megatron.convert.verify in a CPU-only subprocess; returns its JSON result."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", MILE_MEGATRON_CPU="1")
    command = [sys.executable, "-m", "mile_megatron.convert.verify", "--checkpoint", checkpoint,
               "--hf", hf_dir, "--tolerance", repr(tolerance)]
    if iteration is not None:
        command += ["--iteration", str(iteration)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise ConversionError(f"verification failed to run (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    try:
        summary = convert(options)
    except ConversionError as error:
        print(f"mile-convert-hf: error: {error}", file=sys.stderr)
        return 2
    print(f"mile-convert-hf: wrote {summary['output']} ({summary['dtype']}, vocabulary {summary['vocab_size']} of "
          f"{summary['padded_vocab_size']} padded rows, tokenizer: {summary['tokenizer']}) from the "
          f"{summary['format']} checkpoint {summary['checkpoint']} (TP={summary['tensor_model_parallel_size']}, "
          f"PP={summary['pipeline_model_parallel_size']})")
    if not options.verify:
        return 0
    tolerance = options.tolerance
    if tolerance is None:
        tolerance = LOSSLESS_TOLERANCE if summary["lossless"] else LOSSY_TOLERANCE
    try:
        result = run_verification(options.checkpoint, options.iteration, summary["output"], tolerance)
    except (ConversionError, subprocess.TimeoutExpired) as error:
        print(f"mile-convert-hf: error: {error}", file=sys.stderr)
        return 2
    verdict = "OK" if result["ok"] else "FAILED"
    print(f"mile-convert-hf: verify {verdict}: max |logit difference| = {result['max_abs_diff']:.3e} over "
          f"{result['tokens']} tokens (tolerance {tolerance:.1e})")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
