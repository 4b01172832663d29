"""megatron-core's GPTDatasetConfig from Megatron's parsed arguments: how both engines read the indexed datasets.

megatron-core's wheel ships the dataset classes but not the builder of their config (it lives in Megatron-LM's
pretrain_gpt.py script); this is that builder, field by field. Every init field of GPTDatasetConfig is either
taken from the arguments (FIELDS, in the way upstream's script does it) or deliberately left at megatron-core's
default (LEFT_AT_DEFAULT, with the reason). A field that a newer megatron-core adds falls in neither set, and
gpt_dataset_config raises, naming it, instead of silently dropping it (tests check the same on the pinned
version). Settings these engines cannot train with are refused by name (UNSUPPORTED).

megatron is imported inside the functions only: mile_megatron.data stays importable without torch.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from mile_megatron.utils.errors import UsageError

# GPTDatasetConfig field -> how to read it from Megatron's arguments.
FIELDS: dict[str, Any] = {
    "random_seed": lambda a: a.seed,
    "sequence_length": lambda a: a.seq_length,
    "split": lambda a: a.split,
    "multiple_validation_sets": lambda a: a.multiple_validation_sets,
    "full_validation": lambda a: a.full_validation,
    "num_dataset_builder_threads": lambda a: a.num_dataset_builder_threads,
    "path_to_cache": lambda a: a.data_cache_path,
    "mmap_bin_files": lambda a: a.mmap_bin_files,
    "mid_level_dataset_surplus": lambda a: a.mid_level_dataset_surplus,
    "allow_ambiguous_pad_tokens": lambda a: getattr(a, "allow_ambiguous_pad_tokens", False),
    "fast_cache_load": lambda a: getattr(a, "dataloader_fast_cache_load", False),
    "defer_npy_index_mmap": lambda a: getattr(a, "dataloader_defer_npy_index_mmap", False),
    "reset_position_ids": lambda a: a.reset_position_ids,
    "reset_attention_mask": lambda a: a.reset_attention_mask,
    "eod_mask_loss": lambda a: a.eod_mask_loss,
    "object_storage_cache_path": lambda a: getattr(a, "object_storage_cache_path", None),
    "context_parallel_size": lambda a: a.context_parallel_size,
    "data_parallel_size": lambda a: getattr(a, "data_parallel_size", None) or 1,
    "sequence_parallel_size": lambda a: a.tensor_model_parallel_size * bool(a.sequence_parallel),
}
# Filled below from several arguments or from the caller.
COMPUTED = ("blend", "blend_per_split", "tokenizer", "create_attention_mask", "sequences_per_dataset")
LEFT_AT_DEFAULT = {
    "drop_last_partial_validation_sequence": "not a Megatron flag (upstream's script leaves it too)",
    "add_extra_token_to_sequence": "not a Megatron flag (upstream's script leaves it too)",
    "hybrid_context_parallel": "refused below (UNSUPPORTED)",
    "inter_document_masking": "refused below (UNSUPPORTED)",
}
# argument -> why these engines refuse it.
UNSUPPORTED = {
    "fim_data": "fill-in-the-middle data (--fim-data) needs upstream's FIM dataset and loss",
    "sft": "supervised fine-tuning data (--sft) packs sequences; these engines pretrain on packed documents",
    "hybrid_context_parallel": "hybrid context parallelism (--hybrid-context-parallel) needs packed sequences",
    "dataloader_inter_document_masking": "inter-document masking needs packed-sequence (THD) attention",
}


def unsupported_data_settings(args: argparse.Namespace) -> list[str]:
    """The data settings in `args` that these engines refuse, each with its reason."""
    return [reason for name, reason in UNSUPPORTED.items() if getattr(args, name, False)]


def gpt_dataset_config(args: argparse.Namespace, tokenizer: Any, create_attention_mask: bool | None = None) -> Any:
    """GPTDatasetConfig of `args` (Megatron's parsed arguments) with `tokenizer`; create_attention_mask None:
    --create-attention-mask-in-dataloader."""
    import dataclasses

    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.training.utils import get_blend_and_blend_per_split

    known = {field.name for field in dataclasses.fields(GPTDatasetConfig) if field.init}
    unexplained = known - set(FIELDS) - set(COMPUTED) - set(LEFT_AT_DEFAULT)
    if unexplained:
        raise UsageError(f"this megatron-core's GPTDatasetConfig has fields mile-megatron does not fill "
                         f"({', '.join(sorted(unexplained))}); use the supported megatron-core version "
                         "(tools/constraints.txt)")
    problems = unsupported_data_settings(args)
    if problems:
        raise UsageError("cannot read this data:\n  - " + "\n  - ".join(problems))
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    sequences_per_dataset = None
    if getattr(args, "per_dataset_sequences_path", None):
        with open(args.per_dataset_sequences_path) as handle:
            sequences_per_dataset = json.load(handle)
    values = {name: read(args) for name, read in FIELDS.items() if name in known}
    values.update(
        blend=blend, blend_per_split=blend_per_split, tokenizer=tokenizer,
        create_attention_mask=(args.create_attention_mask_in_dataloader if create_attention_mask is None
                               else create_attention_mask),
        sequences_per_dataset=sequences_per_dataset,
    )
    return GPTDatasetConfig(**{name: value for name, value in values.items() if name in known})
