"""Readers, line classification, zstd framing, damaged inputs, synthetic corpus, tokenizer policy.

No megatron here: these are the fast unit tests of mile_megatron.data."""

from __future__ import annotations

import gzip
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import zstandard

from mile_megatron.data.domains import (PILE_DOMAIN_WEIGHTS, PILE_DOMAINS, DomainNameCollision,
                                        SafeNameRegistry, natural_key, safe_domain_name)
from mile_megatron.data.progress import Progress
from mile_megatron.data.sources import (SKIP_REASONS, CorruptInputError, InputStream,
                                        ZstdFrameTracker, iter_chunks, iter_documents, parse_line,
                                        split_lines)
from mile_megatron.data.synthetic import (BAD_LINES, damage_zst, expected_bad_counts,
                                          inject_bad_lines, read_lines, write_lines,
                                          write_pile_like_corpus)
from mile_megatron.data.tokenizer import (DocumentTokenizer, TokenizerError, TokenizerSpec,
                                          choose_dtype, resolve_policy)

DOMAIN_KEY = ("meta", "pile_set_name")


def test_safe_domain_names_are_stable_unique_and_documented():
    expected = {"Wikipedia (en)": "Wikipedia_en", "Gutenberg (PG-19)": "Gutenberg_PG-19",
                "DM Mathematics": "DM_Mathematics", "Pile-CC": "Pile-CC", "ArXiv": "ArXiv",
                "USPTO Backgrounds": "USPTO_Backgrounds", "Foo_Bar": "Foo_Bar",
                "../etc/passwd": "etc_passwd--0d2980255ff8", "  ": "domain--0d0cd2d34cb5"}
    for domain, safe in expected.items():
        assert safe_domain_name(domain) == safe
    names = [safe_domain_name(d) for d in PILE_DOMAINS]
    assert len(set(names)) == 22 and all("/" not in n and " " not in n for n in names)
    registry = SafeNameRegistry()  # sanitised alike, named apart: "A_B" and "A_B--<hash>"
    assert registry.add("A_B") == "A_B" and registry.add("A B") == registry.add("A B") != "A_B"
    assert registry.add("A B").startswith("A_B--")
    registry._by_safe["Books3"] = "a domain whose hash collided"  # the backstop still reports it
    with pytest.raises(DomainNameCollision, match="Books3"):
        registry.add("Books3")
    assert abs(sum(PILE_DOMAIN_WEIGHTS.values()) - 1.6998) < 1e-3
    assert sorted(["10", "2", "01"], key=natural_key) == ["01", "2", "10"]


def test_every_bad_line_is_classified_with_its_reason():
    for reason, lines in BAD_LINES.items():
        assert reason in SKIP_REASONS
        for line in lines:
            assert parse_line(line, "text", DOMAIN_KEY) == reason, line
    good = json.dumps({"text": "caf\u00e9 \u2603", "meta": {"pile_set_name": "ArXiv"}},
                      ensure_ascii=False).encode()
    assert parse_line(good, "text", DOMAIN_KEY) == ("ArXiv", "caf\u00e9 \u2603", len("caf\u00e9 \u2603".encode()))
    assert parse_line(b'{"text": "x", "source": "web"}', "text", ("source",)) == ("web", "x", 1)
    assert parse_line(b'{"text": "x"}', "text", ("source",)) == "missing_domain"
    assert split_lines(b"a\n\nb") == [b"a", b"", b"b"] and split_lines(b"a\n") == [b"a"]


def _frames(data: bytes, checksum: bool) -> bytes:
    compressor = zstandard.ZstdCompressor(level=1, write_checksum=checksum)
    return compressor.compress(data[:5000]) + compressor.compress(data[5000:])


@pytest.mark.parametrize("checksum", [True, False])
def test_zstd_frame_tracker_detects_every_truncation(checksum):
    rng = random.Random(3)
    data = b"".join(b"%d %s\n" % (i, rng.randbytes(8).hex().encode()) for i in range(2000))
    skippable = b"\x50\x2a\x4d\x18" + (3).to_bytes(4, "little") + b"abc"
    blob = _frames(data, checksum) + skippable
    for cut in list(range(0, len(blob), 97)) + [len(blob) - 1, len(blob)]:
        tracker = ZstdFrameTracker()
        for start in range(0, cut, 211):
            tracker.feed(blob[start:min(cut, start + 211)])
        complete = cut in (len(blob), len(blob) - len(skippable), 0) or cut == len(_frames(data[:5000], checksum))
        assert tracker.at_boundary == complete, cut
    with pytest.raises(ValueError, match="not a zstd frame"):
        ZstdFrameTracker().feed(b"PK\x03\x04....")


def test_readers_stream_all_formats_in_file_order(tmp_path):
    corpus = write_pile_like_corpus(tmp_path, train_shards=3, documents_per_shard=30,
                                    valid_documents=22, seed=5)
    assert [p.name for p in corpus.train_files] == ["00.jsonl.zst", "01.jsonl.gz", "02.jsonl"]
    for path in [*corpus.train_files, corpus.val_file]:
        docs = list(iter_documents(path))
        assert docs == corpus.documents[str(path)]
        assert {d for d, _ in docs} == set(PILE_DOMAINS)  # every file covers all 22 domains
    again = write_pile_like_corpus(tmp_path / "again", train_shards=3, documents_per_shard=30,
                                   valid_documents=22, seed=5)
    for a, b in zip([*corpus.train_files, corpus.val_file], [*again.train_files, again.val_file]):
        assert a.read_bytes() == b.read_bytes()  # deterministic given the seed
    texts = "".join(t for docs in corpus.documents.values() for _, t in docs)
    assert any(ord(ch) > 127 for ch in texts)


def test_chunks_hold_complete_lines_and_reassemble_the_stream(tmp_path):
    lines = [b"x" * random.Random(i).randint(0, 300) for i in range(400)] + [b"y" * 5000]
    path = write_lines(tmp_path / "a.jsonl.zst", lines)
    with InputStream(path) as stream:
        chunks = list(iter_chunks(stream, 1024))
        checksum = stream.checksum()
    assert b"".join(c.data for c in chunks) == b"".join(l + b"\n" for l in lines)
    assert all(c.data.endswith(b"\n") for c in chunks) and len(chunks) > 10
    assert [c.first_line for c in chunks] == list(np.cumsum([1] + [c.data.count(b"\n") for c in chunks[:-1]]))
    import hashlib
    assert checksum == hashlib.blake2b(path.read_bytes(), digest_size=20).hexdigest()


@pytest.mark.parametrize("mode", ["truncate", "corrupt"])
def test_damaged_zst_raises_with_file_and_offset(tmp_path, mode):
    lines = [json.dumps({"text": f"document {i} " + "words " * 50,
                         "meta": {"pile_set_name": "ArXiv"}}).encode() for i in range(3000)]
    path = write_lines(tmp_path / "07.jsonl.zst", lines)
    offset = damage_zst(path, mode, 0.5)
    with pytest.raises(CorruptInputError) as info:
        list(iter_documents(path))
    error = info.value
    assert error.path == str(path) and str(path) in str(error)
    assert "compressed byte offset" in str(error) and ("truncated" in str(error) if mode == "truncate" else "corrupt" in str(error))
    assert error.offset >= offset if mode == "corrupt" else error.offset == offset


def test_damaged_gzip_and_empty_zst_raise(tmp_path):
    path = write_lines(tmp_path / "a.jsonl.gz", [b'{"text": "%d"}' % i for i in range(20000)])
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptInputError, match="truncated gzip"):
        list(iter_documents(path))
    empty = tmp_path / "e.jsonl.zst"
    empty.write_bytes(b"")
    with pytest.raises(CorruptInputError, match="empty file"):
        list(iter_documents(empty))


def test_inject_bad_lines_keeps_good_documents(tmp_path):
    corpus = write_pile_like_corpus(tmp_path, train_shards=2, documents_per_shard=25,
                                    valid_documents=22, seed=1)
    for path in corpus.train_files:
        counts = inject_bad_lines(path, seed=2)
        items = list(iter_documents(path))
        assert [i for i in items if not isinstance(i, str)] == corpus.documents[str(path)]
        skipped = {r: sum(1 for i in items if i == r) for r in SKIP_REASONS}
        assert skipped == dict(expected_bad_counts()) == dict(counts)
        assert len(read_lines(path)) == 25 + sum(counts.values())


class _FakeIds(DocumentTokenizer):
    """Tokenizer metadata only, for policy checks (no encoding needed)."""

    def __init__(self, bos, eos, vocab=100):
        self.spec, self.vocab_size, self.bos_id, self.eos_id = TokenizerSpec("x", "fake"), vocab, bos, eos
        self.fingerprint = "0"


def test_special_token_policy_and_dtype_rules():
    policy = resolve_policy(_FakeIds(1, 2), True, True)
    assert (policy.bos_id, policy.eod_id) == (1, 2)
    assert resolve_policy(_FakeIds(1, 2), False, True).bos_id is None
    with pytest.raises(TokenizerError, match="no BOS"):
        resolve_policy(_FakeIds(None, 2), True, True)
    with pytest.raises(TokenizerError, match="no EOS"):
        resolve_policy(_FakeIds(1, None), False, True)
    with pytest.raises(TokenizerError, match="same id"):
        resolve_policy(_FakeIds(2, 2), True, True)
    assert resolve_policy(_FakeIds(2, 2), False, True).eod_id == 2
    assert choose_dtype(800) == np.uint16 and choose_dtype(65536) == np.uint16
    assert choose_dtype(65537) == np.int32 and choose_dtype(32000, "int64") == np.int64
    assert choose_dtype(256, "uint8") == np.uint8
    with pytest.raises(TokenizerError, match="does not fit --dtype uint8"):
        choose_dtype(257, "uint8")
    with pytest.raises(TokenizerError, match="does not fit --dtype uint16"):
        choose_dtype(70000, "uint16")


def test_progress_line_reports_rates():
    stream = io.StringIO()
    progress = Progress(3, enabled=True, stream=stream, interval=0)
    progress.update(documents=10, tokens=1000, nbytes=2_000_000, shards=1)
    progress.close()
    text = stream.getvalue()
    assert "shards 1/3" in text and "docs" in text and "/s" in text and "MB/s" in text and "tokens" in text
    quiet = io.StringIO()
    Progress(1, stream=quiet).update(documents=5, shards=1)  # not a TTY, not forced: silent
    assert quiet.getvalue() == ""


def test_gzip_reader_handles_multiple_members(tmp_path):
    path = tmp_path / "m.jsonl.gz"
    members = [gzip.compress(b'{"text": "a", "meta": {"pile_set_name": "ArXiv"}}\n'),
               gzip.compress(b'{"text": "b", "meta": {"pile_set_name": "Github"}}\n')]
    path.write_bytes(b"".join(members))
    assert list(iter_documents(path)) == [("ArXiv", "a"), ("Github", "b")]
    assert Path(path).exists()


def test_hugging_face_tokenizer_errors_are_clear(tmp_path):
    from mile_megatron.data.tokenizer import HuggingFaceTokenizer, spec_from_args

    with pytest.raises(TokenizerError, match="does not exist"):
        HuggingFaceTokenizer(tmp_path / "absent")
    try:
        import transformers  # noqa: F401
    except ImportError:
        with pytest.raises(TokenizerError, match="needs the 'transformers' package"):
            HuggingFaceTokenizer(tmp_path)
    else:
        with pytest.raises(TokenizerError, match="cannot load a tokenizer"):
            HuggingFaceTokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="exactly one"):
        spec_from_args(None, None)
    with pytest.raises(TokenizerError, match="exactly one"):
        spec_from_args("a.model", "dir")


def _corrupt(blob: bytes, at: int, size: int = 32) -> bytes:
    damaged = bytearray(blob)
    damaged[at:at + size] = bytes(b ^ 0x5A for b in damaged[at:at + size])
    return bytes(damaged)


def _zst_error(path: Path) -> CorruptInputError:
    with pytest.raises(CorruptInputError) as info:
        list(iter_documents(path))
    return info.value


def test_zst_damage_is_reported_where_it_is_not_at_the_end_of_the_read(tmp_path):
    """Garbage in the middle of a ~40 KB two-frame file (the size where the old reader, which
    pulled 1 MiB of compressed bytes per read, reported the end of the file)."""
    lines = [json.dumps({"text": f"document {i} " + f"words {i * 7919 % 1000} " * 50,
                         "meta": {"pile_set_name": "ArXiv"}}).encode() for i in range(3000)]
    data = b"".join(line + b"\n" for line in lines)
    path = write_lines(tmp_path / "07.jsonl.zst", lines)
    blob = path.read_bytes()
    assert 30_000 < len(blob) < 60_000
    second_frame = blob.index(b"\x28\xb5\x2f\xfd", 4)
    for at in (len(blob) // 2, len(blob) // 3, 2 * len(blob) // 3, 100, len(blob) - 200):
        path.write_bytes(_corrupt(blob, at))
        error = _zst_error(path)
        message = str(error)
        assert f"compressed bytes {error.start}..{error.offset}" in message, message
        assert f"at or before compressed byte offset {error.offset}" in message, message
        assert error.start <= at + 32 and error.offset >= at, (at, message)  # brackets the damage
        if "checksum" in message:  # the decoder found no fault: only the frame is known
            assert (error.start, error.offset) in ((0, second_frame), (second_frame, len(blob)))
            assert at != len(blob) // 2, message
        else:  # the block that failed to decode: a few KB, not the end of the file or the read
            assert error.offset - error.start <= 6000, message
            assert at <= error.offset < len(blob) - 1000 or at > len(blob) - 1000, message
        assert f"line {error.lines}" in message, message
        if "checksum" in message:
            continue
        assert error.lines == data[:error.decompressed].count(b"\n")
        decoded = []  # every chunk handed out before the damage is original text
        with pytest.raises(CorruptInputError), InputStream(path) as stream:
            for chunk in iter_chunks(stream, 1024):
                decoded.append(chunk.data)
        decoded_bytes = b"".join(decoded)
        assert decoded_bytes == data[:len(decoded_bytes)] and len(decoded_bytes) <= error.decompressed
        assert len(decoded_bytes) > error.decompressed - 2048  # only the unfinished chunk is held back


def test_zst_damage_found_only_by_the_checksum_names_the_whole_frame(tmp_path):
    """Raw (stored) blocks carry no redundancy: garbage there is caught by the frame checksum,
    so the honest bracket is the frame, not a block."""
    payload = random.Random(11).randbytes(300_000)  # incompressible: stored as raw blocks
    first = zstandard.ZstdCompressor(level=1, write_checksum=True).compress(payload[:1000])
    second = zstandard.ZstdCompressor(level=-5, write_checksum=True).compress(payload[1000:])
    path = tmp_path / "raw.jsonl.zst"
    at = len(first) + len(second) // 2
    path.write_bytes(_corrupt(first + second, at, 4))
    error = _zst_error(path)
    message = str(error)
    assert "checksum" in message and f"compressed bytes {len(first)}..{len(first) + len(second)}" in message
    assert (error.start, error.offset) == (len(first), len(first) + len(second))


def test_zst_bad_frame_magic_is_pinpointed(tmp_path):
    lines = [b'{"text": "doc %d", "meta": {"pile_set_name": "ArXiv"}}' % i for i in range(5000)]
    path = write_lines(tmp_path / "m.jsonl.zst", lines)
    blob = path.read_bytes()
    second = blob.index(b"\x28\xb5\x2f\xfd", 4)  # magic of the second frame
    path.write_bytes(blob[:second] + b"JUNK" + blob[second + 4:])
    error = _zst_error(path)
    assert (error.start, error.offset) == (second, second + 4), str(error)
    assert "not a zstd frame" in str(error)


def test_zst_reader_skips_skippable_frames_and_reports_stray_trailing_bytes(tmp_path):
    docs = [b'{"text": "doc %d", "meta": {"pile_set_name": "ArXiv"}}\n' % i for i in range(300)]
    skippable = b"\x53\x2a\x4d\x18" + (5).to_bytes(4, "little") + b"12345"
    compressor = zstandard.ZstdCompressor(level=1, write_checksum=True)
    blob = (skippable + compressor.compress(b"".join(docs[:100])) + skippable
            + compressor.compress(b"".join(docs[100:])) + skippable)
    path = tmp_path / "s.jsonl.zst"
    path.write_bytes(blob)
    assert len(list(iter_documents(path))) == 300
    path.write_bytes(blob + b"\x28\xb5")
    error = _zst_error(path)
    assert "2 stray bytes after the last complete frame" in str(error)
    assert error.offset == len(blob) + 2 and error.lines == 300
