"""Streaming readers for Pile-format inputs (``.jsonl.zst``, ``.jsonl.gz``, ``.jsonl``).

Inputs are never decompressed to disk. :func:`iter_chunks` yields blocks of *complete* lines of
about ``chunk_bytes`` decompressed bytes (a single longer line is yielded whole, so the memory of
one chunk is ``max(chunk_bytes, longest line)``).

Damaged compressed input raises :class:`CorruptInputError`, which names the file, the compressed
byte offset where the damage was detected and how many decompressed bytes were read before it:

* ``.zst``: zstandard's streaming decoder detects corrupt blocks and checksum mismatches; a
  truncated file is *not* reported by it, so :class:`ZstdFrameTracker` follows the frame/block
  structure of the compressed bytes and reports a stream that ends inside a frame.
* ``.gz``: Python's gzip module (truncation, CRC and corrupt deflate data).

Line-level problems are not errors; :func:`parse_line` classifies every line as a document
``(domain, text, text_bytes)`` or one of :data:`SKIP_REASONS`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import zstandard

# Why a line was skipped. Skipped lines are counted per reason and never stop a shard.
SKIP_REASONS: tuple[str, ...] = (
    "blank_line",        # empty or whitespace-only line
    "invalid_utf8",      # bytes are not UTF-8, or the JSON text holds lone surrogates
    "malformed_json",    # not parseable JSON, or not a JSON object
    "missing_text",      # no text key
    "non_string_text",   # text is not a string
    "missing_meta",      # the container of the domain key (``meta``) is missing or not an object
    "missing_domain",    # the domain key is missing, empty or not a string
    "empty_document",    # text is empty or whitespace only
)

SUPPORTED_SUFFIXES = (".zst", ".gz", ".jsonl", ".json", ".txt")
_READ_SIZE = 1 << 20  # compressed bytes pulled from disk per read


class CorruptInputError(RuntimeError):
    """A compressed input is truncated or corrupt; the shard that reads it cannot complete."""

    def __init__(self, path: str | Path, offset: int, decompressed: int, detail: str) -> None:
        self.path, self.offset, self.decompressed, self.detail = str(path), offset, decompressed, detail
        super().__init__(
            f"{self.path}: {detail} at compressed byte offset {offset} (after {decompressed} "
            "decompressed bytes); this shard is stopped and left incomplete. Re-download or "
            "repair the file and rerun; completed shards are kept.")


def compression_of(path: str | Path) -> str:
    """'zst', 'gz' or 'plain'; raises ValueError for other compressions."""
    name = str(path).lower()
    if name.endswith(".zst") or name.endswith(".zstd"):
        return "zst"
    if name.endswith(".gz"):
        return "gz"
    if name.endswith((".xz", ".bz2", ".lz4", ".zip", ".tar", ".7z")):
        raise ValueError(f"{path}: unsupported compression; use .jsonl.zst, .jsonl.gz or .jsonl")
    return "plain"


class _CountingReader(io.RawIOBase):
    """Raw file wrapper that counts and hashes (BLAKE2b) the bytes it hands out."""

    def __init__(self, handle: BinaryIO, observer: "ZstdFrameTracker | None" = None) -> None:
        self._handle = handle
        self.offset = 0
        self.hash = hashlib.blake2b(digest_size=20)
        self._observer = observer

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        data = self._handle.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self._account(data)
        return n

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        data = self._handle.read(size)
        self._account(data)
        return data

    def _account(self, data: bytes) -> None:
        self.offset += len(data)
        self.hash.update(data)
        if self._observer is not None:
            self._observer.feed(data)


class ZstdFrameTracker:
    """Follows zstd frame and block headers to tell whether the stream ends on a frame boundary.

    Format (RFC 8878): frame = magic 0xFD2FB528, header (descriptor byte, optional window byte,
    dictionary id 0/1/2/4 bytes, content size 0/1/2/4/8 bytes), blocks (3-byte little-endian
    header: bit 0 last block, bits 1-2 type, bits 3-23 size; an RLE block carries 1 byte), then
    a 4-byte checksum if flagged. Skippable frames: magic 0x184D2A5?, 4-byte size, payload.
    """

    def __init__(self) -> None:
        self._pending = b""    # header bytes collected so far
        self._need = 4         # bytes needed by the current state
        self._skip = 0         # payload bytes still to skip
        self._state = "magic"
        self.frame_start = 0
        self._position = 0
        self._checksum = False
        self._last_block = False

    @property
    def at_boundary(self) -> bool:
        return self._state == "magic" and not self._pending and self._skip == 0

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._skip:
                step = min(self._skip, len(view))
                self._skip -= step
                self._position += step
                view = view[step:]
                if not self._skip:
                    self._after_payload()
                continue
            take = min(self._need - len(self._pending), len(view))
            self._pending += bytes(view[:take])
            self._position += take
            view = view[take:]
            if len(self._pending) == self._need:
                header, self._pending = self._pending, b""
                self._advance(header)

    def _advance(self, header: bytes) -> None:
        state = self._state
        if state == "magic":
            self.frame_start = self._position - 4
            magic = struct.unpack("<I", header)[0]
            if magic == 0xFD2FB528:
                self._state, self._need = "descriptor", 1
            elif magic & 0xFFFFFFF0 == 0x184D2A50:
                self._state, self._need = "skippable_size", 4
            else:
                raise ValueError(f"not a zstd frame (magic {magic:#010x})")
        elif state == "skippable_size":
            self._skip = struct.unpack("<I", header)[0]
            self._state = "skippable"
            if not self._skip:
                self._after_payload()
        elif state == "descriptor":
            descriptor = header[0]
            fcs_flag, single_segment = descriptor >> 6, (descriptor >> 5) & 1
            self._checksum = bool((descriptor >> 2) & 1)
            did_size = (0, 1, 2, 4)[descriptor & 3]
            fcs_size = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
            rest = (0 if single_segment else 1) + did_size + fcs_size
            self._state = "frame_header"
            self._need = rest
            if rest == 0:
                self._state, self._need = "block_header", 3
        elif state == "frame_header":
            self._state, self._need = "block_header", 3
        elif state == "block_header":
            value = header[0] | header[1] << 8 | header[2] << 16
            self._last_block = bool(value & 1)
            block_type, size = (value >> 1) & 3, value >> 3
            if block_type == 3:
                raise ValueError("reserved zstd block type")
            self._skip = 1 if block_type == 1 else size
            self._state = "block"
            if not self._skip:
                self._after_payload()
        elif state == "checksum":
            self._state, self._need = "magic", 4

    def _after_payload(self) -> None:
        if self._state == "skippable":
            self._state, self._need = "magic", 4
        elif self._state == "block":
            if not self._last_block:
                self._state, self._need = "block_header", 3
            elif self._checksum:
                self._state, self._need = "checksum", 4
            else:
                self._state, self._need = "magic", 4


@dataclass
class Chunk:
    """Complete lines ``data`` (ending in b"\\n" except possibly the file's last line)."""
    first_line: int        # 1-based line number of the first line in ``data``
    data: bytes


class InputStream:
    """Decompressed byte stream of one input file; raises CorruptInputError on damage."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.kind = compression_of(self.path)
        self._file = open(self.path, "rb")
        self._tracker = ZstdFrameTracker() if self.kind == "zst" else None
        self.raw = _CountingReader(self._file, self._tracker)
        self.decompressed = 0
        if self.kind == "zst":
            self._stream: io.RawIOBase | BinaryIO = zstandard.ZstdDecompressor().stream_reader(
                self.raw, read_size=_READ_SIZE, read_across_frames=True)
        elif self.kind == "gz":
            self._stream = gzip.GzipFile(fileobj=io.BufferedReader(self.raw, _READ_SIZE), mode="rb")
        else:
            self._stream = self.raw

    def _fail(self, detail: str) -> CorruptInputError:
        return CorruptInputError(self.path, self.raw.offset, self.decompressed, detail)

    def read(self, size: int) -> bytes:
        try:
            data = self._stream.read(size)
        except zstandard.ZstdError as error:
            raise self._fail(f"corrupt zstd data ({error})") from None
        except EOFError as error:
            raise self._fail(f"truncated gzip stream ({error})") from None
        except (gzip.BadGzipFile, zlib.error, OSError) as error:
            raise self._fail(f"corrupt {self.kind} data ({error})") from None
        except ValueError as error:  # raised by ZstdFrameTracker while reading
            raise self._fail(f"corrupt zstd data ({error})") from None
        if data:
            self.decompressed += len(data)
        elif self._tracker is not None:
            if self.raw.offset == 0:
                raise self._fail("empty file, not a zstd stream")
            if not self._tracker.at_boundary:
                raise self._fail(
                    f"truncated zstd stream (frame starting at byte {self._tracker.frame_start} "
                    "is incomplete)")
        return data

    def checksum(self) -> str:
        """BLAKE2b-160 of the compressed bytes read so far (the whole file once read to the end)."""
        rest = self._file.read(1 << 20)
        while rest:  # zstd may leave trailing bytes unread; hash the whole file
            self.raw.hash.update(rest)
            rest = self._file.read(1 << 20)
        return self.raw.hash.hexdigest()

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            self._file.close()

    def __enter__(self) -> "InputStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_chunks(stream: InputStream, chunk_bytes: int) -> Iterator[Chunk]:
    """Split the decompressed stream into chunks of complete lines (``chunk_bytes`` to
    ``2 * chunk_bytes`` bytes, or one longer line)."""
    line = 1
    buffer = bytearray()
    while True:
        data = stream.read(chunk_bytes)
        if not data:
            break
        buffer += data
        if len(buffer) < chunk_bytes:
            continue
        cut = buffer.rfind(b"\n")
        if cut < 0:
            continue  # one line longer than chunk_bytes: keep reading until it ends
        block = bytes(buffer[: cut + 1])
        del buffer[: cut + 1]
        yield Chunk(line, block)
        line += block.count(b"\n")
    if buffer:
        yield Chunk(line, bytes(buffer))


def file_checksum(path: str | Path) -> str:
    """BLAKE2b-160 of a file's bytes (same digest as InputStream.checksum)."""
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def input_identity(path: str | Path) -> dict:
    """What identifies an input file cheaply: absolute path, name, size, modification time."""
    stat = os.stat(path)
    return {"path": str(Path(path).resolve()), "name": Path(path).name,
            "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def parse_line(line: bytes, text_key: str, domain_key: tuple[str, ...]
               ) -> tuple[str, str, int] | str:
    """Classify one JSON line: ``(domain, text, utf8_text_bytes)`` or a skip reason string."""
    if not line or line.isspace():
        return "blank_line"
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid_utf8"
    try:
        obj = json.loads(decoded)
    except (ValueError, RecursionError):
        return "malformed_json"
    if not isinstance(obj, dict):
        return "malformed_json"
    if text_key not in obj:
        return "missing_text"
    text = obj[text_key]
    if not isinstance(text, str):
        return "non_string_text"
    container: object = obj
    for key in domain_key[:-1]:
        container = container.get(key) if isinstance(container, dict) else None
        if not isinstance(container, dict):
            return "missing_meta"
    domain = container.get(domain_key[-1])  # type: ignore[union-attr]
    if not isinstance(domain, str) or not domain or domain.isspace():
        return "missing_domain"
    if not text or text.isspace():
        return "empty_document"
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates from \\udXXX escapes
        return "invalid_utf8"
    return domain, text, size


def split_lines(data: bytes) -> list[bytes]:
    """Lines of a chunk without their b"\\n" (a final line without newline is kept)."""
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return lines


def iter_documents(path: str | Path, text_key: str = "text",
                   domain_key: str = "meta.pile_set_name") -> Iterator[tuple[str, str] | str]:
    """Yield ``(domain, text)`` or a skip reason for every line of one input (single process)."""
    dotted = tuple(domain_key.split("."))
    with InputStream(path) as stream:
        for chunk in iter_chunks(stream, 1 << 20):
            for line in split_lines(chunk.data):
                parsed = parse_line(line, text_key, dotted)
                yield parsed if isinstance(parsed, str) else parsed[:2]
