"""mile_megatron.hf.data: Megatron's datasets, blends, tokenizers and sampler behind the Hugging Face engine.

Data: two tiny Megatron indexed datasets written with megatron-core's IndexedDatasetBuilder, laid out as
mile-preprocess lays them out (DIR/datasets/{train,valid}/<domain>), with blend files from
mile_megatron.data.blends.write_blends. Domain "low" holds tokens 0..29, domain "high" 30..59; every document
ends with the NullTokenizer's eod (63). The Megatron engine itself reads the same samples: see
test_cross_engine.py (first micro-batch of mile-pretrain == first micro-batch here). With torch.distributed
initialised (rank 0 builds the index cache, then a barrier), the adapter runs in mile-pretrain-ds's two-process
tests (test_pretrain_ds.py) and in test_cross_engine.py's DeepSpeed launch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mile_megatron.data.blends import write_blends
from mile_megatron.hf import data

VOCAB, EOD, SEQ = 64, 63, 16
DOMAINS = {"low": (0, 30), "high": (30, 60)}


def _write_domain(prefix: Path, low: int, high: int, documents: int, seed: int) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for _ in range(documents):
        length = int(rng.integers(5, 40))
        builder.add_document(np.append(rng.integers(low, high, length), EOD).astype(np.int32), [length + 1])
    builder.finalize(f"{prefix}.idx")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_data")
    splits: dict = {}
    for split, documents in (("train", 120), ("valid", 30)):
        domains = {}
        for index, (name, (low, high)) in enumerate(DOMAINS.items()):
            _write_domain(root / "datasets" / split / name, low, high, documents, seed=10 * index + len(split))
            domains[name] = {"safe_name": name, "documents": documents, "tokens": documents * 20}
        splits[split] = {"domains": domains}
    written = write_blends(root, root / "datasets", {"splits": splits}, default_weights="tokens")
    return root, written["files"]


@pytest.fixture(scope="module")
def tokenizer():
    return data.build_tokenizer(vocab_size=VOCAB)


def _prefix(root: Path, split: str, domain: str) -> str:
    return str((root / "datasets" / split / domain).resolve())


def _domain_of(tokens: torch.Tensor) -> set[str]:
    text = tokens[tokens != EOD]
    return {name for name, (low, high) in DOMAINS.items() if ((text >= low) & (text < high)).any()}


def test_null_sentencepiece_and_hf_tokenizers(tmp_path, tokenizer):
    import sentencepiece

    from mile_megatron.convert.hf_tokenizer import tokenizer_info

    assert (tokenizer.vocab_size, tokenizer.eod) == (VOCAB, EOD)
    words = ["loss", "entropy", "token", "model", "data"]
    sentences = [" ".join(words[(i + j) % 5] for j in range(8)) for i in range(50)]
    sentencepiece.SentencePieceTrainer.Train(
        sentence_iterator=iter(sentences), model_prefix=str(tmp_path / "spm"), vocab_size=300, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "spm.model"))
    spm = data.build_tokenizer(tokenizer_model=str(tmp_path / "spm.model"))
    assert (spm.bos, spm.eod, spm.vocab_size) == (processor.bos_id(), processor.eos_id(), 300)
    assert spm.tokenize("entropy loss") == processor.encode("entropy loss")
    info = tokenizer_info(argparse.Namespace(tokenizer_type="GPTSentencePieceTokenizer",
                                             tokenizer_model=str(tmp_path / "spm.model")))
    (tmp_path / "hf").mkdir()
    info.write(tmp_path / "hf")
    hf = data.build_tokenizer(hf_tokenizer=str(tmp_path / "hf"))
    assert hf.eod == processor.eos_id()
    for bad, message in (({}, "no tokenizer"), ({"tokenizer_model": str(tmp_path / "none.model")}, "does not exist"),
                         ({"tokenizer_model": "a", "hf_tokenizer": "b"}, "not both")):
        with pytest.raises(ValueError, match=message):
            data.build_tokenizer(**bad)


def test_samples_are_shifted_windows_with_the_eod_masked(corpus, tokenizer):
    root, _ = corpus
    train, valid, test = data.build_datasets(tokenizer, [20, 4, 0], seq_length=SEQ, seed=7,
                                             data_path=[_prefix(root, "train", "low")], split="90,10,0")
    assert test is None and len(train) >= 20 and len(valid) >= 4
    batch = next(iter(data.pretraining_loader(train, consumed_samples=0, micro_batch_size=4)))
    assert set(batch) == set(data.BATCH_KEYS) and batch["tokens"].shape == (4, SEQ)
    assert batch["tokens"].dtype == torch.int64 and batch["loss_mask"].dtype == torch.float32
    assert torch.equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])  # labels are pre-shifted
    assert torch.equal(batch["loss_mask"], (batch["tokens"] != EOD).float())  # --eod-mask-loss
    assert (batch["tokens"] == EOD).any() and _domain_of(batch["tokens"]) == {"low"}
    assert torch.equal(batch["position_ids"], torch.arange(SEQ).expand(4, SEQ))
    unmasked = data.build_datasets(tokenizer, [20, 4, 0], seq_length=SEQ, seed=7, eod_mask_loss=False,
                                   data_path=[_prefix(root, "train", "low")], split="90,10,0")[0]
    assert torch.equal(unmasked[0]["tokens"], train[0]["tokens"]) and bool(unmasked[0]["loss_mask"].all())


def test_sampler_is_megatrons_order_and_resume_continues_it(corpus, tokenizer):
    """DP rank r's k-th micro-batch holds samples c + k * m * D + r * m + [0, m); consumed c resumes the stream."""
    root, _ = corpus
    train = data.build_datasets(tokenizer, data.train_valid_test_num_samples(6, 8), seq_length=SEQ, seed=7,
                                data_path=[_prefix(root, "train", "high")], split="100,0,0")[0]
    micro, ranks = 2, 2
    for rank in range(ranks):
        batches = list(data.micro_batches(train, consumed_samples=0, micro_batch_size=micro, dp_rank=rank,
                                          dp_size=ranks))
        assert len(batches) == len(train) // (micro * ranks)
        for k, batch in enumerate(batches[:6]):
            expected = torch.stack([train[k * micro * ranks + rank * micro + i]["tokens"] for i in range(micro)])
            assert torch.equal(batch["tokens"], expected), (rank, k)
        resumed = list(data.micro_batches(train, consumed_samples=8, micro_batch_size=micro, dp_rank=rank,
                                          dp_size=ranks))
        assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(resumed, batches[2:]))
    with pytest.raises(ValueError, match="consumed_samples"):
        data.pretraining_loader(train, consumed_samples=len(train), micro_batch_size=2)


def test_blend_files_from_preprocessing(corpus, tokenizer):
    """--per-split-data-args-path, --data-args-path + --split and weighted --data-path, as mile-pretrain reads them."""
    root, files = corpus
    per_split = json.loads(Path(files["per_split_data_args.json"]).read_text())
    assert per_split["valid"] == [_prefix(root, "valid", "low"), _prefix(root, "valid", "high")]
    train, valid, _ = data.build_datasets(tokenizer, [40, None, 0], seq_length=SEQ, seed=3,
                                          per_split_data_args_path=files["per_split_data_args.json"],
                                          extra_flags=["--multiple-validation-sets", "--full-validation"])
    assert isinstance(valid, list) and len(valid) == 2  # one validation set per domain
    assert [_domain_of(v[0]["tokens"]) for v in valid] == [{"low"}, {"high"}]
    seen = set().union(*(_domain_of(train[i]["tokens"]) for i in range(40)))
    assert seen == {"low", "high"}

    mixed = data.build_datasets(tokenizer, [40, 0, 0], seq_length=SEQ, seed=3, split="100,0,0",
                                data_args_path=files["data_args.txt"])[0]
    assert set().union(*(_domain_of(mixed[i]["tokens"]) for i in range(40))) == {"low", "high"}

    blend = f"0.2 {_prefix(root, 'train', 'low')} 0.8 {_prefix(root, 'train', 'high')}"
    weighted = data.build_datasets(tokenizer, [200, 0, 0], seq_length=SEQ, seed=3, split="100,0,0",
                                   data_path=blend)[0]
    high = sum(_domain_of(weighted[i]["tokens"]) == {"high"} for i in range(200))
    assert 150 <= high <= 170  # Megatron's blending follows the weights to within a sample or two


def test_sample_counts_and_bad_sources(corpus, tokenizer):
    root, files = corpus
    assert data.train_valid_test_num_samples(100, 8, eval_interval=20, eval_iters=2) == [800, 96, 16]
    assert data.train_valid_test_num_samples(10, 4) == [40, 0, 0]
    assert data.train_valid_test_num_samples(10, 4, 5, 1, full_validation=True) == [40, None, 4]
    build = lambda **kw: data.build_datasets(tokenizer, [4, 0, 0], seq_length=SEQ, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="exactly one data source"):
        build()
    with pytest.raises(ValueError, match="exactly one data source"):
        build(data_path=[_prefix(root, "train", "low")], data_args_path=files["data_args.txt"])
    with pytest.raises(ValueError, match="has no .*missing.bin"):
        build(data_path=[str(root / "missing")])
    with pytest.raises(ValueError, match="does not exist"):
        build(per_split_data_args_path=str(root / "nowhere.json"))


def test_dataset_config_fills_every_field_megatron_core_defines(tokenizer, tmp_path):
    """data.gpt_dataset builds GPTDatasetConfig field by field (megatron-core's wheel ships no builder): every init
    field is read from the arguments, computed, or deliberately left at its default; unsupported data settings
    are refused by name."""
    import dataclasses

    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    from mile_megatron.data import gpt_dataset
    from mile_megatron.utils.errors import UsageError

    fields = {field.name for field in dataclasses.fields(GPTDatasetConfig) if field.init}
    covered = set(gpt_dataset.FIELDS) | set(gpt_dataset.COMPUTED) | set(gpt_dataset.LEFT_AT_DEFAULT)
    assert fields == covered, fields ^ covered
    args = data.megatron_args(["--mock-data", "--seq-length", "16", "--seed", "7", "--eod-mask-loss",
                               "--reset-position-ids", "--data-cache-path", str(tmp_path), "--split", "90,10,0"])
    config = gpt_dataset.gpt_dataset_config(args, tokenizer)
    assert (config.random_seed, config.sequence_length, config.eod_mask_loss, config.reset_position_ids,
            config.path_to_cache, config.tokenizer) == (7, 16, True, True, str(tmp_path), tokenizer)
    for flag, name in (("--fim-data", "fill-in-the-middle"), ("--sft", "supervised fine-tuning"),
                       ("--hybrid-context-parallel", "hybrid context parallelism"),
                       ("--dataloader-inter-document-masking", "inter-document masking")):
        with pytest.raises(UsageError, match=name):
            gpt_dataset.gpt_dataset_config(data.megatron_args(["--mock-data", "--seq-length", "16", flag]), tokenizer)
