"""Checkpoint conversion between Megatron (torch_dist or legacy torch, any TP/PP/VPP) and Hugging Face LLaMA.

    mile-convert-hf CHECKPOINT_DIR --output HF_DIR [--dtype bf16|fp16|fp32] [--verify]
    mile-convert-megatron HF_DIR --output MEGATRON_DIR --tensor-model-parallel-size T
                          --pipeline-model-parallel-size P [--ckpt-format torch_dist|torch]

Modules: checkpoint_reader (both Megatron formats, bounded memory), layout (tensor-parallel
merge/split, fused QKV and SwiGLU layouts, vocabulary padding, pipeline layer offsets),
hf_config (config.json from the saved Megatron args, and the reverse), to_hf / to_megatron (the
console scripts), verify (Megatron-vs-HF logit parity).
"""


class ConversionError(RuntimeError):
    """A checkpoint or model that cannot be converted; the message names the problem and the fix."""


__all__ = ["ConversionError"]
