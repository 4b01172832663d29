"""mile_megatron.data.indexed writes Megatron's indexed dataset format without torch: the files are
byte-identical to megatron-core's IndexedDatasetBuilder output and read back identically by
megatron-core's IndexedDataset."""

from __future__ import annotations

import numpy as np
import pytest

from mile_megatron.data.indexed import IndexedDatasetWriter


def _megatron_write(prefix, dtype, docs, merge=()):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in docs:
        builder.add_document(doc, [len(doc)])
    for other in merge:
        builder.add_index(str(other))
    builder.finalize(f"{prefix}.idx")


def _files(prefix) -> tuple[bytes, bytes]:
    return (open(f"{prefix}.bin", "rb").read(), open(f"{prefix}.idx", "rb").read())


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64])
def test_writer_is_byte_identical_to_megatron_and_reads_back_in_megatron(tmp_path, dtype):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    rng = np.random.default_rng(7)
    high = min(int(np.iinfo(dtype).max), 70000)
    docs = [rng.integers(0, high, size=int(rng.integers(1, 300))).astype(dtype) for _ in range(150)]
    parts = [docs[:60], docs[60:61], [], docs[61:]]
    for i, part in enumerate(parts):
        ours = IndexedDatasetWriter(tmp_path / f"ours{i}.bin", dtype)
        if i % 2:  # both ways of adding documents
            for doc in part:
                ours.add_document(doc)
        else:
            ours.add_documents(np.concatenate(part) if part else np.zeros(0, dtype),
                               np.array([len(d) for d in part], dtype=np.int64))
        ours.finalize(tmp_path / f"ours{i}.idx")
        _megatron_write(tmp_path / f"theirs{i}", dtype, part)
        assert _files(tmp_path / f"ours{i}") == _files(tmp_path / f"theirs{i}"), i
    merged = IndexedDatasetWriter(tmp_path / "ours.bin", dtype)
    for i in range(len(parts)):
        merged.add_index(tmp_path / f"ours{i}")
    merged.finalize(tmp_path / "ours.idx")
    _megatron_write(tmp_path / "theirs", dtype, [], [tmp_path / f"theirs{i}" for i in range(len(parts))])
    assert _files(tmp_path / "ours") == _files(tmp_path / "theirs")
    dataset = IndexedDataset(str(tmp_path / "ours"))
    assert dataset.index.dtype == dtype and len(dataset) == len(docs)
    assert dataset.document_indices.tolist() == list(range(len(docs) + 1))
    for index, doc in enumerate(docs):
        assert dataset[index].tolist() == doc.tolist()
    assert merged.documents == len(docs) and merged.tokens == sum(map(len, docs))


def test_merging_checks_dtype_and_data_size(tmp_path):
    writer = IndexedDatasetWriter(tmp_path / "a.bin", np.uint16)
    writer.add_document(np.arange(10, dtype=np.uint16))
    writer.finalize(tmp_path / "a.idx")
    with pytest.raises(ValueError, match="uint16 tokens, expected int32"):
        IndexedDatasetWriter(tmp_path / "b.bin", np.int32).add_index(tmp_path / "a")
    with open(tmp_path / "a.bin", "ab") as handle:
        handle.write(b"\0\0")
    with pytest.raises(ValueError, match="22 bytes.*index describes 20"):
        IndexedDatasetWriter(tmp_path / "c.bin", np.uint16).add_index(tmp_path / "a")
    (tmp_path / "d.idx").write_bytes(b"not an index at all, no")
    with pytest.raises(ValueError, match="not a Megatron indexed dataset index"):
        IndexedDatasetWriter(tmp_path / "e.bin", np.uint16).add_index(tmp_path / "d")
