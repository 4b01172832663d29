"""Megatron indexed datasets (``<prefix>.bin`` + ``<prefix>.idx``) written with numpy only.

The files are byte-identical to what megatron-core's ``IndexedDatasetBuilder`` writes (one
sequence per document, not multimodal), so ``megatron.core.datasets.indexed_dataset.
IndexedDataset`` reads them unchanged; the tests compare both writers byte for byte. Writing
them here keeps torch and megatron (seconds of start-up and ~1 GB of memory per process) out of
``mile-preprocess``. The format (megatron-core 0.19.2, ``indexed_dataset.py``):

* ``.bin``: the tokens of every document, concatenated, in the dataset's dtype;
* ``.idx``: ``b"MMIDIDX\\x00\\x00"``, version ``<Q`` 1, dtype code ``<B`` (uint8 1, int8 2,
  int16 3, int32 4, int64 5, float64 6, float32 7, uint16 8), sequence count ``<Q`` N,
  document count ``<Q`` N + 1, then int32[N] sequence lengths (tokens), int64[N] sequence
  pointers (byte offsets into ``.bin``), int64[N + 1] document indices (``0, 1, ..., N``:
  document i is sequence i).

Memory: 12 bytes per document until :meth:`IndexedDatasetWriter.finalize`, which needs 8 more
per document for the pointers.
"""

from __future__ import annotations

import os
import shutil
import struct
from array import array
from pathlib import Path

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
DTYPE_CODES: dict[str, int] = {"uint8": 1, "int8": 2, "int16": 3, "int32": 4, "int64": 5,
                               "float64": 6, "float32": 7, "uint16": 8}
_CODE_DTYPES = {code: name for name, code in DTYPE_CODES.items()}
_FIXED = len(INDEX_HEADER) + 8 + 1 + 8 + 8  # header, version, dtype code, two counts


def read_index(idx_path: str | Path) -> tuple[np.dtype, np.ndarray, np.ndarray]:
    """``(dtype, sequence_lengths int32[N], document_indices int64[M])`` of an ``.idx`` file."""
    data = Path(idx_path).read_bytes()
    if len(data) < _FIXED or not data.startswith(INDEX_HEADER) or \
            struct.unpack_from("<Q", data, 9)[0] != 1 or data[17] not in _CODE_DTYPES:
        raise ValueError(f"{idx_path} is not a Megatron indexed dataset index (bad header)")
    dtype = np.dtype(_CODE_DTYPES[data[17]])
    sequences, documents = struct.unpack_from("<QQ", data, 18)
    if len(data) != _FIXED + 12 * sequences + 8 * documents:
        raise ValueError(f"{idx_path} is not a Megatron indexed dataset index ({len(data)} bytes "
                         f"for {sequences} sequences and {documents} document indices)")
    lengths = np.frombuffer(data, np.int32, sequences, _FIXED)
    indices = np.frombuffer(data, np.int64, documents, _FIXED + 12 * sequences)
    return dtype, lengths, indices


class IndexedDatasetWriter:
    """Streams documents into ``bin_path``; :meth:`finalize` writes the ``.idx``.

    Same call pattern as megatron-core's ``IndexedDatasetBuilder`` (``add_document``,
    ``add_index``, ``finalize``, ``data_file``), plus :meth:`add_documents` for a batch."""

    def __init__(self, bin_path: str | Path, dtype) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype.name not in DTYPE_CODES:
            raise ValueError(f"dtype {self.dtype} cannot be stored in a Megatron indexed dataset")
        self.bin_path = Path(bin_path)
        self.data_file = open(self.bin_path, "wb")
        self.sequence_lengths = array("i")
        self.document_indices = array("q", [0])
        self.tokens = 0

    @property
    def documents(self) -> int:
        return len(self.sequence_lengths)

    def add_document(self, tokens) -> None:
        """One document (= one sequence)."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        self.data_file.write(tokens.tobytes())
        self.sequence_lengths.append(tokens.size)
        self.document_indices.append(len(self.sequence_lengths))
        self.tokens += tokens.size

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Documents given as their concatenated tokens and the length of each."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != tokens.size or (lengths.size and int(lengths.min()) < 0):
            raise ValueError("lengths do not add up to the number of tokens")
        if lengths.size and int(lengths.max()) > np.iinfo(np.int32).max:
            raise ValueError("a document is longer than 2**31 - 1 tokens")
        first = len(self.sequence_lengths)
        self.data_file.write(tokens.tobytes())
        self.sequence_lengths.frombytes(lengths.astype(np.int32).tobytes())
        self.document_indices.frombytes(
            np.arange(first + 1, first + 1 + lengths.size, dtype=np.int64).tobytes())
        self.tokens += tokens.size

    def add_index(self, path_prefix: str | Path) -> None:
        """Append a whole dataset (``<path_prefix>.idx`` + ``.bin``), checking dtype and size."""
        dtype, lengths, indices = read_index(f"{path_prefix}.idx")
        if dtype != self.dtype:
            raise ValueError(f"{path_prefix} holds {dtype} tokens, expected {self.dtype}")
        tokens = int(lengths.sum(dtype=np.int64))
        size = os.path.getsize(f"{path_prefix}.bin")
        if size != tokens * self.dtype.itemsize:
            raise ValueError(f"{path_prefix}.bin has {size} bytes but its index describes "
                             f"{tokens * self.dtype.itemsize}; the dataset is damaged")
        offset = len(self.sequence_lengths)
        self.sequence_lengths.frombytes(lengths.tobytes())
        self.document_indices.frombytes((indices[1:] + offset).astype(np.int64).tobytes())
        with open(f"{path_prefix}.bin", "rb") as handle:
            shutil.copyfileobj(handle, self.data_file, 1 << 22)
        self.tokens += tokens

    def close(self) -> None:
        self.data_file.close()

    def finalize(self, idx_path: str | Path) -> None:
        self.data_file.close()
        lengths = np.frombuffer(self.sequence_lengths, dtype=np.int32) if self.sequence_lengths \
            else np.zeros(0, np.int32)
        pointers = np.zeros(lengths.size, dtype=np.int64)
        if lengths.size > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        with open(idx_path, "wb") as handle:
            handle.write(INDEX_HEADER)
            handle.write(struct.pack("<QB", 1, DTYPE_CODES[self.dtype.name]))
            handle.write(struct.pack("<QQ", lengths.size, len(self.document_indices)))
            handle.write(lengths.tobytes())
            handle.write(pointers.tobytes())
            handle.write(self.document_indices.tobytes())
