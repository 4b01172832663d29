"""Blend files for Megatron's ``--data-args-path`` and ``--per-split-data-args-path``.

Formats read by megatron-core 0.19.2 (``megatron.training.utils.get_blend_and_blend_per_split``):

* ``--data-args-path FILE``: whitespace-separated ``weight prefix weight prefix ...`` (one pair
  per line here); used as a single distribution together with ``--split``.
* ``--per-split-data-args-path FILE``: JSON ``{"train": [...], "valid": [...], "test": [...]}``;
  each list is ``[weight, prefix, ...]`` or ``[prefix, ...]``; ``null`` means no such split.
  The ``valid`` list holds one unweighted prefix per domain, so Megatron's
  ``--multiple-validation-sets --full-validation`` evaluates every domain separately
  (that flag requires unweighted validation lists); ``validation_sets.json`` records the names
  for ``--validation-set-names`` in the same order, and the Megatron flags to pass (none when
  there is a single validation domain: Megatron then builds one plain validation dataset).

Weights: ``paper`` = the MiLe paper's Pile weights renormalised over the train domains present
(only written when every train domain is a Pile domain); ``tokens`` = proportional to each
domain's train tokens. Prefixes are absolute paths (Megatron splits these files on whitespace,
so an output path containing whitespace is rejected).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..utils.fs import atomic_write_json, atomic_write_text
from .domains import PILE_DOMAIN_WEIGHTS

WEIGHT_KINDS = ("paper", "tokens")


def blend_weights(train_domains: dict[str, dict], kind: str) -> dict[str, float] | None:
    """Normalised weights per train domain (domains with tokens only); None if unavailable."""
    present = {d: s for d, s in train_domains.items() if s["tokens"] > 0}
    if not present:
        return None
    if kind == "paper":
        if any(domain not in PILE_DOMAIN_WEIGHTS for domain in present):
            return None
        raw = {d: PILE_DOMAIN_WEIGHTS[d] for d in present}
    elif kind == "tokens":
        raw = {d: float(s["tokens"]) for d, s in present.items()}
    else:
        raise ValueError(f"unknown weights {kind!r}; choose one of {WEIGHT_KINDS}")
    total = sum(raw.values())
    return {d: w / total for d, w in raw.items()}


def _check_prefix(prefix: str) -> str:
    if any(ch.isspace() for ch in prefix):
        raise ValueError(f"dataset prefix {prefix!r} contains whitespace, which Megatron's blend "
                         "files cannot express; use an --output-dir without spaces")
    return prefix


def write_blends(out: Path, datasets: Path, summary: dict, default_weights: str = "paper") -> dict:
    """Write every blend file under ``out/blends``; return {name: path} plus notes."""
    blends = Path(out).resolve() / "blends"
    blends.mkdir(parents=True, exist_ok=True)
    for stale in blends.glob("*"):
        if stale.is_file():
            stale.unlink()
    splits = summary["splits"]

    def prefixes(split: str) -> list[tuple[str, str]]:
        domains = splits.get(split, {}).get("domains", {})
        return [(d, _check_prefix(str((Path(datasets) / split / s["safe_name"]).resolve())))
                for d, s in domains.items() if s["documents"] > 0 and s["tokens"] > 0]

    train = dict(prefixes("train"))
    valid = prefixes("valid")
    test = prefixes("test")
    written: dict[str, str] = {}
    notes: list[str] = []
    for kind in WEIGHT_KINDS:
        weights = blend_weights(splits.get("train", {}).get("domains", {}), kind)
        if weights is None:
            notes.append(f"{kind} weights unavailable (no train tokens"
                         + (" or a train domain outside the Pile's 22" if kind == "paper" else "")
                         + "); blend files with these weights were not written")
            continue
        pairs = [(f"{weights[d]:.12g}", train[d]) for d in train]
        text = "".join(f"{w} {p}\n" for w, p in pairs)
        per_split = {"train": [item for pair in pairs for item in pair],
                     "valid": [p for _, p in valid] or None,
                     "test": [p for _, p in test] or None}
        for name, writer, payload in ((f"data_args.{kind}.txt", atomic_write_text, text),
                                      (f"per_split_data_args.{kind}.json", atomic_write_json, per_split)):
            writer(blends / name, payload)
            written[name] = str(blends / name)
    chosen = default_weights if f"data_args.{default_weights}.txt" in written else (
        "tokens" if "data_args.tokens.txt" in written else None)
    if chosen is not None:
        if chosen != default_weights:
            notes.append(f"default blend files use {chosen} weights ({default_weights} unavailable)")
        for name in ("data_args", "per_split_data_args"):
            suffix = "txt" if name == "data_args" else "json"
            source = blends / f"{name}.{chosen}.{suffix}"
            atomic_write_text(blends / f"{name}.{suffix}", source.read_text())
            written[f"{name}.{suffix}"] = str(blends / f"{name}.{suffix}")
    names = [splits["valid"]["domains"][d]["safe_name"] for d, _ in valid]
    validation = {
        "domains": [d for d, _ in valid], "names": names, "prefixes": [p for _, p in valid],
        "megatron_args": (["--multiple-validation-sets", "--full-validation",
                           "--validation-set-names", *names] if len(valid) > 1 else []),
        "note": "valid prefixes appear in per_split_data_args*.json in this order; Megatron logs "
                "'validation-<name>' losses with --multiple-validation-sets --validation-set-names",
    }
    atomic_write_json(blends / "validation_sets.json", validation)
    written["validation_sets.json"] = str(blends / "validation_sets.json")
    return {"default_weights": chosen, "files": written, "notes": notes}


def read_validation_sets(out: Path) -> dict:
    """The per-domain validation names/prefixes recorded by write_blends."""
    return json.loads((Path(out) / "blends" / "validation_sets.json").read_text())
