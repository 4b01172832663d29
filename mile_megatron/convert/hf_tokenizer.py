"""The tokenizer a Megatron run used, as Hugging Face tokenizer files plus its vocabulary size and BOS/EOS.

- GPTSentencePieceTokenizer / Llama2Tokenizer (a SentencePiece BPE ``.model``): Megatron's bos is
  ``bos_id()`` and its eod is ``eos_id()``. Written as a LlamaTokenizer (tokenizer.json built from the
  model's pieces and merges; no protobuf needed) that adds BOS and no EOS, like the training data
  ``[BOS] text [EOD]``; the SentencePiece model is copied as ``tokenizer.model`` too. The result is
  checked against SentencePiece itself on sample texts. Known difference of every HF LLaMA
  tokenizer: text that starts with a space gets no extra dummy-prefix space.
- HuggingFaceTokenizer: the tokenizer directory is saved as is.
- NullTokenizer (synthetic ids): no tokenizer files; vocabulary --vocab-size, eod = vocab_size - 1.
"""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mile_megatron.convert import ConversionError

SENTENCEPIECE_TYPES = ("GPTSentencePieceTokenizer", "Llama2Tokenizer")
SAMPLE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Entropy-weighted cross-entropy: 12345 tokens, 3.14159 nats.",
    "naïve café — ünïcødé ✓ and emoji 🙂\nsecond line\twith tab",
    "def f(x):\n    return x ** 2  # two  spaces",
)


@dataclass
class TokenizerInfo:
    vocab_size: int | None          # None: unknown (keep the padded vocabulary)
    bos_token_id: int | None
    eos_token_id: int | None
    description: str
    write: Callable[[Path], None] | None  # writes the HF tokenizer files into a directory


def _sentencepiece_llama_tokenizer(model_path: Path):
    """A transformers LlamaTokenizer equivalent to a SentencePiece BPE model."""
    import sentencepiece
    from transformers import LlamaTokenizer

    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    # BPE merges: every split of a normal piece into two pieces of the vocabulary, ranked by the
    # merged piece's id (SentencePiece BPE scores follow merge order), then by the parts' ids.
    ranked = []
    for piece, piece_id in vocab.items():
        if processor.is_control(piece_id) or processor.is_unknown(piece_id) or processor.is_byte(piece_id):
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((piece_id, vocab[left], vocab[right], left, right))
    merges = [(left, right) for *_, left, right in sorted(ranked)]

    def piece(index: int) -> str | None:
        return processor.id_to_piece(index) if index >= 0 else None

    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, unk_token=piece(processor.unk_id()) or "<unk>",
                               bos_token=piece(processor.bos_id()), eos_token=piece(processor.eos_id()),
                               add_bos_token=processor.bos_id() >= 0, add_eos_token=False, legacy=False)
    return processor, tokenizer


def _check_tokenizer(processor, tokenizer, model_path: Path) -> None:
    for text in SAMPLE_TEXTS:
        expected = ([processor.bos_id()] if processor.bos_id() >= 0 else []) + processor.encode(text)
        got = tokenizer(text)["input_ids"]
        if got != expected:
            raise ConversionError(
                f"the Hugging Face tokenizer built from {model_path} does not reproduce SentencePiece on {text!r} "
                f"(SentencePiece {expected[:16]}..., HF {got[:16]}...); only SentencePiece BPE models (like "
                "LLaMA's) convert. Pass --no-tokenizer to convert the weights only")


def tokenizer_info(args: argparse.Namespace, tokenizer_model: str | None = None) -> TokenizerInfo:
    """What the run's tokenizer defines; `tokenizer_model` overrides the path saved in the checkpoint."""
    kind = getattr(args, "tokenizer_type", None)
    path = tokenizer_model or getattr(args, "tokenizer_model", None)
    if kind in SENTENCEPIECE_TYPES:
        if not path or not os.path.isfile(path):
            raise ConversionError(f"the run used {kind} with the SentencePiece model {path!r}, which does not exist "
                                  "here; pass --tokenizer-model PATH (or --no-tokenizer)")
        model_path = Path(path)
        processor, tokenizer = _sentencepiece_llama_tokenizer(model_path)
        _check_tokenizer(processor, tokenizer, model_path)

        def write(directory: Path) -> None:
            tokenizer.save_pretrained(str(directory))
            shutil.copyfile(model_path, directory / "tokenizer.model")

        bos, eos = processor.bos_id(), processor.eos_id()
        return TokenizerInfo(processor.get_piece_size(), bos if bos >= 0 else None, eos if eos >= 0 else None,
                             f"SentencePiece {model_path}", write)
    if kind == "HuggingFaceTokenizer":
        if not path:
            raise ConversionError("the run used HuggingFaceTokenizer but no --tokenizer-model is known; pass it")
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as error:
            raise ConversionError(f"cannot load the Hugging Face tokenizer {path!r} ({error}); pass "
                                  "--tokenizer-model PATH (or --no-tokenizer)") from error
        return TokenizerInfo(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                             f"Hugging Face tokenizer {path}", lambda directory: tokenizer.save_pretrained(str(directory)))
    if kind == "NullTokenizer":
        vocab = int(args.vocab_size)
        eod = getattr(args, "null_tokenizer_eod_id", None)
        return TokenizerInfo(vocab, None, int(eod) if eod is not None else vocab - 1,
                             f"NullTokenizer ({vocab} synthetic ids; no tokenizer files)", None)
    vocab = getattr(args, "vocab_size", None)
    return TokenizerInfo(int(vocab) if vocab else None, None, None,
                         f"tokenizer type {kind!r} (not converted; pass --vocab-size if the padded vocabulary "
                         "should be trimmed)", None)
