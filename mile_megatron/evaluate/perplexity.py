"""Per-domain perplexity of a converted Hugging Face LLaMA model on Megatron indexed datasets.

Input: the held-out per-domain datasets written by ``mile-preprocess`` (``OUT/datasets/valid/<Domain>``
``.bin/.idx``, listed in ``OUT/blends/validation_sets.json``) or any ``NAME=PREFIX`` pairs. Tokens are
read with ``megatron.core.datasets.indexed_dataset.IndexedDataset`` exactly as stored, so the
BOS/EOD policy is the one training saw (mile-preprocess default: every document is
``[BOS] text [EOD]``). Nothing is downloaded.

Method (``L`` = context length, default the model's ``max_position_embeddings``):

* ``packed`` (default; what Megatron's validation loss measures): a domain's documents, in stored
  order, form one token stream ``x_0 .. x_{T-1}``. Window ``k`` is ``x[kL : min(kL+L+1, T)]``; its
  first ``n-1`` tokens are the input and its last ``n-1`` the targets. Consecutive windows share one
  token, so every ``x_t`` with ``t >= 1`` is predicted exactly once (``T-1`` targets), from the
  tokens since its window's start (0 to ``L-1`` of them). Attention crosses document boundaries
  inside a window, as in Megatron training without ``--reset-attention-mask``.
* ``document``: the same windowing applied to each document separately: targets are every token
  of a document but its first, context never crosses a document boundary, documents longer than
  ``L+1`` tokens are cut into non-overlapping windows (no sliding context).

``--eod-mask-loss`` drops targets whose *input* token is the model's EOS/EOD id (Megatron's flag of
the same name), i.e. the prediction of the next document's first token across a boundary.
``--max-tokens-per-domain N`` keeps only a domain's first ``N`` targets (deterministic prefix).

Per domain: ``nll_sum`` = sum over targets of ``-log p(x_t | context)`` (log-softmax in float32,
float64 for a float64 model; sums accumulated in float64), ``mean_nll = nll_sum / targets``
(token-weighted), ``perplexity = exp(mean_nll)``. Over domains: ``uniform_mean_nll`` = the plain mean
of the domains' ``mean_nll`` (every domain weighs the same, as in the paper's validation report),
``uniform_perplexity = exp(uniform_mean_nll)``, ``worst_domain`` = the domain with the largest
``mean_nll``; ``pooled_mean_nll`` (all targets of all domains together) is reported too.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .common import EvalError, ModelDir, inspect_model_dir, package_versions, resolve_device, resolve_dtype

METHODS = ("packed", "document")
RESULT_FORMAT = "mile-eval-perplexity/1"


@dataclass(frozen=True)
class Domain:
    """One evaluation set: a display name and a Megatron dataset prefix (without .bin/.idx)."""
    name: str
    prefix: str


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

def domains_from_validation_sets(path: str | Path) -> tuple[list[Domain], Path]:
    """Domains listed by mile-preprocess: ``path`` is its output dir or a validation_sets.json."""
    path = Path(path).expanduser()
    if path.is_dir():
        candidates = [path / "blends" / "validation_sets.json", path / "validation_sets.json"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise EvalError(f"{path} has no blends/validation_sets.json: pass the --output-dir of "
                            "'mile-preprocess run' (after its merge step) or the JSON file itself")
        path = found
    elif not path.is_file():
        raise EvalError(f"validation sets {path} do not exist; pass the --output-dir of "
                        "'mile-preprocess run' or its blends/validation_sets.json")
    try:
        record = json.loads(path.read_text())
        names, prefixes = record["domains"], record["prefixes"]
    except (ValueError, KeyError, TypeError) as error:
        raise EvalError(f"{path} is not a mile-preprocess validation_sets.json ({error!r})") from None
    if not isinstance(names, list) or not isinstance(prefixes, list) or len(names) != len(prefixes):
        raise EvalError(f"{path}: 'domains' and 'prefixes' must be lists of equal length")
    if not names:
        raise EvalError(f"{path} lists no validation domains (did preprocessing get --valid inputs?)")
    # Relative prefixes are taken relative to the preprocessing output directory.
    base = path.parent.parent if path.parent.name == "blends" else path.parent
    domains = [Domain(str(n), str(p if Path(p).is_absolute() else base / p))
               for n, p in zip(names, prefixes)]
    return domains, path.resolve()


def domains_from_args(items: Sequence[str]) -> list[Domain]:
    """``NAME=PREFIX`` (or a bare ``PREFIX``, named after its file name) per item."""
    domains = []
    for item in items:
        name, sep, prefix = item.partition("=")
        if not sep:
            name, prefix = Path(item).name, item
        if not name or not prefix:
            raise EvalError(f"--prefix {item!r}: expected NAME=PREFIX (e.g. ArXiv=data/pile/datasets/valid/ArXiv)")
        domains.append(Domain(name, prefix))
    return domains


def check_domains(domains: Sequence[Domain]) -> None:
    """Every prefix has .bin and .idx; names are unique. Raises EvalError naming the problem."""
    if not domains:
        raise EvalError("no datasets to evaluate: pass --data OUT (mile-preprocess output), "
                        "--validation-sets FILE or --prefix NAME=PREFIX")
    seen: set[str] = set()
    for domain in domains:
        if domain.name in seen:
            raise EvalError(f"domain name {domain.name!r} appears twice; give each --prefix a unique NAME")
        seen.add(domain.name)
        prefix = domain.prefix[:-4] if domain.prefix.endswith((".bin", ".idx")) else domain.prefix
        missing = [suffix for suffix in (".bin", ".idx") if not Path(prefix + suffix).is_file()]
        if missing:
            raise EvalError(
                f"dataset prefix {prefix} of domain {domain.name!r} is missing "
                f"{' and '.join(prefix + s for s in missing)}; a prefix names a Megatron indexed "
                "dataset without its extension (mile-preprocess writes OUT/datasets/valid/<Domain>)")


# ---------------------------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------------------------

def plan_windows(sequence_lengths: np.ndarray, context_length: int, method: str,
                 max_targets: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Windows as (stream start, token count) arrays; a window of n tokens has n-1 targets.

    Offsets index the stream of all sequences concatenated in stored order (see module docstring).
    """
    if method not in METHODS:
        raise EvalError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if context_length < 1:
        raise EvalError(f"context length must be >= 1, got {context_length}")
    lengths = np.asarray(sequence_lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    L = int(context_length)
    if method == "packed":
        total = int(offsets[-1])
        starts = np.arange(0, max(total - 1, 0), L, dtype=np.int64)
        counts = np.minimum(starts + L + 1, total) - starts
    else:
        keep = lengths >= 2
        doc_start, doc_len = offsets[:-1][keep], lengths[keep]
        per_doc = (doc_len - 1 + L - 1) // L                      # windows per document
        which = np.repeat(np.arange(len(doc_len)), per_doc)
        first = np.repeat(np.cumsum(per_doc) - per_doc, per_doc)
        local = (np.arange(int(per_doc.sum()), dtype=np.int64) - first) * L
        starts = doc_start[which] + local
        counts = np.minimum(local + L + 1, doc_len[which]) - local
    if max_targets is not None:
        if max_targets < 1:
            raise EvalError(f"--max-tokens-per-domain must be >= 1, got {max_targets}")
        cumulative = np.cumsum(counts - 1)
        if len(cumulative) and cumulative[-1] > max_targets:
            last = int(np.searchsorted(cumulative, max_targets))
            starts, counts = starts[:last + 1].copy(), counts[:last + 1].copy()
            before = int(cumulative[last - 1]) if last > 0 else 0
            counts[last] = max_targets - before + 1
    return starts, counts


class TokenStream:
    """Random access to the concatenation of an IndexedDataset's sequences (memory-mapped)."""

    def __init__(self, prefix: str) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        try:
            self.dataset = IndexedDataset(prefix, mmap=True)
        except Exception as error:  # corrupt/truncated index: name the file and the cause
            raise EvalError(f"cannot read Megatron indexed dataset {prefix}(.bin/.idx): {error!r}; "
                            "rerun mile-preprocess for this output") from None
        self.lengths = np.asarray(self.dataset.sequence_lengths, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])

    @property
    def documents(self) -> int:
        return len(self.lengths)

    @property
    def total_tokens(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, count: int) -> np.ndarray:
        """Tokens [start, start+count) of the stream as int64."""
        pieces = []
        index = int(np.searchsorted(self.offsets, start, side="right")) - 1
        position, stop = start, start + count
        while position < stop:
            offset = position - int(self.offsets[index])
            take = min(int(self.lengths[index]) - offset, stop - position)
            if take > 0:
                pieces.append(np.asarray(self.dataset.get(index, offset=offset, length=take)))
                position += take
            index += 1
        return np.concatenate(pieces).astype(np.int64, copy=False)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

def load_model(model_dir: ModelDir, device: str, dtype: str):
    """The LlamaForCausalLM in ``model_dir`` on ``device`` in ``dtype``, eval mode, no downloads."""
    import torch
    from transformers import LlamaForCausalLM

    try:
        model = LlamaForCausalLM.from_pretrained(str(model_dir.path), dtype=getattr(torch, dtype),
                                                 local_files_only=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise EvalError(f"cannot load the model in {model_dir.path}: {error}") from None
    return model.to(device).eval()


def _domain_nll(model, stream: TokenStream, starts: np.ndarray, counts: np.ndarray, *,
                batch_size: int, device: str, vocab_size: int, eod_id: int | None, domain: str,
                progress: bool) -> tuple[float, int]:
    """Sum of target NLLs (float64) and the number of targets, over the given windows."""
    import torch
    import torch.nn.functional as F

    model_dtype = next(model.parameters()).dtype
    loss_dtype = torch.float64 if model_dtype == torch.float64 else torch.float32
    order = np.argsort(-counts, kind="stable")     # long windows first: little padding per batch
    nll_sum, targets_counted = 0.0, 0
    batches = range(0, len(order), batch_size)
    started = time.monotonic()
    for number, first in enumerate(batches):
        rows = order[first:first + batch_size]
        width = int(counts[rows].max())
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        present = torch.zeros((len(rows), width), dtype=torch.bool)
        for row, window in enumerate(rows):
            tokens = stream.read(int(starts[window]), int(counts[window]))
            if tokens.max(initial=0) >= vocab_size or tokens.min(initial=0) < 0:
                bad = int(tokens.max()) if tokens.max() >= vocab_size else int(tokens.min())
                raise EvalError(
                    f"domain {domain!r} holds token id {bad}, outside the model's vocabulary "
                    f"[0, {vocab_size}): the dataset was tokenized with a different tokenizer "
                    "than the model's")
            ids[row, :len(tokens)] = torch.from_numpy(tokens)
            present[row, :len(tokens)] = True
        inputs, labels = ids[:, :-1], ids[:, 1:]
        counted = present[:, 1:].clone()                # a target exists where its token exists
        if eod_id is not None:
            counted &= inputs != eod_id                 # --eod-mask-loss: skip targets after EOD
        padded = not bool(present.all())
        with torch.inference_mode():
            logits = model(input_ids=inputs.to(device),
                           attention_mask=present[:, :-1].long().to(device) if padded else None,
                           use_cache=False).logits
            for row in range(len(rows)):            # per row: bounded float32 copy of [L, V]
                mask = counted[row].to(device)
                if not bool(mask.any()):
                    continue
                nll = F.cross_entropy(logits[row][mask].to(loss_dtype), labels[row].to(device)[mask],
                                      reduction="none")
                nll_sum += float(nll.double().sum())
                targets_counted += int(mask.sum())
        if progress and (number % 50 == 49 or number == len(batches) - 1):
            print(f"mile-eval perplexity: {domain}: batch {number + 1}/{len(batches)}, "
                  f"{targets_counted:,} tokens, {time.monotonic() - started:.0f} s",
                  file=sys.stderr, flush=True)
    return nll_sum, targets_counted


def summarize(per_domain: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Uniform average over domains, worst domain and pooled mean of per-domain results."""
    if not per_domain:
        raise EvalError("no domain results to summarize")
    mean_nlls = {name: r["mean_nll"] for name, r in per_domain.items()}
    uniform = sum(mean_nlls.values()) / len(mean_nlls)
    worst = max(mean_nlls, key=lambda name: mean_nlls[name])
    tokens = sum(r["predicted_tokens"] for r in per_domain.values())
    pooled = sum(r["nll_sum"] for r in per_domain.values()) / tokens
    return {
        "domains": len(per_domain),
        "uniform_mean_nll": uniform,
        "uniform_perplexity": math.exp(uniform),
        "mean_of_perplexities": sum(math.exp(v) for v in mean_nlls.values()) / len(mean_nlls),
        "worst_domain": worst,
        "worst_mean_nll": mean_nlls[worst],
        "worst_perplexity": math.exp(mean_nlls[worst]),
        "pooled_mean_nll": pooled,
        "pooled_perplexity": math.exp(pooled),
        "predicted_tokens": tokens,
    }


def evaluate_perplexity(model_path: str | Path, domains: Sequence[Domain], *,
                        context_length: int | None = None, method: str = "packed",
                        batch_size: int = 8, device: str | None = None, dtype: str = "auto",
                        max_tokens_per_domain: int | None = None, eod_mask_loss: bool = False,
                        progress: bool = True, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate every domain; return the results record (see module docstring for the method)."""
    model_dir = inspect_model_dir(model_path)
    check_domains(domains)
    if method not in METHODS:
        raise EvalError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    if batch_size < 1:
        raise EvalError(f"--batch-size must be >= 1, got {batch_size}")
    max_positions = model_dir.max_position_embeddings
    if context_length is None:
        if max_positions is None:
            raise EvalError(f"{model_dir.path}/config.json has no max_position_embeddings; "
                            "pass --context-length")
        context_length = max_positions
    if context_length < 1:
        raise EvalError(f"--context-length must be >= 1, got {context_length}")
    if max_positions is not None and context_length > max_positions:
        raise EvalError(f"--context-length {context_length} exceeds the model's "
                        f"max_position_embeddings {max_positions} (the length it was trained for)")
    eod_id = None
    if eod_mask_loss:
        eod_id = model_dir.config.get("eos_token_id")
        if isinstance(eod_id, list):
            eod_id = eod_id[0] if len(eod_id) == 1 else None
        if not isinstance(eod_id, int):
            raise EvalError(f"--eod-mask-loss needs a single eos_token_id in {model_dir.path}/config.json")
    streams = {d.name: TokenStream(d.prefix[:-4] if d.prefix.endswith((".bin", ".idx")) else d.prefix)
               for d in domains}
    plans = {}
    for domain in domains:
        stream = streams[domain.name]
        starts, counts = plan_windows(stream.lengths, context_length, method, max_tokens_per_domain)
        targets = int((counts - 1).sum())
        if targets == 0:
            raise EvalError(f"domain {domain.name!r} ({domain.prefix}) has no token to predict "
                            f"({stream.documents} documents, {stream.total_tokens} tokens)")
        plans[domain.name] = (starts, counts)

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    model = load_model(model_dir, device, dtype)
    per_domain: dict[str, dict[str, Any]] = {}
    for domain in domains:
        stream = streams[domain.name]
        starts, counts = plans[domain.name]
        nll_sum, predicted = _domain_nll(
            model, stream, starts, counts, batch_size=batch_size, device=device,
            vocab_size=model_dir.vocab_size, eod_id=eod_id, domain=domain.name, progress=progress)
        if predicted == 0:
            raise EvalError(f"domain {domain.name!r}: every target follows an EOD token; "
                            "nothing is left to evaluate with --eod-mask-loss")
        mean = nll_sum / predicted
        per_domain[domain.name] = {
            "prefix": str(Path(domain.prefix).resolve()),
            "documents": stream.documents,
            "dataset_tokens": stream.total_tokens,
            "windows": int(len(starts)),
            "predicted_tokens": predicted,
            "nll_sum": nll_sum,
            "mean_nll": mean,
            "perplexity": math.exp(mean),
        }
    return {
        "format": RESULT_FORMAT,
        "created_unix": time.time(),
        "model": model_dir.describe(),
        "versions": package_versions(),
        "settings": {
            "method": method, "context_length": context_length, "batch_size": batch_size,
            "device": device, "dtype": dtype, "max_tokens_per_domain": max_tokens_per_domain,
            "eod_mask_loss": eod_mask_loss, "eod_id": eod_id,
        },
        "method": _METHOD_TEXT[method],
        "source": source or {},
        "domains": per_domain,
        "summary": summarize(per_domain),
    }


_METHOD_TEXT = {
    "packed": "documents of a domain concatenated in stored order (BOS/EOD as preprocessed); "
              "windows of context_length+1 tokens with stride context_length; every token after "
              "the first predicted once; attention crosses document boundaries within a window",
    "document": "each document on its own; windows of context_length+1 tokens with stride "
                "context_length inside a document; every token but a document's first predicted once",
}


def render_table(results: dict[str, Any]) -> str:
    """Readable per-domain table with the summary lines."""
    lines = [f"{'domain':<28} {'tokens':>12} {'mean NLL':>10} {'perplexity':>12}"]
    for name, r in results["domains"].items():
        lines.append(f"{name[:28]:<28} {r['predicted_tokens']:>12,} {r['mean_nll']:>10.4f} "
                     f"{r['perplexity']:>12.3f}")
    s = results["summary"]
    lines += [f"{'uniform average':<28} {'':>12} {s['uniform_mean_nll']:>10.4f} {s['uniform_perplexity']:>12.3f}",
              f"{'worst: ' + s['worst_domain']:<28.28} {'':>12} {s['worst_mean_nll']:>10.4f} "
              f"{s['worst_perplexity']:>12.3f}",
              f"{'pooled (token-weighted)':<28} {s['predicted_tokens']:>12,} {s['pooled_mean_nll']:>10.4f} "
              f"{s['pooled_perplexity']:>12.3f}"]
    return "\n".join(lines)


def read_preprocess_summary(validation_sets: Path | None) -> dict[str, Any]:
    """Tokenizer fingerprint and BOS/EOD policy from mile-preprocess's summary.json, if present."""
    if validation_sets is None:
        return {}
    base = validation_sets.parent.parent if validation_sets.parent.name == "blends" else validation_sets.parent
    summary = base / "summary.json"
    try:
        config = json.loads(summary.read_text()).get("config", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {"summary": str(summary), "tokenizer": config.get("tokenizer"),
            "special_tokens": config.get("special_tokens")}
