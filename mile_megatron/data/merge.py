"""Final merge: one Megatron indexed dataset per (split, domain) from completed shards.

Sources are one or more output directories (e.g. produced on several machines, each with its own
``shards/``). Shards are concatenated per domain in natural order of their shard id
(``00, 01, ..., 29``), so the merged bytes do not depend on which machine produced which shard or
on the worker count. Every source must share the tokenizer fingerprint, BOS/EOD policy, dtype and
keys (checked from each ``shard.json``); a shard id seen twice must come from the same input
(same size and checksum) and is used once.

Output names are recorded per domain in every ``shard.json`` (:func:`.domains.safe_domain_name`,
a pure injective function, so machines agree); before anything is written the merge checks that
each domain has one output name and each name one domain in every split (shards written under
an older naming rule are refused rather than merged into one file).

Results go to ``OUT/datasets/<split>/<Domain>.bin|.idx`` (built under a partial name and renamed
into place), then ``OUT/blends/*`` and ``OUT/summary.json`` / ``OUT/summary.txt``; each merged
dataset's documents and tokens are checked against the shard records.
Memory: the index writer holds 12 bytes per document of the largest merged domain (20 while
writing its ``.idx``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..utils.fs import atomic_write_json, atomic_write_text, remove_tree, replace_dir
from .blends import write_blends
from .domains import natural_key
from .shards import SPLITS, load_shard_record, make_builder
from .summary import build_summary, render_table


class MergeError(ValueError):
    """Sources cannot be merged (incompatible settings, conflicting or missing shards)."""


def collect_shards(sources: list[Path]) -> list[tuple[dict, Path]]:
    """Completed shard records with their directories, checked for compatibility."""
    found: dict[tuple[str, str], tuple[dict, Path]] = {}
    config = None
    for source in sources:
        root = Path(source) / "shards"
        if not root.is_dir():
            raise MergeError(f"{source} holds no shards/ directory; is it a mile-preprocess "
                             "output directory?")
        for split in SPLITS:
            for directory in sorted((root / split).glob("*"), key=lambda p: natural_key(p.name)):
                if directory.name.startswith(".") or not directory.is_dir():
                    continue
                record = load_shard_record(directory)
                if record is None:
                    continue
                if config is None:
                    config = record["config"]
                elif record["config"] != config:
                    raise MergeError(
                        f"{directory} was produced with different settings than the other shards "
                        f"({_diff(config, record['config'])}); merge only outputs made with the "
                        "same tokenizer, BOS/EOD policy, dtype and keys")
                key = (split, record["shard_id"])
                if key in found:
                    other = found[key][0]["input"]
                    if (other["size"], other.get("blake2b")) != (record["input"]["size"],
                                                                 record["input"].get("blake2b")):
                        raise MergeError(f"shard {split}/{record['shard_id']} exists in "
                                         f"{found[key][1]} and {directory} from different inputs")
                    continue
                found[key] = (record, directory)
    if not found:
        raise MergeError("no completed shards in " + ", ".join(map(str, sources)))
    return [found[key] for key in sorted(found, key=lambda k: (SPLITS.index(k[0]), natural_key(k[1])))]


def check_output_names(shards: list[tuple[dict, Path]]) -> None:
    """Per split, each domain has one output name and each output name one domain, and every
    shard holds the files its record lists; raised before anything is written."""
    for split in SPLITS:
        names: dict[str, dict[str, Path]] = {}     # domain -> output name -> a shard directory
        domains: dict[str, dict[str, Path]] = {}   # output name -> domain -> a shard directory
        for record, directory in shards:
            if record["split"] != split:
                continue
            for domain, stats in record["domains"].items():
                name = stats["safe_name"]
                names.setdefault(domain, {}).setdefault(name, directory)
                domains.setdefault(name, {}).setdefault(domain, directory)
                for suffix in (".bin", ".idx"):
                    if not (directory / f"{name}{suffix}").is_file():
                        raise MergeError(f"{directory / (name + suffix)} is missing although "
                                         f"{directory / 'shard.json'} lists it; delete {directory} "
                                         "and rerun that shard")
        for domain, seen in names.items():
            if len(seen) > 1:
                where = ", ".join(f"{n!r} in {d}" for n, d in sorted(seen.items()))
                raise MergeError(
                    f"{split} domain {domain!r} has different output names ({where}): the shards "
                    "were written by mile-preprocess versions with different naming rules; delete "
                    "the older shard directories and rerun them")
        for name, seen in domains.items():
            if len(seen) > 1:
                where = ", ".join(f"{d!r} in {p}" for d, p in sorted(seen.items()))
                raise MergeError(
                    f"{split} domains {where} share the output name {name!r}, so one would "
                    "overwrite the other; these shards predate the injective naming rule: delete "
                    "them and rerun them")


def _diff(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return "differs in " + ", ".join(keys)


def merge_datasets(shards: list[tuple[dict, Path]], out: Path) -> Path:
    """Concatenate shards per (split, domain) into OUT/datasets; return that directory."""
    out = Path(out)
    partial = out / f".datasets.partial-{os.getpid()}"
    remove_tree(partial)
    dtype = np.dtype(shards[0][0]["config"]["dtype"])
    try:
        for split in SPLITS:
            members = [(r, d) for r, d in shards if r["split"] == split]
            domains = sorted({dom for r, _ in members for dom in r["domains"]}, key=natural_key)
            if not members:
                continue
            (partial / split).mkdir(parents=True)
            for domain in domains:
                safe = {r["domains"][domain]["safe_name"] for r, _ in members if domain in r["domains"]}
                if len(safe) != 1:
                    raise MergeError(f"domain {domain!r} has several output names {sorted(safe)}")
                name = safe.pop()
                builder = make_builder(partial / split / f"{name}.bin", dtype)
                tokens = documents = 0
                for record, directory in members:
                    if domain in record["domains"]:
                        try:
                            builder.add_index(directory / name)
                        except ValueError as error:
                            raise MergeError(f"{error}; delete {directory} and rerun that "
                                             "shard") from None
                        tokens += record["domains"][domain]["tokens"]
                        documents += record["domains"][domain]["documents"]
                builder.finalize(str(partial / split / f"{name}.idx"))
                size = (partial / split / f"{name}.bin").stat().st_size
                if size != tokens * dtype.itemsize or len(builder.sequence_lengths) != documents:
                    raise MergeError(f"merged {split}/{name} has {size} bytes and "
                                     f"{len(builder.sequence_lengths)} documents; the shard "
                                     f"records say {tokens} tokens and {documents} documents")
        replace_dir(partial, out / "datasets")
    except BaseException:
        remove_tree(partial)
        raise
    return out / "datasets"


def merge_outputs(sources: list[Path], out: Path, weights: str = "paper",
                  select: set[tuple[str, str]] | None = None) -> dict:
    """Merge completed shards of ``sources`` (only ``select``ed (split, id) if given) into ``out``."""
    shards = collect_shards(sources)
    if select is not None:
        shards = [(r, d) for r, d in shards if (r["split"], r["shard_id"]) in select]
        missing = sorted(f"{s}/{i}" for s, i in select - {(r["split"], r["shard_id"]) for r, _ in shards})
        if missing:
            raise MergeError("shards not complete: " + ", ".join(missing))
    check_output_names(shards)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("summary.json", "summary.txt"):
        (out / stale).unlink(missing_ok=True)
    datasets = merge_datasets(shards, out)
    config = shards[0][0]["config"]
    summary = build_summary([r for r, _ in shards], config)
    summary["datasets"] = str(datasets.resolve())
    summary["sources"] = sorted({str(Path(d).resolve().parent.parent.parent) for _, d in shards})
    summary["blends"] = write_blends(out, datasets, summary, weights)
    atomic_write_text(out / "summary.txt", render_table(summary) + "\n")
    atomic_write_json(out / "summary.json", summary)
    return summary
