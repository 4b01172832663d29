"""MiLe for Hugging Face causal LMs: the loss (transformers hooks), the paper's LLaMA configs, and Megatron's data.

    loss:   causal_lm_loss, causal_lm_loss_terms, MileCausalLMLoss, use_mile_loss   (mile_megatron.hf.loss)
    models: llama_config, build_model                                   (mile_megatron.hf.models)
    data:   build_tokenizer, build_datasets, train_valid_test_num_samples, pretraining_loader
                                                                        (mile_megatron.hf.data)

Exports are resolved lazily: importing the package loads neither transformers nor Megatron.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "causal_lm_loss": "loss",
    "causal_lm_loss_terms": "loss",
    "MileCausalLMLoss": "loss",
    "use_mile_loss": "loss",
    "llama_config": "models",
    "build_model": "models",
    "build_tokenizer": "data",
    "build_datasets": "data",
    "train_valid_test_num_samples": "data",
    "pretraining_loader": "data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mile_megatron.hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
