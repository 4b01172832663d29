"""Megatron's pretraining data for Hugging Face models: a thin adapter over megatron-core's dataset classes.

The same inputs as mile-pretrain, read by the same code: Megatron's own argument parser (flag names and
defaults), megatron.training.utils.get_blend_and_blend_per_split (--data-path prefixes with optional weights,
--data-args-path + --split, --per-split-data-args-path JSON, as written by mile-preprocess under blends/),
BlendedMegatronDatasetBuilder + GPTDataset + GPTDatasetConfig, Megatron's tokenizer builder (SentencePiece
model, Hugging Face tokenizer directory, or NullTokenizer) for the eod id of --eod-mask-loss, and Megatron's
MegatronPretrainingSampler for the order in which samples reach the data-parallel ranks.

Samples are Megatron's: tokens = text[0:S], labels = text[1:S+1] (already shifted: labels[t] is the target of
the prediction at position t), loss_mask (0 at padding, and at positions whose input token is EOD with
eod_mask_loss), position_ids. Score them with mile_megatron.hf.loss.causal_lm_loss(logits, batch["labels"],
loss_mask=batch["loss_mask"], shift=False).

Resume: Megatron's sampler hands micro-batch k (k = 0, 1, ...) of the run the samples
consumed_samples + k * micro_batch_size * dp_size + dp_rank * micro_batch_size + [0, micro_batch_size); a run
restarted with consumed_samples = steps_done * global_batch_size continues exactly where the previous one
stopped, and the dataset (same config and sample counts) is the same sequence of samples in both engines.

torch.distributed: when initialised, the builder builds (and caches the indices) on rank 0 first, then on the
other ranks after a barrier over the default group, so every rank must call build_datasets. Without
torch.distributed everything happens in this process.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
TOKENIZER_TYPES = ("GPTSentencePieceTokenizer", "Llama2Tokenizer", "SentencePieceTokenizer", "HuggingFaceTokenizer",
                   "NullTokenizer")


def megatron_args(flags: Sequence[str] = ()) -> argparse.Namespace:
    """Megatron's own argument parser (the one mile-pretrain uses) on `flags`; every other flag keeps its
    Megatron default. Only parsing: no validation, no global state."""
    from megatron.training.arguments import add_megatron_arguments

    parser = argparse.ArgumentParser(prog="mile_megatron.hf.data", allow_abbrev=False, exit_on_error=False)
    add_megatron_arguments(parser)
    try:
        return parser.parse_args(list(flags))
    except (argparse.ArgumentError, SystemExit) as error:
        raise ValueError(f"Megatron's argument parser rejected {list(flags)}: {error}") from None


def build_tokenizer(*, tokenizer_model: str | None = None, hf_tokenizer: str | None = None,
                    vocab_size: int | None = None, tokenizer_type: str | None = None,
                    extra_flags: Sequence[str] = ()) -> Any:
    """Megatron's tokenizer (megatron.core.tokenizers), as mile-pretrain builds it: `.eod`, `.bos`, `.pad`,
    `.vocab_size`, `.tokenize(text)`.

    tokenizer_type None picks: hf_tokenizer (a directory) -> HuggingFaceTokenizer; tokenizer_model (a
    SentencePiece .model, e.g. LLaMA's) -> GPTSentencePieceTokenizer (bos = bos_id(), eod = eos_id());
    vocab_size only -> NullTokenizer (synthetic ids 0..vocab_size-1, eod = vocab_size - 1, no pad).
    """
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer as megatron_build_tokenizer

    if tokenizer_model and hf_tokenizer:
        raise ValueError("give either tokenizer_model (a SentencePiece .model) or hf_tokenizer (a Hugging Face "
                         "tokenizer directory), not both")
    if tokenizer_type is None:
        if hf_tokenizer:
            tokenizer_type = "HuggingFaceTokenizer"
        elif tokenizer_model:
            tokenizer_type = "GPTSentencePieceTokenizer"
        elif vocab_size:
            tokenizer_type = "NullTokenizer"
        else:
            raise ValueError("no tokenizer: give tokenizer_model (SentencePiece .model), hf_tokenizer (directory), "
                             "or vocab_size (synthetic ids, NullTokenizer)")
    if tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(f"unsupported tokenizer type {tokenizer_type!r}; choose one of {', '.join(TOKENIZER_TYPES)}")
    path = hf_tokenizer or tokenizer_model
    if tokenizer_type != "NullTokenizer":
        if not path:
            raise ValueError(f"{tokenizer_type} needs tokenizer_model (SentencePiece) or hf_tokenizer (directory)")
        if not os.path.exists(path):
            raise ValueError(f"tokenizer {path} does not exist; give the SentencePiece .model file or the Hugging "
                             "Face tokenizer directory used by mile-preprocess")
    elif not vocab_size or vocab_size < 1:
        raise ValueError("NullTokenizer needs vocab_size >= 1 (the number of synthetic token ids)")
    flags = ["--tokenizer-type", tokenizer_type]
    if path:
        flags += ["--tokenizer-model", str(path)]
    if vocab_size:
        flags += ["--vocab-size", str(int(vocab_size))]
    args = megatron_args([*flags, *extra_flags])
    args.rank = 0
    args.pad_vocab_size = False  # the padded size is Megatron's model concern, not the data's
    return megatron_build_tokenizer(args)


def train_valid_test_num_samples(train_iters: int, global_batch_size: int, eval_interval: int | None = None,
                                 eval_iters: int = 0, full_validation: bool = False) -> list[int | None]:
    """Sample counts Megatron requests from the builder for a run of train_iters steps (so both engines build
    identical datasets): [train_iters * B, (train_iters // eval_interval + 1) * eval_iters * B, eval_iters * B];
    the validation count is None with full_validation (Megatron then uses every validation sample once)."""
    if train_iters < 0 or global_batch_size < 1 or eval_iters < 0:
        raise ValueError("train_iters and eval_iters must be >= 0 and global_batch_size >= 1")
    evaluations = train_iters // eval_interval + 1 if eval_interval else 1
    valid = None if full_validation else evaluations * eval_iters * global_batch_size
    return [train_iters * global_batch_size, valid, eval_iters * global_batch_size]


def _check_prefixes(blend: Any, what: str) -> None:
    if blend is None:
        return
    prefixes, _ = blend
    for prefix in prefixes:
        missing = [suffix for suffix in (".bin", ".idx") if not os.path.isfile(prefix + suffix)]
        if missing:
            raise ValueError(f"{what}: dataset prefix {prefix} has no {' or '.join(prefix + s for s in missing)}; give "
                             "the path without .bin/.idx, as mile-preprocess writes them (see its blends/ files)")


def gpt_dataset_config(args: argparse.Namespace, tokenizer: Any) -> Any:
    """mile-pretrain's GPTDatasetConfig (the same fields, so both engines build identical datasets) with an explicit
    tokenizer and no attention masks (HF models make their own causal mask); missing dataset files are named."""
    from megatron.training.utils import get_blend_and_blend_per_split

    from mile_megatron.data.gpt_dataset import gpt_dataset_config as megatron_gpt_dataset_config

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    _check_prefixes(blend, "--data-path / --data-args-path")
    for name, split_blend in zip(("train", "valid", "test"), blend_per_split or ()):
        _check_prefixes(split_blend, f"per-split data ({name})")
    return megatron_gpt_dataset_config(args, tokenizer, create_attention_mask=False)


def _as_list(value: str | Sequence[str]) -> list[str]:
    return value.split() if isinstance(value, str) else [str(item) for item in value]


def build_datasets(tokenizer: Any, num_samples: Sequence[int | None], *, seq_length: int, seed: int = 1234,
                   data_path: str | Sequence[str] | None = None, per_split_data_args_path: str | None = None,
                   data_args_path: str | None = None, split: str | None = None, eod_mask_loss: bool = True,
                   mock_data: bool = False, extra_flags: Sequence[str] = (),
                   is_built_on_rank: Callable[[], bool] | None = None) -> list[Any]:
    """[train, valid, test] Megatron GPTDatasets (valid may be a list with --multiple-validation-sets; None for a
    split with no data or no samples) built by BlendedMegatronDatasetBuilder.

    Data (exactly one source): data_path = Megatron's --data-path list ("prefix" or "w1 prefix1 w2 prefix2 ...")
    with split ("969,30,1" when not given, Megatron's legacy default); data_args_path = a blends/data_args.txt
    with split; per_split_data_args_path = a blends/per_split_data_args.json; mock_data = Megatron's mock data.
    num_samples: per split (see train_valid_test_num_samples; valid None with --full-validation).
    seed: Megatron's --seed (dataset shuffling).
    extra_flags: any other Megatron data flag, e.g. ["--reset-position-ids", "--data-cache-path", DIR].
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset

    sources = [name for name, value in (("data_path", data_path), ("data_args_path", data_args_path),
                                        ("per_split_data_args_path", per_split_data_args_path),
                                        ("mock_data", mock_data)) if value]
    if len(sources) != 1:
        raise ValueError("give exactly one data source: data_path, data_args_path (+ split), "
                         f"per_split_data_args_path or mock_data (got {', '.join(sources) or 'none'})")
    for path in (data_args_path, per_split_data_args_path):
        if path and not os.path.isfile(path):
            raise ValueError(f"blend file {path} does not exist (mile-preprocess writes OUT/blends/data_args.txt and "
                             "OUT/blends/per_split_data_args.json)")
    if (data_path or data_args_path) and split is None:
        split = "969, 30, 1"
    if len(num_samples) != 3:
        raise ValueError(f"num_samples must hold three counts (train, valid, test), got {list(num_samples)}")
    flags = ["--seq-length", str(int(seq_length)), "--seed", str(int(seed))]
    if data_path:
        flags += ["--data-path", *_as_list(data_path)]
    if data_args_path:
        flags += ["--data-args-path", str(data_args_path)]
    if per_split_data_args_path:
        flags += ["--per-split-data-args-path", str(per_split_data_args_path)]
    if split is not None:
        flags += ["--split", str(split)]
    if eod_mask_loss:
        flags.append("--eod-mask-loss")
    if mock_data:
        flags.append("--mock-data")
    args = megatron_args([*flags, *extra_flags])
    config = gpt_dataset_config(args, tokenizer)
    builder = BlendedMegatronDatasetBuilder(MockGPTDataset if mock_data else GPTDataset, list(num_samples),
                                           is_built_on_rank or (lambda: True), config)
    return builder.build()


def _collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    batch = {key: torch.stack([sample[key] for sample in samples]) for key in BATCH_KEYS}
    batch["tokens"], batch["labels"], batch["position_ids"] = (
        batch["tokens"].long(), batch["labels"].long(), batch["position_ids"].long())
    batch["loss_mask"] = batch["loss_mask"].float()
    return batch


def pretraining_loader(dataset: Any, *, consumed_samples: int, micro_batch_size: int, dp_rank: int = 0,
                       dp_size: int = 1, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """Micro-batches {tokens, labels, loss_mask, position_ids} ([micro_batch_size, S]; int64 / float32 mask) of
    this data-parallel rank, in Megatron's order (MegatronPretrainingSampler), starting after consumed_samples
    samples of the whole run (all DP ranks and micro-batches counted). The last incomplete round is dropped."""
    from megatron.training.datasets.data_samplers import MegatronPretrainingSampler

    if dataset is None:
        raise ValueError("no dataset for this split (its sample count or blend is empty)")
    if not 0 <= dp_rank < dp_size or micro_batch_size < 1:
        raise ValueError(f"need 0 <= dp_rank < dp_size and micro_batch_size >= 1 (got dp_rank {dp_rank}, dp_size "
                         f"{dp_size}, micro_batch_size {micro_batch_size})")
    if not 0 <= consumed_samples < len(dataset):
        raise ValueError(f"consumed_samples {consumed_samples} is outside the dataset's {len(dataset)} samples; "
                         "build the datasets for the whole run (train_valid_test_num_samples)")
    sampler = MegatronPretrainingSampler(total_samples=len(dataset), consumed_samples=consumed_samples,
                                         micro_batch_size=micro_batch_size, data_parallel_rank=dp_rank,
                                         data_parallel_size=dp_size)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       collate_fn=_collate, persistent_workers=num_workers > 0)


def micro_batches(dataset: Any, *, consumed_samples: int, micro_batch_size: int, dp_rank: int = 0,
                  dp_size: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """pretraining_loader's batches without worker processes (an iterator)."""
    return iter(pretraining_loader(dataset, consumed_samples=consumed_samples, micro_batch_size=micro_batch_size,
                                   dp_rank=dp_rank, dp_size=dp_size))
