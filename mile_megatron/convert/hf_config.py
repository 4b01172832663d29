"""Model shape from saved Megatron arguments, Hugging Face LlamaConfig from it, and the reverse.

Only what a LlamaForCausalLM computes exactly is converted: RMSNorm, SwiGLU, rotary embeddings
(rotate-half, full head dim, no scaling), no biases, pre-norm residuals, no MoE / MLA / MTP /
QK-norm. Anything else is refused with the setting named, never approximated.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import Any

import torch

from mile_megatron.convert import ConversionError

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class ModelShape:
    """Everything that fixes a LLaMA model's tensors and computation."""
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int           # the tokenizer's vocabulary (what HF sees)
    padded_vocab_size: int    # rows in Megatron's embedding / output layer
    max_position_embeddings: int
    norm_epsilon: float
    rope_theta: float
    zero_centered_norm: bool
    tied_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _get(args: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        if hasattr(args, name):
            return getattr(args, name)
    return default


def unsupported_megatron_settings(args: argparse.Namespace) -> list[str]:
    """Names of the saved settings a LlamaForCausalLM cannot reproduce exactly (empty: convertible)."""
    problems: list[str] = []

    def refuse(condition: bool, message: str) -> None:
        if condition:
            problems.append(message)

    refuse(bool(_get(args, "add_bias_linear", default=False)), "linear biases (--add-bias-linear); train with "
           "--disable-bias-linear")
    refuse(bool(_get(args, "add_qkv_bias", default=False)), "QKV biases (--add-qkv-bias)")
    refuse(_get(args, "position_embedding_type", default="learned_absolute") != "rope",
           f"position embeddings {_get(args, 'position_embedding_type')!r} (LLaMA uses --position-embedding-type rope)")
    refuse(bool(_get(args, "num_experts")), f"mixture of experts (--num-experts {_get(args, 'num_experts')})")
    refuse(_get(args, "normalization", default="LayerNorm") != "RMSNorm",
           f"normalization {_get(args, 'normalization')!r} (LLaMA uses RMSNorm)")
    refuse(not _get(args, "swiglu", default=False), "MLP activation is not SwiGLU (--swiglu was not set)")
    refuse(bool(_get(args, "qk_layernorm", default=False)), "QK layer norm (--qk-layernorm)")
    refuse(bool(_get(args, "qk_l2_norm", default=False)), "QK L2 norm (--qk-l2-norm)")
    refuse(bool(_get(args, "multi_latent_attention", default=False)), "multi-latent attention")
    refuse(bool(_get(args, "mtp_num_layers")), "multi-token prediction layers (--mtp-num-layers)")
    refuse(bool(_get(args, "rotary_interleaved", default=False)), "interleaved rotary embeddings (--rotary-interleaved)")
    refuse(float(_get(args, "rotary_percent", default=1.0)) != 1.0,
           f"partial rotary embeddings (--rotary-percent {_get(args, 'rotary_percent')})")
    refuse(bool(_get(args, "use_rope_scaling", default=False)), "rope scaling (--use-rope-scaling)")
    refuse(_get(args, "rotary_seq_len_interpolation_factor") not in (None, 1, 1.0),
           "rotary sequence-length interpolation (--rotary-seq-len-interpolation-factor)")
    refuse(bool(_get(args, "no_rope_freq")), "layers without rope (--no-rope-freq)")
    refuse(bool(_get(args, "apply_residual_connection_post_layernorm", default=False)),
           "post-norm residuals (--apply-residual-connection-post-layernorm)")
    refuse(bool(_get(args, "attention_output_gate", default=False)), "attention output gate")
    refuse(_get(args, "window_size") is not None, "sliding-window attention (--window-size)")
    refuse(_get(args, "softmax_type", default="vanilla") != "vanilla",
           f"attention softmax type {_get(args, 'softmax_type')!r}")
    refuse(_get(args, "experimental_attention_variant") is not None, "experimental attention variant")
    refuse(bool(_get(args, "heterogeneous_layers_config_path")), "heterogeneous layers")
    refuse(bool(_get(args, "hybrid_layer_pattern")), "hybrid (Mamba) layers")
    refuse(float(_get(args, "glu_linear_offset", default=0.0)) != 0.0, "GLU linear offset (--glu-linear-offset)")
    refuse(_get(args, "activation_func_clamp_value") is not None, "activation clamping")
    refuse(float(_get(args, "mup_embedding_mult", default=1.0)) != 1.0, "muP embedding multiplier")
    refuse(int(_get(args, "expert_model_parallel_size", default=1)) > 1, "expert model parallelism")
    return problems


def check_megatron_args(args: argparse.Namespace) -> None:
    problems = unsupported_megatron_settings(args)
    if problems:
        raise ConversionError("this checkpoint cannot be represented faithfully as a Hugging Face LlamaForCausalLM:"
                              "\n  - " + "\n  - ".join(problems))


def shape_from_megatron_args(args: argparse.Namespace, vocab_size: int | None,
                             bos_token_id: int | None, eos_token_id: int | None) -> ModelShape:
    """ModelShape of a checkpoint; vocab_size None keeps the padded vocabulary."""
    check_megatron_args(args)
    heads = int(args.num_attention_heads)
    groups = int(args.num_query_groups) if _get(args, "group_query_attention", default=False) else heads
    head_dim = int(_get(args, "kv_channels") or args.hidden_size // heads)
    padded = int(args.padded_vocab_size)
    if vocab_size is not None and not 0 < vocab_size <= padded:
        raise ConversionError(f"vocabulary size {vocab_size} does not fit the checkpoint's {padded} embedding rows")
    return ModelShape(
        num_layers=int(args.num_layers),
        hidden_size=int(args.hidden_size),
        ffn_hidden_size=int(args.ffn_hidden_size),
        num_attention_heads=heads,
        num_query_groups=groups,
        head_dim=head_dim,
        vocab_size=int(vocab_size if vocab_size is not None else padded),
        padded_vocab_size=padded,
        max_position_embeddings=int(_get(args, "max_position_embeddings", "seq_length")),
        norm_epsilon=float(_get(args, "layernorm_epsilon", "norm_epsilon", default=1e-5)),
        rope_theta=float(_get(args, "rotary_base", default=10000)),
        zero_centered_norm=bool(_get(args, "layernorm_zero_centered_gamma", "apply_layernorm_1p", default=False)),
        tied_embeddings=not bool(_get(args, "untie_embeddings_and_output_weights", default=False)),
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )


def llama_config(shape: ModelShape, dtype: torch.dtype) -> Any:
    """transformers.LlamaConfig computing what the Megatron model computes."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.ffn_hidden_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_query_groups,
        head_dim=shape.head_dim,
        hidden_act="silu",
        max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=shape.norm_epsilon,
        rope_theta=shape.rope_theta,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=shape.tied_embeddings,
        bos_token_id=shape.bos_token_id,
        eos_token_id=shape.eos_token_id,
        pad_token_id=None,
        dtype=dtype,
        architectures=["LlamaForCausalLM"],
    )


def _rope_theta(config: Any) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    rope_type = parameters.get("rope_type", "default") if isinstance(parameters, dict) else "default"
    scaling = getattr(config, "rope_scaling", None)
    if rope_type not in ("default", None) or (isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type"))
                                              not in (None, "default")):
        raise ConversionError(f"rope scaling {parameters or scaling} has no Megatron --position-embedding-type rope "
                              "equivalent in mile-pretrain")
    theta = parameters.get("rope_theta") if isinstance(parameters, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


def shape_from_hf_config(config: Any, tensor_parallel_size: int, make_vocab_size_divisible_by: int) -> ModelShape:
    """ModelShape of a Hugging Face LLaMA config (refuses what Megatron's LLaMA GPTModel cannot compute)."""
    from mile_megatron.convert.layout import padded_vocab_size

    problems: list[str] = []
    if getattr(config, "model_type", None) != "llama":
        problems.append(f"model_type {getattr(config, 'model_type', None)!r} (only 'llama' is supported)")
    if getattr(config, "attention_bias", False):
        problems.append("attention_bias=true (mile-pretrain trains without biases)")
    if getattr(config, "mlp_bias", False):
        problems.append("mlp_bias=true (mile-pretrain trains without biases)")
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config.hidden_act!r} (SwiGLU needs silu)")
    if problems:
        raise ConversionError("this Hugging Face model cannot be represented by mile-pretrain's GPTModel:\n  - "
                              + "\n  - ".join(problems))
    heads = int(config.num_attention_heads)
    groups = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    vocab = int(config.vocab_size)
    eos = config.eos_token_id
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return ModelShape(
        num_layers=int(config.num_hidden_layers),
        hidden_size=int(config.hidden_size),
        ffn_hidden_size=int(config.intermediate_size),
        num_attention_heads=heads,
        num_query_groups=groups,
        head_dim=head_dim,
        vocab_size=vocab,
        padded_vocab_size=padded_vocab_size(vocab, make_vocab_size_divisible_by, tensor_parallel_size),
        max_position_embeddings=int(config.max_position_embeddings),
        norm_epsilon=float(config.rms_norm_eps),
        rope_theta=_rope_theta(config),
        zero_centered_norm=False,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        bos_token_id=config.bos_token_id,
        eos_token_id=eos,
    )


def megatron_model_flags(shape: ModelShape) -> list[str]:
    """The mile-pretrain architecture flags that build a GPTModel with this shape."""
    flags = [
        "--num-layers", str(shape.num_layers),
        "--hidden-size", str(shape.hidden_size),
        "--ffn-hidden-size", str(shape.ffn_hidden_size),
        "--num-attention-heads", str(shape.num_attention_heads),
        "--kv-channels", str(shape.head_dim),
        "--max-position-embeddings", str(shape.max_position_embeddings),
        "--norm-epsilon", repr(shape.norm_epsilon),
        "--rotary-base", repr(shape.rope_theta) if shape.rope_theta != int(shape.rope_theta)
        else str(int(shape.rope_theta)),
    ]
    if shape.num_query_groups != shape.num_attention_heads:
        flags += ["--group-query-attention", "--num-query-groups", str(shape.num_query_groups)]
    return flags
