"""Streaming readers for Pile-format inputs (``.jsonl.zst``, ``.jsonl.gz``, ``.jsonl``).

Inputs are never decompressed to disk. :func:`iter_chunks` yields blocks of *complete* lines of
about ``chunk_bytes`` decompressed bytes (a single longer line is yielded whole, so the memory of
one chunk is ``max(chunk_bytes, longest line)``).

Damaged compressed input raises :class:`CorruptInputError`, which names the file, where the
damage was detected in the compressed bytes and how much was decoded before it:

* ``.zst``: the compressed bytes are fed to zstandard's decoder in pieces that never cross the
  end of a zstd block (:class:`ZstdFrameTracker` follows the frame and block headers), so a
  decoding error is attributed to the one block (or header) whose bytes completed it and is
  reported as "detected in compressed bytes A..B": the damage is at or before byte B, most
  likely inside A..B (an earlier byte of the same frame can only be the cause when it corrupted
  state that this block reused). A frame checksum mismatch brackets the whole frame (the decoder
  cannot tell where in it the content changed). A truncated file is reported at its end, with
  the frame it cuts. :func:`iter_chunks` adds the last complete line decoded before the damage.
* ``.gz``: Python's gzip module (truncation, CRC and corrupt deflate data), detected at or before
  the reported offset (the end of the last compressed read).

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
    """A compressed input is truncated or corrupt; the shard that reads it cannot complete.

    ``offset``: the damage is at or before this compressed byte offset (for truncation: the end
    of the file). ``start``: where the bracketing unit (zstd block, header or frame) begins, or
    None. ``decompressed``: bytes decoded before the damage; ``lines``: complete lines among
    them (set by :func:`iter_chunks`; None when unknown)."""

    def __init__(self, path: str | Path, offset: int, decompressed: int, detail: str,
                 start: int | None = None, where: str = "", approximate: bool = False) -> None:
        self.path, self.offset, self.decompressed, self.detail = str(path), offset, decompressed, detail
        self.start, self.where, self.approximate = start, where, approximate
        self.lines: int | None = None
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.start is not None:
            place = (f"; detected in compressed bytes {self.start}..{self.offset}"
                     + (f" ({self.where})" if self.where else "")
                     + f", so the damage is at or before compressed byte offset {self.offset}")
        elif self.approximate:
            place = (f"; detected after reading up to compressed byte offset {self.offset}, so "
                     "the damage is at or before it")
        else:
            place = f" at compressed byte offset {self.offset}"
        decoded = f"{self.decompressed} bytes were decoded before it"
        if self.lines:
            decoded += f", the last complete line among them is line {self.lines}"
        elif self.lines == 0:
            decoded += ", no complete line among them"
        return (f"{self.path}: {self.detail}{place}; {decoded}. This shard is stopped and left "
                "incomplete. Re-download or repair the file and rerun; completed shards are kept.")


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

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self.offset = 0
        self.hash = hashlib.blake2b(digest_size=20)

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


class ZstdFrameTracker:
    """Follows zstd frame and block headers: where each frame and block starts and ends, and
    whether the stream ends on a frame boundary.

    Format (RFC 8878): frame = magic 0xFD2FB528, header (descriptor byte, optional window byte,
    dictionary id 0/1/2/4 bytes, content size 0/1/2/4/8 bytes), blocks (3-byte little-endian
    header: bit 0 last block, bits 1-2 type, bits 3-23 size; an RLE block carries 1 byte), then
    a 4-byte checksum if flagged. Skippable frames: magic 0x184D2A5?, 4-byte size, payload.
    ``feed`` raises ValueError for a wrong magic number or a reserved block type.
    """

    FRAME_STATES = ("descriptor", "frame_header", "block_header", "block", "checksum")

    def __init__(self) -> None:
        self._pending = b""    # header bytes collected so far
        self._need = 4         # bytes needed by the current state
        self._skip = 0         # payload bytes still to skip
        self._state = "magic"
        self.frame_start = 0
        self.frame_header_end = 0
        self.block_start = 0   # the current (or last) block's header
        self.block_end = 0     # its end (header + payload), known once the header is read
        self.blocks = 0        # blocks of the current frame started so far
        self._position = 0
        self._checksum = False
        self._last_block = False

    @property
    def at_boundary(self) -> bool:
        return self._state == "magic" and not self._pending and self._skip == 0

    @property
    def state(self) -> str:
        return self._state

    @property
    def position(self) -> int:
        return self._position

    @property
    def unit_start(self) -> int:
        """Where the header or payload being collected began."""
        return self._position - len(self._pending)

    def room(self) -> int:
        """Bytes that can be fed before the current header or payload is complete."""
        return self._skip if self._skip else self._need - len(self._pending)

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
                header = self._pending
                self._advance(header)
                self._pending = b""

    def _advance(self, header: bytes) -> None:
        state = self._state
        if state == "magic":
            self.frame_start = self._position - 4
            magic = struct.unpack("<I", header)[0]
            if magic == 0xFD2FB528:
                self._state, self._need = "descriptor", 1
                self.blocks = 0
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
                self.frame_header_end = self._position
        elif state == "frame_header":
            self._state, self._need = "block_header", 3
            self.frame_header_end = self._position
        elif state == "block_header":
            value = header[0] | header[1] << 8 | header[2] << 16
            self._last_block = bool(value & 1)
            block_type, size = (value >> 1) & 3, value >> 3
            self.block_start = self._position - 3
            self.blocks += 1
            if block_type == 3:
                self.block_end = self._position
                raise ValueError("reserved zstd block type")
            self._skip = 1 if block_type == 1 else size
            self.block_end = self._position + self._skip
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


class _ZstdDecoder:
    """Decodes a .zst byte stream piece by piece, never feeding past the end of a zstd block,
    so that a decoding error can be attributed to the block (or header) that completed it."""

    PIECE = 1 << 16  # compressed bytes per decoder call at most

    def __init__(self, raw: _CountingReader, fail) -> None:
        self.raw = raw
        self.tracker = ZstdFrameTracker()
        self._fail = fail                # (detail, start, end, where) -> CorruptInputError
        self._decoder = None             # decompressobj of the current zstd frame
        self._magic = b""                # magic bytes held until the frame type is known
        self.frame_output_start = 0      # decoded bytes before the current frame
        self.output = 0                  # decoded bytes so far
        self.done = False

    def _frame_where(self) -> str:
        return f"the frame starting at compressed byte {self.tracker.frame_start}"

    def pump(self) -> bytes:
        """Decode the next piece; b"" with ``done`` set at a clean end of the stream."""
        tracker = self.tracker
        piece = self.raw.read(min(self.PIECE, tracker.room()))
        if not piece:
            self.done = True
            if self.raw.offset == 0:
                raise self._fail("empty file, not a zstd stream", None, None, "")
            if tracker.state == "magic" and not tracker.at_boundary:
                raise self._fail(f"truncated zstd stream ({self.raw.offset - tracker.unit_start} "
                                 "stray bytes after the last complete frame)", None, None, "")
            if not tracker.at_boundary:
                detail = f"truncated zstd stream (the file ends inside {self._frame_where()}"
                if tracker.state == "block":
                    detail += (f", in its block {tracker.blocks} at compressed bytes "
                               f"{tracker.block_start}..{tracker.block_end}")
                raise self._fail(detail + ")", None, None, "")
            return b""
        before = tracker.state
        start = tracker.unit_start
        try:
            tracker.feed(piece)
        except ValueError as error:
            raise self._fail(f"corrupt zstd data ({error})", start, tracker.position,
                             "a frame or block header") from None
        if before == "magic":  # the piece holds magic-number bytes
            self._magic += piece
            if tracker.state == "descriptor":  # a zstd frame begins
                piece, self._magic = self._magic, b""
                self._decoder = zstandard.ZstdDecompressor().decompressobj()
                self.frame_output_start = self.output
            elif tracker.state == "magic":
                return b""  # still collecting the magic number
            else:
                self._magic = b""  # a skippable frame: not for the decoder
                return b""
        elif before not in ZstdFrameTracker.FRAME_STATES:
            return b""  # inside a skippable frame
        try:
            data = self._decoder.decompress(piece)
        except zstandard.ZstdError as error:
            end = tracker.position
            if before == "checksum":
                raise self._fail(
                    f"zstd frame checksum mismatch ({error}): the frame's decoded content "
                    f"(output bytes {self.frame_output_start}..{self.output}) differs "
                    "from what was compressed", tracker.frame_start, end,
                    "the whole frame: a checksum cannot tell where in it") from None
            if before == "block":
                raise self._fail(f"corrupt zstd data ({error})", tracker.block_start,
                                 tracker.block_end, f"block {tracker.blocks} of "
                                 f"{self._frame_where()}, most likely inside it") from None
            if before == "block_header":
                raise self._fail(f"corrupt zstd data ({error})", start, end,
                                 f"the header of block {tracker.blocks} of "
                                 f"{self._frame_where()}") from None
            raise self._fail(f"corrupt zstd data ({error})", tracker.frame_start, end,
                             f"the header of {self._frame_where()}") from None
        if tracker.state == "magic" and before in ZstdFrameTracker.FRAME_STATES:
            if not self._decoder.eof:  # the headers say the frame ended; the decoder disagrees
                raise self._fail("corrupt zstd data (the decoder expects more of this frame)",
                                 tracker.frame_start, tracker.position, "the whole frame")
        self.output += len(data)
        return data


@dataclass
class Chunk:
    """Complete lines ``data`` (ending in b"\\n" except possibly the file's last line)."""
    first_line: int        # 1-based line number of the first line in ``data``
    data: bytes


class InputStream:
    """Decompressed byte stream of one input file; raises CorruptInputError on damage.

    Bytes decoded before the damage are returned first; the error is raised by the next read."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.kind = compression_of(self.path)
        self._file = open(self.path, "rb", buffering=_READ_SIZE)
        self.raw = _CountingReader(self._file)
        self.decompressed = 0        # bytes handed out by read()
        self._buffer = bytearray()   # decoded, not yet handed out
        self._error: CorruptInputError | None = None
        self._zstd: _ZstdDecoder | None = None
        if self.kind == "zst":
            self._zstd = _ZstdDecoder(self.raw, self._zstd_fail)
            self._stream = None
        elif self.kind == "gz":
            self._stream = gzip.GzipFile(fileobj=io.BufferedReader(self.raw, _READ_SIZE), mode="rb")
        else:
            self._stream = self.raw

    def _decoded(self) -> int:
        return self.decompressed + len(self._buffer)

    def _zstd_fail(self, detail: str, start: int | None, end: int | None,
                   where: str) -> CorruptInputError:
        offset = self.raw.offset if end is None else end
        return CorruptInputError(self.path, offset, self._decoded(), detail, start, where)

    def _fail(self, detail: str) -> CorruptInputError:
        return CorruptInputError(self.path, self.raw.offset, self._decoded(), detail,
                                 approximate=True)

    def _fill(self, size: int) -> None:
        """Decode until ``size`` bytes are buffered, the stream ends or damage is found."""
        try:
            if self._zstd is not None:
                while len(self._buffer) < size and not self._zstd.done:
                    self._buffer += self._zstd.pump()
                return
            while len(self._buffer) < size:
                data = self._stream.read(size - len(self._buffer))
                if not data:
                    return
                self._buffer += data
        except CorruptInputError as error:
            self._error = error
        except EOFError as error:
            self._error = CorruptInputError(self.path, self.raw.offset, self._decoded(),
                                            f"truncated gzip stream ({error})")
        except (gzip.BadGzipFile, zlib.error, OSError) as error:
            self._error = self._fail(f"corrupt {self.kind} data ({error})")

    def read(self, size: int) -> bytes:
        if self._error is None and len(self._buffer) < size:
            self._fill(size)
        if not self._buffer and self._error is not None:
            raise self._error
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        self.decompressed += len(data)
        return data

    def checksum(self) -> str:
        """BLAKE2b-160 of the compressed bytes read so far (the whole file once read to the end)."""
        rest = self._file.read(1 << 20)
        while rest:  # hash the whole file, whatever the decoder left unread
            self.raw.hash.update(rest)
            rest = self._file.read(1 << 20)
        return self.raw.hash.hexdigest()

    def close(self) -> None:
        try:
            if self._stream is not None and self._stream is not self.raw:
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
        try:
            data = stream.read(chunk_bytes)
        except CorruptInputError as error:
            if error.lines is None:  # complete lines decoded before the damage
                error.lines = line - 1 + buffer.count(b"\n")
            raise
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
