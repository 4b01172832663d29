"""The paper's LLaMA models (468M / 1.2B / 6.7B, and the tiny CPU model) as Hugging Face LlamaForCausalLM.

The shapes come from mile_megatron.presets (the flags mile-pretrain uses), so both engines build the same
architecture: RMSNorm eps 1e-5, SwiGLU, RoPE theta 10000 over the full head dimension, no biases, untied
embeddings, no GQA. The config is made by mile_megatron.convert.hf_config.llama_config, the one used to convert
Megatron checkpoints, so a converted checkpoint and a freshly built model have identical configs.
Initialisation (the paper): every linear and embedding weight from N(0, init_std) (0.01 for the paper presets,
the tiny preset's 0.02 otherwise), RMSNorm weights 1 — transformers' own LLaMA initialisation.
"""

from __future__ import annotations

from typing import Any

import torch

from mile_megatron.presets import LLAMA_ARCHITECTURE_FLAGS, PRESET_NAMES, preset_flags


def _flag_values(flags: list[str]) -> dict[str, str]:
    """{"--name": value} for the valued flags of a flat flag list (switches map to "")."""
    values: dict[str, str] = {}
    index = 0
    while index < len(flags):
        name = flags[index]
        if index + 1 < len(flags) and not flags[index + 1].startswith("--"):
            values[name] = flags[index + 1]
            index += 2
        else:
            values[name] = ""
            index += 1
    return values


def preset_values(preset: str) -> dict[str, str]:
    """The LLaMA architecture flags followed by preset `preset`'s flags, as {"--flag": value} (later wins)."""
    if preset not in PRESET_NAMES:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESET_NAMES)}")
    return _flag_values(list(LLAMA_ARCHITECTURE_FLAGS) + preset_flags(preset))


def llama_config(preset: str, vocab_size: int, *, seq_length: int | None = None,
                 bos_token_id: int | None = None, eos_token_id: int | None = None,
                 init_std: float | None = None, dtype: torch.dtype = torch.float32) -> Any:
    """transformers.LlamaConfig of preset `preset` with `vocab_size` output rows.

    seq_length: max_position_embeddings (default: the preset's sequence length; RoPE has no learned positions,
    so it only bounds the inputs). init_std: config.initializer_range (default: the preset's
    --init-method-std). dtype: the config's recorded dtype (what save_pretrained writes as "dtype").
    vocab_size is used as given: pass the tokenizer's size (Megatron would pad it to a multiple of 128 x TP;
    give the padded size to make the two models' softmax identical).
    """
    from mile_megatron.convert.hf_config import ModelShape
    from mile_megatron.convert.hf_config import llama_config as config_from_shape

    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive (got {vocab_size})")
    values = preset_values(preset)
    heads = int(values["--num-attention-heads"])
    length = int(seq_length if seq_length is not None else values["--max-position-embeddings"])
    if length < 1:
        raise ValueError(f"seq_length must be positive (got {seq_length})")
    shape = ModelShape(
        num_layers=int(values["--num-layers"]),
        hidden_size=int(values["--hidden-size"]),
        ffn_hidden_size=int(values["--ffn-hidden-size"]),
        num_attention_heads=heads,
        num_query_groups=heads,
        head_dim=int(values["--kv-channels"]),
        vocab_size=int(vocab_size),
        padded_vocab_size=int(vocab_size),
        max_position_embeddings=length,
        norm_epsilon=float(values["--norm-epsilon"]),
        rope_theta=float(values["--rotary-base"]),
        zero_centered_norm=False,
        tied_embeddings="--untie-embeddings-and-output-weights" not in values,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    config = config_from_shape(shape, dtype)
    config.initializer_range = float(init_std if init_std is not None else values["--init-method-std"])
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
