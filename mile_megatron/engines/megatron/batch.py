"""The data side of mile-pretrain: Megatron's datasets and batch helpers.

Datasets: megatron-core's BlendedMegatronDatasetBuilder over GPTDataset (or MockGPTDataset) with the config of
mile_megatron.data.gpt_dataset (every GPTDatasetConfig field from the arguments, as upstream's script builds it).
Batches: TP rank 0 reads the micro-batch, megatron-core's tensor_parallel.broadcast_data sends it over the TP group
and get_batch_on_this_cp_rank cuts this rank's context-parallel share; the first and last pipeline stages read
batches, the middle stages nothing.
"""

from __future__ import annotations

from functools import partial
from typing import Any

BATCH_KEYS = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")


def _is_dataset_built_on_rank(vp_stage: int | None = None) -> bool:
    from megatron.core import parallel_state
    from megatron.training.utils import is_first_or_last_pipeline_stage

    return is_first_or_last_pipeline_stage(vp_stage) and parallel_state.get_tensor_model_parallel_rank() == 0


def train_valid_test_datasets_provider(train_val_test_num_samples: list[int], vp_stage: int | None = None):
    """Megatron indexed datasets (blends, per-split blends, multiple validation sets) or mock data."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset
    from megatron.training import get_args, get_tokenizer, print_rank_0

    from mile_megatron.data.gpt_dataset import gpt_dataset_config

    args = get_args()
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    print_rank_0("> building train, validation, and test datasets for GPT ...")
    datasets = BlendedMegatronDatasetBuilder(
        dataset_type, train_val_test_num_samples, partial(_is_dataset_built_on_rank, vp_stage=vp_stage),
        gpt_dataset_config(args, get_tokenizer()),
    ).build()
    print_rank_0("> finished creating GPT datasets ...")
    return datasets


train_valid_test_datasets_provider.is_distributed = True  # type: ignore[attr-defined]


def get_batch(data_iterator: Any, vp_stage: int | None = None) -> dict[str, Any]:
    """This rank's micro-batch: {tokens, labels, loss_mask, attention_mask, position_ids} (None where unused).

    TP rank 0 reads it and megatron-core's tensor_parallel.broadcast_data sends it over the TP group with its
    shapes (a last validation batch of --full-validation may be smaller than the micro-batch size, which
    get_batch_on_this_tp_rank's fixed-size receive buffers cannot take); get_batch_on_this_cp_rank then cuts this
    rank's context-parallel share.
    """
    import torch
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.utils import get_batch_on_this_cp_rank
    from megatron.training import get_args
    from megatron.training.utils import is_first_or_last_pipeline_stage

    if not is_first_or_last_pipeline_stage(vp_stage):
        return dict.fromkeys(BATCH_KEYS)
    args = get_args()
    data = next(data_iterator) if parallel_state.get_tensor_model_parallel_rank() == 0 else None
    batch: dict[str, Any] = dict(tensor_parallel.broadcast_data(["tokens", "labels", "position_ids"], data,
                                                                torch.int64))
    batch.update(tensor_parallel.broadcast_data(["loss_mask"], data, torch.float32))
    batch["attention_mask"] = None
    if args.create_attention_mask_in_dataloader:
        batch.update(tensor_parallel.broadcast_data(["attention_mask"], data, torch.bool))
    if args.context_parallel_size > 1:
        batch = get_batch_on_this_cp_rank({**batch, "cu_seqlens": None}, is_hybrid_cp=False,
                                          cp_group=parallel_state.get_context_parallel_group())
    return {key: batch.get(key) for key in BATCH_KEYS}
