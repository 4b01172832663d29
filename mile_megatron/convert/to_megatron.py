"""``mile-convert-megatron``: Hugging Face LLaMA directory -> Megatron checkpoint for mile-pretrain.

    mile-convert-megatron HF_DIR --output MEGATRON_DIR [--tensor-model-parallel-size T]
        [--pipeline-model-parallel-size P] [--num-layers-per-virtual-pipeline-stage N]
        [--ckpt-format torch_dist|torch] [--make-vocab-size-divisible-by 128]
        [--dtype bf16|fp16|fp32] [--overwrite]

Writes a *release* checkpoint (MEGATRON_DIR/release + latest_checkpointed_iteration.txt = release),
which Megatron loads as iteration 0 without optimizer or RNG state, so continued pretraining needs
only --load:

    mile-pretrain <the architecture flags printed by this tool> --load MEGATRON_DIR \
        --tensor-model-parallel-size T --pipeline-model-parallel-size P \
        --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model HF_DIR/tokenizer.model ...

(--finetune is optional; --no-load-optim / --no-load-rng are implied by the release marker.)
The embedding and output layer are padded with zero rows to a multiple of
--make-vocab-size-divisible-by x T, which must match the value used for training. torch_dist
checkpoints hold global tensors and load at any TP/PP; T still fixes the vocabulary padding.
Legacy torch checkpoints are written per rank for exactly T x P (x virtual stages).
Memory: the whole model in --dtype.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from mile_megatron.convert import ConversionError, layout
from mile_megatron.convert.hf_config import DTYPES, ModelShape, megatron_model_flags, shape_from_hf_config

CHECKPOINT_VERSION = 3.0
_LINEAR_LAYERS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


class HFWeights:
    """Lazy access to a safetensors model (single file or sharded with an index)."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (directory / "model.safetensors").is_file():
            weight_map = None
        else:
            raise ConversionError(f"{directory} has no model.safetensors or model.safetensors.index.json (only "
                                  "safetensors weights are supported; re-save with save_pretrained)")
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self._handles = {}
        for name in files:
            path = directory / name
            if not path.is_file():
                raise ConversionError(f"{path} (listed in the safetensors index) is missing")
            try:
                self._handles[name] = safe_open(str(path), framework="pt")
            except Exception as error:
                raise ConversionError(f"cannot read {path} ({error}); the file is truncated or corrupted") from error
        if weight_map is None:
            weight_map = {key: "model.safetensors" for key in self._handles["model.safetensors"].keys()}
        self._map = weight_map

    def __contains__(self, name: str) -> bool:
        return name in self._map

    def get(self, name: str) -> torch.Tensor:
        if name not in self._map:
            raise ConversionError(f"the Hugging Face model has no tensor {name}")
        return self._handles[self._map[name]].get_tensor(name)

    def names(self) -> list[str]:
        return list(self._map)


def megatron_args(shape: ModelShape, tp: int, pp: int, layers_per_virtual_stage: int | None, ckpt_format: str,
                  dtype: torch.dtype, divisible_by: int) -> argparse.Namespace:
    """The arguments Megatron would save for a mile-pretrain run of this model (parsed by Megatron itself)."""
    from megatron.training.arguments import parse_args

    from mile_megatron.recipes import LLAMA_ARCHITECTURE_FLAGS

    if shape.rope_theta != int(shape.rope_theta):
        raise ConversionError(f"rope theta {shape.rope_theta} is not an integer (Megatron's --rotary-base is)")
    flags = list(LLAMA_ARCHITECTURE_FLAGS) + megatron_model_flags(shape) + [
        "--seq-length", str(shape.max_position_embeddings),
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
        "--make-vocab-size-divisible-by", str(divisible_by), "--ckpt-format", ckpt_format,
        "--micro-batch-size", "1", "--transformer-impl", "local",
    ]
    if layers_per_virtual_stage:
        flags += ["--num-layers-per-virtual-pipeline-stage", str(layers_per_virtual_stage)]
    if dtype == torch.bfloat16:
        flags.append("--bf16")
    elif dtype == torch.float16:
        flags.append("--fp16")
    saved_argv = sys.argv
    sys.argv = ["mile-convert-megatron", *flags]
    try:
        args = parse_args()
    except SystemExit as error:
        raise ConversionError(f"Megatron rejected the derived arguments {flags}") from error
    finally:
        sys.argv = saved_argv
    vpp = shape.num_layers // (pp * layers_per_virtual_stage) if layers_per_virtual_stage else None
    args.padded_vocab_size = shape.padded_vocab_size
    args.vocab_size = shape.vocab_size
    args.params_dtype = dtype
    args.world_size = tp * pp
    args.data_parallel_size = 1
    args.virtual_pipeline_model_parallel_size = vpp
    args.untie_embeddings_and_output_weights = True
    if shape.num_query_groups == shape.num_attention_heads:
        args.num_query_groups = shape.num_attention_heads
    args.converted_from_hf = True
    return args


def canonical_model(weights: HFWeights, shape: ModelShape, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor],
                                                                                          list[dict[str, torch.Tensor]]]:
    """(model tensors, per-layer canonical tensors) in the TP=1 Megatron layout, padded vocabulary."""
    expected = {layout.HF_EMBEDDING, layout.HF_FINAL_NORM} | (set() if shape.tied_embeddings else {layout.HF_LM_HEAD})
    for index in range(shape.num_layers):
        expected |= set(layout.hf_layer_names(index).values())
    unexpected = sorted(name for name in weights.names() if name not in expected
                        and not name.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise ConversionError(f"the Hugging Face model has tensors a LLaMA GPTModel cannot hold: {unexpected[:8]}")
    embedding = weights.get(layout.HF_EMBEDDING)
    output = embedding if shape.tied_embeddings else weights.get(layout.HF_LM_HEAD)
    for name, tensor in (("embed_tokens", embedding), ("lm_head", output)):
        if tuple(tensor.shape) != (shape.vocab_size, shape.hidden_size):
            raise ConversionError(f"{name} has shape {tuple(tensor.shape)}, config.json implies "
                                  f"({shape.vocab_size}, {shape.hidden_size})")
    model = {
        "word_embeddings": layout.pad_vocab(embedding.to(dtype), shape.padded_vocab_size),
        "final_layernorm": weights.get(layout.HF_FINAL_NORM).to(dtype),
        "output_layer": layout.pad_vocab(output.to(dtype), shape.padded_vocab_size),
    }
    layers = []
    for index in range(shape.num_layers):
        hf = {name: weights.get(name).to(dtype) for name in layout.hf_layer_names(index).values()}
        layers.append(layout.layer_from_hf(index, hf, shape.num_attention_heads, shape.num_query_groups,
                                           shape.head_dim))
    return model, layers


def _serialized_object(value: Any) -> io.BytesIO:
    """A Megatron ShardedObject as stored in torch_dist: torch.save of a one-element list."""
    serialized = io.BytesIO()
    torch.save([value], serialized)
    serialized.seek(0)
    return serialized


def _prepacked_bytes_planner() -> Any:
    """DCP's default save planner, except BytesIO values are stored as they are (like Megatron's planner),
    not wrapped in a second torch.save."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.planner import WriteItemType

    class PrepackedBytesSavePlanner(DefaultSavePlanner):
        def transform_object(self, write_item: Any, object: Any) -> Any:
            if write_item.type == WriteItemType.BYTE_IO:
                return object
            return super().transform_object(write_item, object)

    return PrepackedBytesSavePlanner()


def write_torch_dist(directory: Path, args: argparse.Namespace, model: dict[str, torch.Tensor],
                     layers: list[dict[str, torch.Tensor]]) -> None:
    """Global tensors (layers stacked on dim 0, local-spec keys as Megatron saves them) + common state."""
    import torch.distributed.checkpoint as dcp

    state: dict[str, Any] = {layout.MODEL_KEYS[name]: tensor for name, tensor in model.items()}
    for name in layout.LAYER_TENSORS:
        state[layout.LAYER_PREFIX + layout.TE_LAYER_KEYS[name]] = torch.stack([layer[name] for layer in layers])
    common = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0,
              "content_metadata": {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}}
    state["common_state/shard_0_1"] = _serialized_object(common)
    # Megatron's sharded state dict has one (empty) _extra_state object per linear layer and layer index.
    for linear in _LINEAR_LAYERS:
        for index in range(len(layers)):
            state[f"{layout.LAYER_PREFIX}{linear}._extra_state/shard_{index}_{len(layers)}"] = _serialized_object(None)
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(directory)), planner=_prepacked_bytes_planner(),
             no_dist=True)
    (directory / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist",
                                                         "sharded_backend_version": 1}))


def write_legacy_torch(directory: Path, args: argparse.Namespace, model: dict[str, torch.Tensor],
                       layers: list[dict[str, torch.Tensor]], tp: int, pp: int, vpp: int | None) -> None:
    """One model_optim_rng.pt per (TP, PP) rank with that rank's shards (model or model0..model{v-1})."""
    chunks = layout.even_pipeline_chunks(len(layers), pp, vpp)
    stages = vpp or 1
    shards = {name: layout.split_tensor_parallel(name, tensor, tp) for name, tensor in model.items()}
    for pp_rank in range(pp):
        per_tp: list[dict[str, Any]] = [{} for _ in range(tp)]
        for stage in range(stages):
            chunk_states: list[dict[str, Any]] = [{} for _ in range(tp)]
            if pp_rank == 0 and stage == 0:
                for rank in range(tp):
                    chunk_states[rank][layout.MODEL_KEYS["word_embeddings"]] = shards["word_embeddings"][rank]
            for local, index in enumerate(chunks[(pp_rank, stage)]):
                for name in layout.LAYER_TENSORS:
                    parts = layout.split_tensor_parallel(name, layers[index][name], tp)
                    for rank in range(tp):
                        chunk_states[rank][f"{layout.LAYER_PREFIX}{local}.{layout.LEGACY_LAYER_KEYS[name]}"] = parts[rank]
                for rank in range(tp):
                    for linear in _LINEAR_LAYERS:
                        chunk_states[rank][f"{layout.LAYER_PREFIX}{local}.{linear}._extra_state"] = None
            if pp_rank == pp - 1 and stage == stages - 1:
                for rank in range(tp):
                    chunk_states[rank][layout.MODEL_KEYS["final_layernorm"]] = shards["final_layernorm"][rank]
                    chunk_states[rank][layout.MODEL_KEYS["output_layer"]] = shards["output_layer"][rank]
                    chunk_states[rank]["output_layer._extra_state"] = None
            key = f"model{stage}" if vpp else "model"
            for rank in range(tp):
                per_tp[rank][key] = chunk_states[rank]
        for rank in range(tp):
            name = f"mp_rank_{rank:02d}_{pp_rank:03d}" if pp > 1 else f"mp_rank_{rank:02d}"
            (directory / name).mkdir()
            torch.save({"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0, **per_tp[rank]},
                       directory / name / "model_optim_rng.pt")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mile-convert-megatron", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("hf_dir", help="Hugging Face LLaMA model directory (config.json + safetensors)")
    parser.add_argument("--output", "-o", required=True, help="Megatron checkpoint directory to create")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parser.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                        help="interleaved pipeline chunks (legacy torch format; torch_dist loads with any)")
    parser.add_argument("--ckpt-format", choices=("torch_dist", "torch"), default="torch_dist")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                        help="Megatron's vocabulary padding multiple (per TP rank); use the training value")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="stored dtype (default: config.json's dtype, fp32 if absent)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output directory")
    return parser


def _config_dtype(config: Any) -> torch.dtype:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if value in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def convert(options: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoConfig

    source = Path(options.hf_dir)
    if not (source / "config.json").is_file():
        raise ConversionError(f"{source} has no config.json; give a Hugging Face model directory")
    tp, pp = options.tensor_model_parallel_size, options.pipeline_model_parallel_size
    virtual = options.num_layers_per_virtual_pipeline_stage
    if tp < 1 or pp < 1 or (virtual is not None and virtual < 1):
        raise ConversionError("parallel sizes must be positive")
    output = Path(options.output).resolve()
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not options.overwrite:
        raise ConversionError(f"{output} exists and is not empty; choose another --output or add --overwrite")
    config = AutoConfig.from_pretrained(str(source))
    shape = shape_from_hf_config(config, tp, options.make_vocab_size_divisible_by)
    problems = []
    if shape.num_attention_heads % tp or shape.num_query_groups % tp:
        problems.append(f"{shape.num_attention_heads} heads / {shape.num_query_groups} key-value heads are not "
                        f"divisible by --tensor-model-parallel-size {tp}")
    if shape.ffn_hidden_size % tp:
        problems.append(f"intermediate_size {shape.ffn_hidden_size} is not divisible by TP {tp}")
    vpp = None
    if virtual:
        if pp < 2 or shape.num_layers % (pp * virtual):
            problems.append(f"--num-layers-per-virtual-pipeline-stage {virtual} needs PP > 1 and {shape.num_layers} "
                            f"layers divisible by PP x {virtual}")
        else:
            vpp = shape.num_layers // (pp * virtual)
    if shape.num_layers % pp:
        problems.append(f"{shape.num_layers} layers are not divisible by --pipeline-model-parallel-size {pp}")
    if problems:
        raise ConversionError("cannot write this layout:\n  - " + "\n  - ".join(problems))
    dtype = DTYPES[options.dtype] if options.dtype else _config_dtype(config)
    args = megatron_args(shape, tp, pp, virtual, options.ckpt_format, dtype, options.make_vocab_size_divisible_by)
    model, layers = canonical_model(HFWeights(source), shape, dtype)

    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    release = staging / "release"
    release.mkdir(parents=True)
    try:
        if options.ckpt_format == "torch_dist":
            write_torch_dist(release, args, model, layers)
        else:
            write_legacy_torch(release, args, model, layers, tp, pp, vpp)
        (staging / "latest_checkpointed_iteration.txt").write_text("release")
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    flags = megatron_model_flags(shape) + [
        "--seq-length", str(shape.max_position_embeddings),
        "--make-vocab-size-divisible-by", str(options.make_vocab_size_divisible_by),
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
    if virtual:
        flags += ["--num-layers-per-virtual-pipeline-stage", str(virtual)]
    flags += ["--ckpt-format", options.ckpt_format, "--load", str(output)]
    return {"output": str(output), "format": options.ckpt_format, "dtype": str(dtype).removeprefix("torch."),
            "padded_vocab_size": shape.padded_vocab_size, "vocab_size": shape.vocab_size, "flags": flags}


def main(argv: list[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    try:
        summary = convert(options)
    except ConversionError as error:
        print(f"mile-convert-megatron: error: {error}", file=sys.stderr)
        return 2
    print(f"mile-convert-megatron: wrote {summary['output']} ({summary['format']} release checkpoint, "
          f"{summary['dtype']}, vocabulary {summary['vocab_size']} padded to {summary['padded_vocab_size']}).\n"
          "Continue pretraining with (plus your data, tokenizer and optimizer flags):\n  mile-pretrain "
          + " ".join(summary["flags"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
