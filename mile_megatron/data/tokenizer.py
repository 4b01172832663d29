"""Tokenizers for preprocessing, and the BOS/EOD policy that must match the training loss mask.

Supported tokenizers:

* a SentencePiece model file (``--tokenizer-model tokenizer.model``; the LLaMA tokenizer in
  practice). Megatron reads the same file with ``--tokenizer-type GPTSentencePieceTokenizer
  --tokenizer-model tokenizer.model``; its ``bos`` is ``bos_id()`` and its ``eod`` is ``eos_id()``.
* a Hugging Face tokenizer directory (``--hf-tokenizer DIR``, needs ``transformers``; train with
  ``--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR``); ``eod`` is ``eos_token_id``.

BOS/EOD policy (default: both on, i.e. every document becomes ``[BOS] text [EOD]``):

* ``--append-eod`` (default on) appends the tokenizer's EOS id, which is exactly the id Megatron
  reports as ``tokenizer.eod``. With ``--eod-mask-loss`` Megatron zeroes the loss at positions
  whose *input* token is EOD, i.e. the prediction of the next document's first token from the
  previous document; the prediction *of* EOD itself (the end of a document) stays trained, and
  ``--reset-position-ids/--reset-attention-mask`` find document boundaries at the EOD tokens.
* ``--prepend-bos`` (default on, LLaMA convention) prepends the BOS id. The BOS position predicts
  the document's first text token and is trained; the EOD position that precedes BOS is masked
  under ``--eod-mask-loss``, so no loss term ever crosses a document boundary.
* ``--no-append-eod`` concatenates documents without a separator (Megatron then cannot see
  document boundaries); ``--no-prepend-bos`` gives Megatron's own ``preprocess_data.py --append-eod``
  layout.

A policy that cannot be honoured is rejected before any work: a requested BOS/EOD that the
tokenizer does not define, or BOS == EOD (``--eod-mask-loss`` would then also mask every BOS
and boundary detection becomes ambiguous).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class TokenizerError(ValueError):
    """The tokenizer, its vocabulary or the requested BOS/EOD policy is unusable."""


@dataclass(frozen=True)
class TokenizerSpec:
    """Picklable description of a tokenizer: workers load their own copy from it."""
    kind: str   # "sentencepiece" or "huggingface"
    path: str


# Token dtypes in the order tried for dtype="auto" (smallest first) and their largest id.
DTYPE_MAX_ID: dict[str, int] = {"uint8": 255, "uint16": 65535, "int32": 2**31 - 1,
                                "int64": 2**63 - 1}


def choose_dtype(vocab_size: int, requested: str = "auto") -> np.dtype:
    """Token dtype for ids ``0 .. vocab_size-1``.

    ``auto`` = the smallest dtype Megatron's GPT data path assumes: uint16 for vocabularies up to
    65536 ids, else int32 (GPTDatasetConfig derives the token dtype from the vocabulary size
    with this rule, e.g. for --per-dataset-sequences-path). ``uint8`` is available explicitly for
    vocabularies of at most 256 ids. An explicit dtype too small for the vocabulary is rejected.
    """
    if requested == "auto":
        return np.dtype("uint16" if vocab_size <= 65536 else "int32")
    if requested not in DTYPE_MAX_ID:
        raise TokenizerError(f"unknown --dtype {requested!r}; choose auto, "
                             + ", ".join(DTYPE_MAX_ID))
    if vocab_size - 1 > DTYPE_MAX_ID[requested]:
        raise TokenizerError(
            f"vocabulary of {vocab_size} tokens does not fit --dtype {requested} (largest id "
            f"{DTYPE_MAX_ID[requested]}); use --dtype auto or a wider type")
    return np.dtype(requested)


class DocumentTokenizer:
    """Encodes batches of texts to id lists without special tokens."""

    spec: TokenizerSpec
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    fingerprint: str

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": self.spec.kind, "path": self.spec.path, "fingerprint": self.fingerprint,
                "vocab_size": self.vocab_size, "bos_id": self.bos_id, "eos_id": self.eos_id}


def _sha256_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class SentencePieceTokenizer(DocumentTokenizer):
    def __init__(self, path: str | Path) -> None:
        import sentencepiece

        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer model {path} does not exist (or is not a file); pass "
                                 "a SentencePiece .model file, e.g. from mile-train-tokenizer")
        self._processor = sentencepiece.SentencePieceProcessor()
        try:
            self._processor.Load(str(path))
        except (RuntimeError, OSError) as error:
            raise TokenizerError(f"{path} is not a SentencePiece model ({error})") from None
        self.spec = TokenizerSpec("sentencepiece", str(path.resolve()))
        self.vocab_size = int(self._processor.get_piece_size())
        self.bos_id = _valid_id(self._processor.bos_id())
        self.eos_id = _valid_id(self._processor.eos_id())
        self.fingerprint = _sha256_files([path])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # One thread per worker process: parallelism comes from the worker count.
        return self._processor.encode(texts, out_type=int, num_threads=1)


class HuggingFaceTokenizer(DocumentTokenizer):
    _FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        if not directory.is_dir():
            raise TokenizerError(f"Hugging Face tokenizer directory {directory} does not exist")
        try:
            import transformers
        except ImportError:
            raise TokenizerError("--hf-tokenizer needs the 'transformers' package "
                                 "(pip install 'mile-megatron[hf]')") from None
        try:
            self._tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
        except (OSError, ValueError) as error:
            raise TokenizerError(f"cannot load a tokenizer from {directory}: {error}") from None
        self.spec = TokenizerSpec("huggingface", str(directory.resolve()))
        self.vocab_size = len(self._tokenizer)
        self.bos_id = self._tokenizer.bos_token_id
        self.eos_id = self._tokenizer.eos_token_id
        files = [directory / name for name in self._FILES if (directory / name).is_file()]
        self.fingerprint = _sha256_files(files)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._tokenizer(texts, add_special_tokens=False)["input_ids"]


def _valid_id(value: int) -> int | None:
    return None if value is None or value < 0 else int(value)


def load_tokenizer(spec: TokenizerSpec) -> DocumentTokenizer:
    if spec.kind == "sentencepiece":
        return SentencePieceTokenizer(spec.path)
    if spec.kind == "huggingface":
        return HuggingFaceTokenizer(spec.path)
    raise TokenizerError(f"unknown tokenizer kind {spec.kind!r}")


def spec_from_args(model: str | None, hf_dir: str | None) -> TokenizerSpec:
    if bool(model) == bool(hf_dir):
        raise TokenizerError("pass exactly one of --tokenizer-model FILE or --hf-tokenizer DIR")
    if model:
        return TokenizerSpec("sentencepiece", os.fspath(model))
    return TokenizerSpec("huggingface", os.fspath(hf_dir))  # type: ignore[arg-type]


@dataclass(frozen=True)
class SpecialTokens:
    """Resolved policy: ids prepended/appended to every document (None = nothing)."""
    bos_id: int | None
    eod_id: int | None

    def describe(self) -> dict:
        return {"prepend_bos": self.bos_id is not None, "append_eod": self.eod_id is not None,
                "bos_id": self.bos_id, "eod_id": self.eod_id}


def resolve_policy(tokenizer: DocumentTokenizer, prepend_bos: bool, append_eod: bool
                   ) -> SpecialTokens:
    """Check the BOS/EOD policy against the tokenizer (see module docstring)."""
    if prepend_bos and tokenizer.bos_id is None:
        raise TokenizerError(f"--prepend-bos: tokenizer {tokenizer.spec.path} defines no BOS "
                             "token; pass --no-prepend-bos")
    if append_eod and tokenizer.eos_id is None:
        raise TokenizerError(f"--append-eod: tokenizer {tokenizer.spec.path} defines no EOS "
                             "token (Megatron's EOD); pass --no-append-eod or use a tokenizer "
                             "with an EOS token")
    if prepend_bos and append_eod and tokenizer.bos_id == tokenizer.eos_id:
        raise TokenizerError(
            f"BOS and EOD are the same id ({tokenizer.bos_id}): Megatron's --eod-mask-loss would "
            "also mask every BOS and document boundaries become ambiguous; pass --no-prepend-bos")
    for name, value in (("BOS", tokenizer.bos_id if prepend_bos else None),
                        ("EOD", tokenizer.eos_id if append_eod else None)):
        if value is not None and not 0 <= value < tokenizer.vocab_size:
            raise TokenizerError(f"{name} id {value} is outside the vocabulary "
                                 f"(size {tokenizer.vocab_size})")
    return SpecialTokens(tokenizer.bos_id if prepend_bos else None,
                         tokenizer.eos_id if append_eod else None)
