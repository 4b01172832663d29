"""The paper's LLaMA models (468M / 1.2B / 6.7B, and the tiny CPU model) as Hugging Face LlamaForCausalLM.

The shapes come from mile_megatron.recipes (the same typed data mile-pretrain turns into Megatron flags), so both
engines build the same architecture: RMSNorm eps 1e-5, SwiGLU, RoPE theta 10000 over the full head dimension, no
biases, untied embeddings, no GQA. The config is made by mile_megatron.convert.hf_config.llama_config, the one used to convert
Megatron checkpoints, so a converted checkpoint and a freshly built model have identical configs.
Initialisation (the paper): every linear and embedding weight from N(0, init_std) (0.01 for the paper recipes,
the tiny preset's 0.02 otherwise), RMSNorm weights 1 — transformers' own LLaMA initialisation.
"""

from __future__ import annotations

from typing import Any

import torch

from mile_megatron.recipes import LLAMA_NORM_EPSILON, LLAMA_ROPE_THETA, recipe


def llama_config(preset: str, vocab_size: int, *, seq_length: int | None = None,
                 bos_token_id: int | None = None, eos_token_id: int | None = None,
                 init_std: float | None = None, dtype: torch.dtype = torch.float32) -> Any:
    """transformers.LlamaConfig of recipe `preset` (mile_megatron.recipes) with `vocab_size` output rows.

    seq_length: max_position_embeddings (default: the recipe's sequence length; RoPE has no learned positions,
    so it only bounds the inputs). init_std: config.initializer_range (default: the recipe's init std). dtype: the
    config's recorded dtype (what save_pretrained writes as "dtype"). vocab_size is used as given: pass the
    tokenizer's size (Megatron would pad it to a multiple of 128 x TP; give the padded size to make the two
    models' softmax identical).
    """
    from mile_megatron.convert.hf_config import ModelShape
    from mile_megatron.convert.hf_config import llama_config as config_from_shape

    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive (got {vocab_size})")
    chosen = recipe(preset)
    architecture = chosen.architecture
    length = int(seq_length if seq_length is not None else architecture.seq_length)
    if length < 1:
        raise ValueError(f"seq_length must be positive (got {seq_length})")
    shape = ModelShape(
        num_layers=architecture.num_layers,
        hidden_size=architecture.hidden_size,
        ffn_hidden_size=architecture.ffn_hidden_size,
        num_attention_heads=architecture.num_attention_heads,
        num_query_groups=architecture.num_attention_heads,
        head_dim=architecture.kv_channels,
        vocab_size=int(vocab_size),
        padded_vocab_size=int(vocab_size),
        max_position_embeddings=length,
        norm_epsilon=LLAMA_NORM_EPSILON,
        rope_theta=LLAMA_ROPE_THETA,
        zero_centered_norm=False,
        tied_embeddings=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    config = config_from_shape(shape, dtype)
    config.initializer_range = float(init_std if init_std is not None else chosen.training.init_method_std)
    return config


def build_model(config: Any, seed: int = 111, init_std: float | None = None) -> Any:
    """A freshly initialised fp32 LlamaForCausalLM: weights N(0, init_std) (default config.initializer_range),
    norms 1, drawn from torch's generator seeded with `seed` (the same seed gives the same weights)."""
    from transformers import LlamaForCausalLM

    if init_std is not None:
        if not init_std > 0:
            raise ValueError(f"init_std must be positive (got {init_std})")
        config.initializer_range = float(init_std)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model.float()
