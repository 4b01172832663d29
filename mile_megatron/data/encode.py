"""Parse + tokenize chunks of JSON lines in worker processes, with bounded memory.

Pipeline (one process reads and writes, ``workers`` processes tokenize):

    reader (main) --chunk--> [bounded window of in-flight chunks] --> workers --> writer (main)

The main process submits a chunk only while fewer than ``queue_depth`` chunks are in flight and
writes results strictly in submission order, so the output order equals the input order for any
worker count (determinism) and memory is bounded (backpressure):

    chunk      <= 2 * chunk_bytes of complete lines (or one longer line, whole)
    main RSS   ~ base + queue_depth * (chunk + its token arrays, ~1.5 * chunk)
    worker RSS ~ base + tokenizer + a few * chunk
    (defaults: chunk_bytes = 1 MiB, queue_depth = 2 * workers)

plus the per-shard index of ~12 bytes per document written (e.g. ~85 MB for a 7M-document
Pile shard). Nothing else depends on the input file size.
Workers are started with the ``spawn`` method and import neither torch nor megatron. They exit
when the main process dies, even by ``kill -9`` (:func:`_exit_with_parent`), and so does
multiprocessing's resource tracker, which ends once the last worker is gone.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import Counter
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import chain

import numpy as np

from .domains import safe_domain_name
from .sources import Chunk, parse_line, split_lines
from .tokenizer import TokenizerSpec, load_tokenizer

MAX_SKIP_EXAMPLES = 5  # line numbers remembered per chunk for the summary


@dataclass(frozen=True)
class EncodeSettings:
    tokenizer: TokenizerSpec
    bos_id: int | None
    eod_id: int | None
    dtype: str
    text_key: str = "text"
    domain_key: tuple[str, ...] = ("meta", "pile_set_name")
    domains: frozenset[str] | None = None   # keep only these (original or safe names)


@dataclass
class ChunkResult:
    """Encoded documents of one chunk, in input order."""
    tokens: np.ndarray             # all documents' ids, concatenated (output dtype)
    lengths: np.ndarray            # int64 tokens per document (BOS/EOD included)
    domain_index: np.ndarray       # int32 index into domain_names per document
    text_bytes: np.ndarray         # int64 UTF-8 bytes of each document's text
    domain_names: list[str]
    lines: int
    input_bytes: int
    skipped: dict[str, int] = field(default_factory=dict)
    skip_examples: list[tuple[str, int]] = field(default_factory=list)
    filtered: dict[str, int] = field(default_factory=dict)


class ChunkEncoder:
    """Turns a chunk of raw lines into a ChunkResult (runs inside a worker)."""

    def __init__(self, settings: EncodeSettings) -> None:
        self.settings = settings
        self.tokenizer = load_tokenizer(settings.tokenizer)
        self.dtype = np.dtype(settings.dtype)
        self.prefix = () if settings.bos_id is None else (settings.bos_id,)
        self.suffix = () if settings.eod_id is None else (settings.eod_id,)
        self._keep: dict[str, bool] = {}

    def _kept(self, domain: str) -> bool:
        keep = self._keep.get(domain)
        if keep is None:
            allowed = self.settings.domains
            keep = allowed is None or domain in allowed or safe_domain_name(domain) in allowed
            self._keep[domain] = keep
        return keep

    def encode(self, chunk: Chunk) -> ChunkResult:
        settings = self.settings
        skipped: Counter[str] = Counter()
        filtered: Counter[str] = Counter()
        examples: list[tuple[str, int]] = []
        texts: list[str] = []
        sizes: list[int] = []
        domain_of_doc: list[int] = []
        names: dict[str, int] = {}
        lines = split_lines(chunk.data)
        for offset, line in enumerate(lines):
            parsed = parse_line(line, settings.text_key, settings.domain_key)
            if isinstance(parsed, str):
                skipped[parsed] += 1
                if len(examples) < MAX_SKIP_EXAMPLES:
                    examples.append((parsed, chunk.first_line + offset))
                continue
            domain, text, size = parsed
            if not self._kept(domain):
                filtered[domain] += 1
                continue
            texts.append(text)
            sizes.append(size)
            domain_of_doc.append(names.setdefault(domain, len(names)))
        ids = self.tokenizer.encode_batch(texts) if texts else []
        extra = len(self.prefix) + len(self.suffix)
        lengths = np.fromiter((len(doc) + extra for doc in ids), dtype=np.int64, count=len(ids))
        pieces = chain.from_iterable((self.prefix, doc, self.suffix) for doc in ids)
        tokens = np.fromiter(chain.from_iterable(pieces), dtype=np.int64, count=int(lengths.sum()))
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.tokenizer.vocab_size):
            raise ValueError("tokenizer produced an id outside its vocabulary")
        return ChunkResult(
            tokens=tokens.astype(self.dtype), lengths=lengths,
            domain_index=np.asarray(domain_of_doc, dtype=np.int32),
            text_bytes=np.asarray(sizes, dtype=np.int64), domain_names=list(names),
            lines=len(lines), input_bytes=len(chunk.data), skipped=dict(skipped),
            skip_examples=examples, filtered=dict(filtered))


_ENCODER: ChunkEncoder | None = None
PARENT_POLL_SECONDS = 1.0


def _exit_with_parent(parent_pid: int) -> None:
    """Make this worker end when the process that started it dies, even by ``kill -9``.

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, delivered by the kernel when the parent (strictly:
    the parent's thread that started this process, the pool owner's thread) exits. Everywhere, as
    a fallback: a daemon thread that exits when ``os.getppid()`` changes (checked every
    PARENT_POLL_SECONDS). Without this, workers block forever on the task queue, whose pipe
    they hold both ends of, and keep multiprocessing's resource tracker alive too (it exits when
    the last holder of its pipe is gone)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(PARENT_POLL_SECONDS)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _init_worker(settings: EncodeSettings, parent_pid: int | None = None) -> None:
    global _ENCODER
    if parent_pid is not None:
        _exit_with_parent(parent_pid)
    _ENCODER = ChunkEncoder(settings)


def _encode_in_worker(chunk: Chunk) -> ChunkResult:
    assert _ENCODER is not None, "worker not initialised"
    return _ENCODER.encode(chunk)


class EncoderPool:
    """``workers`` spawned processes, or inline encoding in this process when ``workers == 0``."""

    def __init__(self, settings: EncodeSettings, workers: int) -> None:
        self.workers = workers
        self._inline = ChunkEncoder(settings) if workers == 0 else None
        self._executor = None if workers == 0 else ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker, initargs=(settings, os.getpid()))

    def submit(self, chunk: Chunk) -> Future:
        if self._executor is not None:
            return self._executor.submit(_encode_in_worker, chunk)
        future: Future = Future()
        try:
            future.set_result(self._inline.encode(chunk))  # type: ignore[union-attr]
        except Exception as error:  # surfaced when the writer reads the result
            future.set_exception(error)
        return future

    def close(self, cancel: bool = False) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=cancel)
            self._executor = None

    def __enter__(self) -> "EncoderPool":
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        self.close(cancel=exc_type is not None)
