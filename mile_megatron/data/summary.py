"""Summary of a preprocessing output: documents, tokens and bytes per split and domain, skips."""

from __future__ import annotations

from .domains import natural_key
from .shards import SPLITS


def build_summary(records: list[dict], config: dict) -> dict:
    """Aggregate shard records into ``{"splits": {split: {...}}, "config": ...}``."""
    splits: dict[str, dict] = {}
    for record in sorted(records, key=lambda r: (SPLITS.index(r["split"]), natural_key(r["shard_id"]))):
        split = splits.setdefault(record["split"], {
            "shards": [], "documents": 0, "tokens": 0, "text_bytes": 0, "lines": 0,
            "decompressed_bytes": 0, "domains": {}, "skipped": {}, "filtered": {}})
        split["shards"].append(record["shard_id"])
        for key in ("documents", "tokens", "text_bytes", "lines", "decompressed_bytes"):
            split[key] += record[key]
        for domain, stats in record["domains"].items():
            total = split["domains"].setdefault(domain, {"safe_name": stats["safe_name"],
                                                         "documents": 0, "tokens": 0,
                                                         "text_bytes": 0})
            for key in ("documents", "tokens", "text_bytes"):
                total[key] += stats[key]
        for field in ("skipped", "filtered"):
            for key, count in record[field].items():
                split[field][key] = split[field].get(key, 0) + count
    for split in splits.values():
        split["domains"] = {d: split["domains"][d] for d in sorted(split["domains"], key=natural_key)}
        split["skipped"] = dict(sorted(split["skipped"].items()))
        split["skipped_total"] = sum(split["skipped"].values())
    return {"format": "mile-preprocess-summary/1", "config": config,
            "splits": {s: splits[s] for s in SPLITS if s in splits}}


def render_table(summary: dict) -> str:
    """Readable fixed-width table of a summary."""
    lines = []
    for split, data in summary["splits"].items():
        lines.append(f"== {split}: {len(data['shards'])} shard(s), {data['lines']:,} lines ==")
        header = f"{'domain':<24} {'output name':<24} {'documents':>12} {'tokens':>15} {'MB text':>10} {'tok/doc':>9}"
        lines += [header, "-" * len(header)]
        for domain, stats in data["domains"].items():
            per_doc = stats["tokens"] / max(stats["documents"], 1)
            lines.append(f"{domain[:24]:<24} {stats['safe_name'][:24]:<24} {stats['documents']:>12,} "
                         f"{stats['tokens']:>15,} {stats['text_bytes'] / 1e6:>10.2f} {per_doc:>9.1f}")
        lines.append(f"{'total':<24} {'':<24} {data['documents']:>12,} {data['tokens']:>15,} "
                     f"{data['text_bytes'] / 1e6:>10.2f}")
        if data["skipped"]:
            lines.append("skipped lines: " + ", ".join(f"{k}={v:,}" for k, v in data["skipped"].items()))
        else:
            lines.append("skipped lines: none")
        if data["filtered"]:
            lines.append("filtered out by --domains: " + ", ".join(
                f"{k}={v:,}" for k, v in sorted(data["filtered"].items())))
        lines.append("")
    return "\n".join(lines)
