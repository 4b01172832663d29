"""A tiny random LLaMA directory for the mile-eval tests (built once per session), and its checks.

The tokenizer is a SentencePiece BPE model trained here on a few hundred lines of Python's own
documentation (pydoc_data.topics), exposed to transformers as a LlamaTokenizer built from the
model's pieces (no download, no protobuf needed). Other test_eval_* modules import the builders.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VOCAB = 512          # 3 specials + 256 byte-fallback pieces + merges
BOS_ID, EOS_ID = 1, 2
MAX_POSITIONS = 64


def corpus_lines(count: int = 700) -> list[str]:
    """Deterministic English/Python text: non-trivial lines of pydoc_data.topics in key order."""
    from pydoc_data.topics import topics

    lines = [line.strip() for key in sorted(topics) for line in topics[key].splitlines()]
    return [line for line in lines if len(line) > 30][:count]


def train_sentencepiece(path: Path) -> Path:
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines(500)), model_writer=buffer, vocab_size=VOCAB,
        model_type="bpe", unk_id=0, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, num_threads=1,
        minloglevel=2)
    path.write_bytes(buffer.getvalue())
    return path


def _build(directory: Path) -> None:
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    directory.mkdir(parents=True)
    sp_path = train_sentencepiece(directory.parent / f"{directory.name}.sp.model")
    processor = spm.SentencePieceProcessor(model_file=str(sp_path))
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    tokenizer = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), unk_token="<unk>",
                               bos_token="<s>", eos_token="</s>", add_bos_token=True,
                               add_eos_token=False)
    tokenizer.save_pretrained(str(directory))
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-5, rope_theta=10000.0,
                         tie_word_embeddings=False, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                         initializer_range=0.2)
    torch.manual_seed(1234)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(directory), safe_serialization=True)
    shutil.copy(sp_path, directory.parent / "sp.model")


def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's tiny model directory (built on first use, atomically by rename)."""
    root = tmp_path_factory.getbasetemp() / "eval_tiny_llama"
    final = root / "model"
    if not final.is_dir():
        staging = root / f"staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        _build(staging / "model")
        shutil.move(str(staging / "model"), str(final))
        shutil.move(str(staging / "model.sp.model"), str(root / "sp.model"))
        shutil.rmtree(staging, ignore_errors=True)
    return final


def sentencepiece_path(model_dir: Path) -> Path:
    return model_dir.parent / "sp.model"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory)


def test_tiny_model_directory_is_a_checked_llama_with_bos_policy(model_dir):
    from mile_megatron.evaluate.common import inspect_model_dir
    from mile_megatron.evaluate.harness import BOS_PROBE, check_bos

    info = inspect_model_dir(model_dir, need_tokenizer=True)
    assert info.config_sha256 == hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()
    assert info.vocab_size == VOCAB and info.max_position_embeddings == MAX_POSITIONS
    assert "model.safetensors" in info.weight_files
    bos = check_bos(info)
    # Exactly one BOS in front, nothing appended; the plain ids are the SentencePiece pieces.
    assert bos["probe_ids"][0] == BOS_ID and bos["prefix_token_id"] == BOS_ID
    assert bos["probe_ids"].count(BOS_ID) == 1 and bos["probe_ids"][-1] != EOS_ID
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(sentencepiece_path(model_dir)))
    assert bos["probe_ids"][1:] == processor.encode(BOS_PROBE)
    # --no-bos: no special tokens, empty contexts conditioned on EOS.
    plain = check_bos(info, add_bos=False)
    assert plain["probe_ids"] == processor.encode(BOS_PROBE) and plain["prefix_token_id"] == EOS_ID


def test_tokenizer_without_bos_or_with_another_bos_is_refused(model_dir, tmp_path):
    from mile_megatron.evaluate.common import EvalError, inspect_model_dir
    from mile_megatron.evaluate.harness import check_bos

    no_bos = tmp_path / "no_bos"
    shutil.copytree(model_dir, no_bos)
    config_path = no_bos / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["bos_token"] = None
    config_path.write_text(json.dumps(config))
    with pytest.raises(EvalError, match="defines no BOS token"):
        check_bos(inspect_model_dir(no_bos, need_tokenizer=True))

    other_bos = tmp_path / "other_bos"
    shutil.copytree(model_dir, other_bos)
    config = json.loads((other_bos / "config.json").read_text())
    config["bos_token_id"] = 7
    (other_bos / "config.json").write_text(json.dumps(config))
    with pytest.raises(EvalError, match="bos_token_id 7 differs from the tokenizer's BOS 1"):
        check_bos(inspect_model_dir(other_bos, need_tokenizer=True))
