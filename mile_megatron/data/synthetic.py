"""Small Pile-format corpora for tests and the demo, built only from text shipped with Python.

Documents are paragraphs of ``pydoc_data.topics.topics`` (the interpreter's help texts) plus a
few non-ASCII sentences spelled with ``unicodedata`` character names, assigned round-robin to the
Pile's 22 domains so every shard covers every domain. Output is fully determined by ``seed``.

    corpus = write_pile_like_corpus(out_dir, train_shards=3, documents_per_shard=66,
                                    valid_documents=44, seed=0)
    corpus.train_files   # [train/00.jsonl.zst, train/01.jsonl.gz, train/02.jsonl]
    corpus.val_file      # val.jsonl.zst

Helpers for robustness tests: :data:`BAD_LINES` (one malformed line per skip reason),
:func:`inject_bad_lines` and :func:`damage_zst` (truncate or corrupt a ``.zst`` file).
"""

from __future__ import annotations

import gzip
import io
import json
import random
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from .domains import PILE_DOMAINS

FORMATS = (".jsonl.zst", ".jsonl.gz", ".jsonl")

# One example line per skip reason (see sources.SKIP_REASONS); each is skipped and counted.
BAD_LINES: dict[str, list[bytes]] = {
    "blank_line": [b"", b"   \t"],
    "invalid_utf8": [b'{"text": "caf\xe9 au lait", "meta": {"pile_set_name": "ArXiv"}}',
                     b'{"text": "lone surrogate \\ud800", "meta": {"pile_set_name": "ArXiv"}}'],
    "malformed_json": [b'{"text": "unterminated string, "meta": {}', b'[1, 2, 3]'],
    "missing_text": [b'{"meta": {"pile_set_name": "Github"}}'],
    "non_string_text": [b'{"text": 42, "meta": {"pile_set_name": "Github"}}',
                        b'{"text": null, "meta": {"pile_set_name": "Github"}}'],
    "missing_meta": [b'{"text": "no meta here"}', b'{"text": "meta is a list", "meta": []}'],
    "missing_domain": [b'{"text": "no domain", "meta": {}}',
                       b'{"text": "numeric domain", "meta": {"pile_set_name": 7}}'],
    "empty_document": [b'{"text": "", "meta": {"pile_set_name": "Pile-CC"}}',
                       b'{"text": " \\n\\t ", "meta": {"pile_set_name": "Pile-CC"}}'],
}

_UNICODE_NAMES = (
    "LATIN SMALL LETTER E WITH ACUTE", "GREEK SMALL LETTER ALPHA", "GREEK SMALL LETTER BETA",
    "CYRILLIC SMALL LETTER ZHE", "HIRAGANA LETTER A", "CJK UNIFIED IDEOGRAPH-6587",
    "ARABIC LETTER BEH", "DEVANAGARI LETTER KA", "EURO SIGN", "SNOWMAN", "INFINITY",
    "HEBREW LETTER ALEF", "LATIN SMALL LETTER SHARP S", "EM DASH")


@dataclass
class SyntheticCorpus:
    """Paths of a generated corpus and the documents each file holds (in file order)."""
    root: Path
    train_files: list[Path]
    val_file: Path
    documents: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # path -> docs

    def __getitem__(self, key: str):  # dict-style access for callers that prefer it
        return getattr(self, key)

    def as_dict(self) -> dict:
        return {"root": str(self.root), "train_files": [str(p) for p in self.train_files],
                "val_file": str(self.val_file)}


def _paragraphs() -> list[str]:
    from pydoc_data.topics import topics

    paragraphs = []
    for name in sorted(topics):
        for block in topics[name].split("\n\n"):
            block = block.strip()
            if len(block) >= 40:
                paragraphs.append(block[:700])
    return paragraphs


def _unicode_sentence(rng: random.Random) -> str:
    chars = [unicodedata.lookup(rng.choice(_UNICODE_NAMES)) for _ in range(rng.randint(3, 12))]
    return "Unicode sample: " + " ".join("".join(chars[i:i + 3]) for i in range(0, len(chars), 3))


def make_documents(count: int, rng: random.Random, rotation: int = 0,
                   paragraphs: list[str] | None = None,
                   paragraphs_per_document: tuple[int, int] = (1, 3)) -> list[tuple[str, str]]:
    """``count`` (domain, text) pairs; domains round-robin from ``rotation``, order shuffled."""
    paragraphs = paragraphs or _paragraphs()
    docs = []
    for index in range(count):
        domain = PILE_DOMAINS[(index + rotation) % len(PILE_DOMAINS)]
        parts = [rng.choice(paragraphs) for _ in range(rng.randint(*paragraphs_per_document))]
        if rng.random() < 0.25:
            parts.insert(rng.randint(0, len(parts)), _unicode_sentence(rng))
        docs.append((domain, f"[{domain}] " + "\n\n".join(parts)))
    rng.shuffle(docs)
    return docs


def encode_lines(docs: list[tuple[str, str]], rng: random.Random) -> list[bytes]:
    lines = []
    for domain, text in docs:
        record = {"text": text, "meta": {"pile_set_name": domain}}
        lines.append(json.dumps(record, ensure_ascii=rng.random() < 0.5).encode("utf-8"))
    return lines


def write_lines(path: Path, lines: list[bytes]) -> Path:
    """Write JSON lines with the compression given by the suffix (.zst: 2 frames, checksums)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join(line + b"\n" for line in lines)
    if path.name.endswith(".zst"):
        half = data.rfind(b"\n", 0, len(data) // 2) + 1  # two frames, split at a line end
        compressor = zstandard.ZstdCompressor(level=3, write_checksum=True)
        blob = compressor.compress(data[:half]) + compressor.compress(data[half:])
    elif path.name.endswith(".gz"):
        buffer = io.BytesIO()
        with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as handle:
            handle.write(data)
        blob = buffer.getvalue()
    else:
        blob = data
    path.write_bytes(blob)
    return path


def read_lines(path: Path) -> list[bytes]:
    blob = Path(path).read_bytes()
    if path.name.endswith(".zst"):
        blob = _decompress_all_frames(blob)
    elif path.name.endswith(".gz"):
        blob = gzip.decompress(blob)
    lines = blob.split(b"\n")
    return lines[:-1] if lines and lines[-1] == b"" else lines


def _decompress_all_frames(blob: bytes) -> bytes:
    out = []
    while blob:
        decompressor = zstandard.ZstdDecompressor().decompressobj()
        out.append(decompressor.decompress(blob))
        blob = decompressor.unused_data
    return b"".join(out)


def write_pile_like_corpus(out_dir: str | Path, train_shards: int = 3,
                           documents_per_shard: int = 66, valid_documents: int = 44,
                           seed: int = 0, formats: tuple[str, ...] = FORMATS,
                           bad_lines: bool = False,
                           paragraphs_per_document: tuple[int, int] = (1, 3)) -> SyntheticCorpus:
    """Write ``train/NN<fmt>`` shards (formats cycle .jsonl.zst/.jsonl.gz/.jsonl) and
    ``val.jsonl.zst``. With ``bad_lines`` every file also gets each BAD_LINES entry once.
    Documents hold 1-3 paragraphs (~1 KB) by default; (4, 12) gives ~4 KB, the Pile's mean."""
    root = Path(out_dir)
    rng = random.Random(seed)
    paragraphs = _paragraphs()
    corpus = SyntheticCorpus(root, [], root / "val.jsonl.zst")
    specs = [(root / "train" / f"{i:02d}{formats[i % len(formats)]}", documents_per_shard, i)
             for i in range(train_shards)]
    specs.append((corpus.val_file, valid_documents, 7))
    for path, count, rotation in specs:
        docs = make_documents(count, rng, rotation, paragraphs, paragraphs_per_document)
        lines = encode_lines(docs, rng)
        if bad_lines:
            lines = _insert_bad(lines, rng)
        write_lines(path, lines)
        corpus.documents[str(path)] = docs
        if path != corpus.val_file:
            corpus.train_files.append(path)
    return corpus


def _insert_bad(lines: list[bytes], rng: random.Random) -> list[bytes]:
    lines = list(lines)
    for kind in BAD_LINES:
        for bad in BAD_LINES[kind]:
            lines.insert(rng.randint(0, len(lines)), bad)
    return lines


def expected_bad_counts() -> Counter:
    """Skip counts one application of BAD_LINES produces."""
    return Counter({kind: len(lines) for kind, lines in BAD_LINES.items()})


def inject_bad_lines(path: str | Path, seed: int = 0) -> Counter:
    """Insert every BAD_LINES entry into an existing file (same compression); return counts."""
    path = Path(path)
    write_lines(path, _insert_bad(read_lines(path), random.Random(seed)))
    return expected_bad_counts()


def damage_zst(path: str | Path, mode: str = "truncate", fraction: float = 0.5) -> int:
    """Truncate a .zst file at ``fraction`` of its size, or overwrite 32 bytes there with
    garbage (``mode="corrupt"``; detected by the frame checksum at the latest). Returns the
    byte offset of the damage."""
    path = Path(path)
    blob = bytearray(path.read_bytes())
    offset = max(1, int(len(blob) * fraction))
    if mode == "truncate":
        del blob[offset:]
    elif mode == "corrupt":
        garbage = random.Random(offset).randbytes(32)
        blob[offset:offset + 32] = bytes(b ^ 0xA5 ^ g for b, g in zip(blob[offset:offset + 32], garbage))
    else:
        raise ValueError(f"mode must be 'truncate' or 'corrupt', not {mode!r}")
    path.write_bytes(bytes(blob))
    return offset
