"""Per-input-shard outputs, written atomically, and the manifest of completed shards.

Layout of an output directory::

    OUT/shards/<split>/<shard_id>/<Domain>.bin|.idx   one Megatron indexed dataset per domain
    OUT/shards/<split>/<shard_id>/shard.json          written last: counts, input identity, config
    OUT/shards/<split>/.<shard_id>.partial-<pid>/     work in progress (removed on the next run)
    OUT/manifest.json                                 aggregate of all shard.json + pending/failed

A shard is complete exactly when ``OUT/shards/<split>/<shard_id>/shard.json`` exists: the
directory is built under a ``.partial`` name and renamed into place in one step after every
``.idx`` and ``shard.json`` are on disk, so a killed run never leaves a directory that looks
complete. ``shard_id`` comes from the input file name (``train/07.jsonl.zst`` -> ``07``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from ..utils.fs import atomic_write_json, fsync_dir, read_json, remove_tree, replace_dir
from .domains import SafeNameRegistry, natural_key
from .encode import ChunkResult
from .indexed import IndexedDatasetWriter

SHARD_FORMAT = "mile-preprocess-shard/1"
MANIFEST_FORMAT = "mile-preprocess-manifest/1"
SPLITS = ("train", "valid", "test")
_STEM = re.compile(r"(\.(jsonl|json|txt))?(\.(zst|zstd|gz))?$", re.IGNORECASE)


def shard_stem(path: str | Path) -> str:
    name = _STEM.sub("", Path(path).name) or Path(path).name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.") or "shard"


def assign_shard_ids(paths: list[Path]) -> list[str]:
    """Stable ids from file names; parent directory added where names collide."""
    ids = [shard_stem(path) for path in paths]
    if len(set(ids)) != len(ids):
        ids = [f"{shard_stem(path.parent.name + '.x')}_{stem}" for path, stem in zip(paths, ids)]
        if len(set(ids)) != len(ids):
            seen: dict[str, Path] = {}
            for path, shard_id in zip(paths, ids):
                if shard_id in seen:
                    raise ValueError(f"inputs {seen[shard_id]} and {path} map to the same shard id "
                                     f"{shard_id!r}; rename one or process them in separate runs")
                seen[shard_id] = path
    return ids


def make_builder(bin_path: Path, dtype: np.dtype) -> IndexedDatasetWriter:
    """Writer of one Megatron indexed dataset (see :mod:`.indexed`; no torch needed)."""
    return IndexedDatasetWriter(bin_path, dtype)


def shard_dir(out: Path, split: str, shard_id: str) -> Path:
    return Path(out) / "shards" / split / shard_id


def clean_partials(out: Path) -> list[Path]:
    """Remove work-in-progress directories left by killed runs; return what was removed."""
    removed = []
    root = Path(out) / "shards"
    for split_dir in root.glob("*") if root.is_dir() else []:
        for partial in split_dir.glob(".*.partial-*"):
            remove_tree(partial)
            removed.append(partial)
        for old in split_dir.glob(".*.old-*"):
            remove_tree(old)
    for leftover in [*Path(out).glob(".datasets.partial-*"), *Path(out).glob(".datasets.old-*")]:
        remove_tree(leftover)
        removed.append(leftover)
    return removed


def load_shard_record(directory: Path) -> dict | None:
    marker = directory / "shard.json"
    if not marker.is_file():
        return None
    record = read_json(marker)
    return record if record.get("format") == SHARD_FORMAT else None


class ShardWriter:
    """Writes one shard's per-domain datasets under a partial name; ``commit`` publishes it."""

    def __init__(self, out: Path, split: str, shard_id: str, dtype: np.dtype) -> None:
        self.final = shard_dir(out, split, shard_id)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.partial = self.final.with_name(f".{shard_id}.partial-{os.getpid()}")
        remove_tree(self.partial)
        self.partial.mkdir()
        self.dtype = np.dtype(dtype)
        self.names = SafeNameRegistry()
        self.builders: dict[str, object] = {}
        self.domains: dict[str, dict[str, int]] = {}
        self.skipped: dict[str, int] = {}
        self.skip_examples: list[dict] = []
        self.filtered: dict[str, int] = {}
        self.lines = 0
        self.decompressed_bytes = 0
        self.chunks = 0

    def add(self, result: ChunkResult) -> None:
        self.chunks += 1
        self.lines += result.lines
        self.decompressed_bytes += result.input_bytes
        for reason, count in result.skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + count
        for reason, line in result.skip_examples:
            if len(self.skip_examples) < 20:
                self.skip_examples.append({"reason": reason, "line": line})
        for domain, count in result.filtered.items():
            self.filtered[domain] = self.filtered.get(domain, 0) + count
        builders = []
        for domain in result.domain_names:
            builder = self.builders.get(domain)
            if builder is None:
                safe = self.names.add(domain)  # DomainNameCollision only on a hash collision
                builder = make_builder(self.partial / f"{safe}.bin", self.dtype)
                self.builders[domain] = builder
                self.domains[domain] = {"safe_name": safe, "documents": 0, "tokens": 0,
                                        "text_bytes": 0}
            builders.append(builder)
        n = len(result.domain_names)
        if n == 1:
            builders[0].add_documents(result.tokens, result.lengths)
        elif n > 1:  # each domain's documents in input order, one write per domain
            token_domain = np.repeat(result.domain_index, result.lengths)
            for i, builder in enumerate(builders):
                builder.add_documents(result.tokens[token_domain == i],
                                      result.lengths[result.domain_index == i])
        per_docs = np.bincount(result.domain_index, minlength=n)
        per_tokens = np.bincount(result.domain_index, weights=result.lengths, minlength=n)
        per_bytes = np.bincount(result.domain_index, weights=result.text_bytes, minlength=n)
        for i, domain in enumerate(result.domain_names):
            stats = self.domains[domain]
            stats["documents"] += int(per_docs[i])
            stats["tokens"] += int(round(per_tokens[i]))
            stats["text_bytes"] += int(round(per_bytes[i]))

    def commit(self, record: dict) -> dict:
        """Finish every dataset, write shard.json, publish the directory atomically."""
        for domain, builder in self.builders.items():
            builder.finalize(str(self.partial / f"{self.domains[domain]['safe_name']}.idx"))
        for path in self.partial.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        record = dict(record, format=SHARD_FORMAT,
                      domains={d: self.domains[d] for d in sorted(self.domains, key=natural_key)},
                      documents=sum(s["documents"] for s in self.domains.values()),
                      tokens=sum(s["tokens"] for s in self.domains.values()),
                      text_bytes=sum(s["text_bytes"] for s in self.domains.values()),
                      lines=self.lines, decompressed_bytes=self.decompressed_bytes,
                      skipped=dict(sorted(self.skipped.items())), skip_examples=self.skip_examples,
                      filtered=dict(sorted(self.filtered.items())))
        atomic_write_json(self.partial / "shard.json", record)
        fsync_dir(self.partial)
        replace_dir(self.partial, self.final)
        return record

    def abort(self) -> None:
        for builder in self.builders.values():
            try:
                builder.close()
            except OSError:
                pass
        remove_tree(self.partial)


def write_manifest(out: Path, config: dict, tokenizer_path: str, shards: list[dict],
                   pending: list[str], failed: dict[str, str]) -> None:
    """Aggregate view of the output directory (shard.json files remain the source of truth)."""
    atomic_write_json(Path(out) / "manifest.json", {
        "format": MANIFEST_FORMAT, "config": config, "tokenizer_path": tokenizer_path,
        "complete": not pending and not failed,
        "shards": shards, "pending": pending, "failed": failed})
