"""Logit parity between a Megatron checkpoint and its Hugging Face conversion.

    python -m mile_megatron.convert.verify --checkpoint CKPT --hf HF_DIR [--iteration N]
           [--tolerance 1e-4] [--pair CKPT HF_DIR ...]

Runs in its own process (CPU mode, one gloo rank): builds megatron-core's GPTModel exactly as
mile-pretrain does (local transformer spec, the checkpoint's saved arguments) at TP=1 / PP=1, in
fp32, and loads the weights
- torch_dist: with megatron's own dist_checkpointing.load, which reshards the saved TP/PP layout
  itself (independent of this package's reader);
- legacy torch: from the TP-merged tensors of checkpoint_reader.
Then both models run on the same sample tokens (fp32) and the largest absolute difference of the
logits over the true vocabulary is reported, one JSON line per pair. Exit 0 when every pair is
within tolerance, 1 otherwise, 2 on errors.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from typing import Any

import torch

SAMPLE_BATCH = 2
SAMPLE_LENGTH = 64


def sample_tokens(vocab_size: int, seq_length: int, bos_token_id: int | None, seed: int = 1234) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (SAMPLE_BATCH, min(seq_length, SAMPLE_LENGTH)), generator=generator)
    if bos_token_id is not None:
        tokens[:, 0] = bos_token_id
    return tokens


def _initialize_megatron_single_process(workdir: str) -> None:
    from mile_megatron.utils import cpu_mode

    cpu_mode.activate()
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{workdir}/rendezvous", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)


def _single_rank_args(saved: argparse.Namespace) -> argparse.Namespace:
    """The saved arguments re-targeted at one CPU rank, fp32, no fusions."""
    args = copy.deepcopy(saved)
    overrides = dict(
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=None,
        num_layers_per_virtual_pipeline_stage=None, num_virtual_stages_per_pipeline_rank=None,
        decoder_first_pipeline_num_layers=None, decoder_last_pipeline_num_layers=None,
        pipeline_model_parallel_layout=None, account_for_embedding_in_pipeline_split=False,
        account_for_loss_in_pipeline_split=False, context_parallel_size=1, expert_model_parallel_size=1,
        sequence_parallel=False, world_size=1, data_parallel_size=1,
        params_dtype=torch.float32, bf16=False, fp16=False, fp8=None, fp4=None,
        transformer_impl="local", gradient_accumulation_fusion=False, apply_rope_fusion=False,
        masked_softmax_fusion=False, bias_dropout_fusion=False, bias_swiglu_fusion=False, bias_gelu_fusion=False,
        persist_layer_norm=False, no_persist_layer_norm=True, use_cpu_initialization=True,
        recompute_granularity=None, recompute_method=None, recompute_num_layers=None,
        hidden_dropout=0.0, attention_dropout=0.0, cuda_graph_impl="none", tp_comm_overlap=False,
        overlap_p2p_comm=False, cpu_offloading=False, fused_residual_rmsnorm=False,
    )
    for key, value in overrides.items():
        if hasattr(args, key) or key in ("num_virtual_stages_per_pipeline_rank",):
            setattr(args, key, value)
    return args


def build_megatron_model(saved: argparse.Namespace) -> Any:
    """GPTModel as mile-pretrain builds it on CPU (Megatron's builder, local spec), TP=1, fp32."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.training.argument_utils import core_transformer_config_from_args

    args = _single_rank_args(saved)
    config = core_transformer_config_from_args(args)
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization=args.normalization),
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=True, post_process=True, fp16_lm_cross_entropy=False, parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent, rotary_base=args.rotary_base,
    )
    return model.float().eval()


def _load_megatron_weights(model: Any, checkpoint: Any) -> None:
    from mile_megatron.convert import ConversionError, layout

    if checkpoint.format == "torch_dist":
        from megatron.core import dist_checkpointing

        sharded = model.sharded_state_dict()
        loaded = dist_checkpointing.load(sharded, str(checkpoint.location.directory))
        result = model.load_state_dict(loaded, strict=False)
    else:
        state = {}
        for index in range(int(checkpoint.args.num_layers)):
            for name, tensor in checkpoint.layer(index).items():
                state[f"{layout.LAYER_PREFIX}{index}.{layout.LEGACY_LAYER_KEYS[name]}"] = tensor.float()
        for name, key in layout.MODEL_KEYS.items():
            if name == "output_layer" and not checkpoint.args.untie_embeddings_and_output_weights:
                continue
            state[key] = checkpoint.model_tensor(name).float()
        result = model.load_state_dict(state, strict=False)
    missing = [key for key in result.missing_keys if not key.endswith("_extra_state")]
    if missing:
        raise ConversionError(f"the Megatron model's weights {missing} were not in the checkpoint")


def megatron_logits(checkpoint: Any, tokens: torch.Tensor) -> torch.Tensor:
    model = build_megatron_model(checkpoint.args)
    _load_megatron_weights(model, checkpoint)
    length = tokens.shape[1]
    position_ids = torch.arange(length).unsqueeze(0).expand_as(tokens)
    causal_mask = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)[None, None]
    with torch.no_grad():
        return model(tokens, position_ids, causal_mask, labels=None).float()


def hf_logits(hf_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def verify_pair(checkpoint_path: str, hf_dir: str, tolerance: float, iteration: int | None = None) -> dict[str, Any]:
    from transformers import AutoConfig

    from mile_megatron.convert.checkpoint_reader import open_checkpoint

    config = AutoConfig.from_pretrained(hf_dir)
    with open_checkpoint(checkpoint_path, iteration) as checkpoint:
        vocab = int(config.vocab_size)
        tokens = sample_tokens(vocab, int(checkpoint.args.seq_length), config.bos_token_id)
        reference = megatron_logits(checkpoint, tokens)
        location = checkpoint.location
    converted = hf_logits(hf_dir, tokens)
    if reference.shape[:2] != converted.shape[:2] or converted.shape[-1] != vocab:
        raise RuntimeError(f"logit shapes differ: Megatron {tuple(reference.shape)}, HF {tuple(converted.shape)}")
    difference = float((reference[..., :vocab] - converted).abs().max())
    return {"checkpoint": str(location.directory), "format": location.format, "hf": str(hf_dir),
            "tokens": int(tokens.numel()), "max_abs_diff": difference, "tolerance": tolerance,
            "max_abs_logit": float(reference[..., :vocab].abs().max()), "ok": difference <= tolerance}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mile_megatron.convert.verify", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="Megatron checkpoint (save dir or iter_* dir)")
    parser.add_argument("--hf", help="converted Hugging Face model directory")
    parser.add_argument("--iteration", type=int, default=None)
    parser.add_argument("--pair", nargs=2, action="append", default=[], metavar=("CHECKPOINT", "HF_DIR"),
                        help="more (checkpoint, HF dir) pairs, verified in the same process")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    options = parser.parse_args(argv)
    pairs = ([(options.checkpoint, options.hf, options.iteration)] if options.checkpoint else []) + [
        (checkpoint, hf, None) for checkpoint, hf in options.pair]
    if not pairs or (options.checkpoint is None) != (options.hf is None):
        parser.error("give --checkpoint and --hf, or --pair CHECKPOINT HF_DIR")
    from mile_megatron.convert import ConversionError

    all_ok = True
    with tempfile.TemporaryDirectory(prefix="mile-verify-") as workdir:
        try:
            _initialize_megatron_single_process(workdir)
            for checkpoint, hf_dir, iteration in pairs:
                result = verify_pair(checkpoint, hf_dir, options.tolerance, iteration)
                all_ok &= result["ok"]
                print(json.dumps(result), flush=True)
        except (ConversionError, RuntimeError, OSError) as error:
            print(f"verify: error: {error}", file=sys.stderr)
            return 2
        finally:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    return 0 if all_ok else 1


if __name__ == "__main__":
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    sys.exit(main())
