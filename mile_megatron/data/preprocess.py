"""``mile-preprocess``: The Pile (.jsonl.zst/.gz/.jsonl) -> per-domain Megatron indexed datasets.

One streaming pass over every input, documents routed by ``meta.pile_set_name`` into one
dataset per domain, tokenized by parallel workers with bounded memory, resumable per input
shard, then merged into ``OUT/datasets/<split>/<Domain>`` with blend files in ``OUT/blends``.

    mile-preprocess run --train 'pile/train/*.jsonl.zst' --valid pile/val.jsonl.zst \\
        --tokenizer-model tokenizer.model --output-dir data/pile
    mile-preprocess run ... --no-merge            # on each machine, for a subset of shards
    mile-preprocess merge outA outB --output-dir data/pile
    mile-preprocess summary data/pile

Exit status: 0 success, 1 some shard failed (completed shards are kept; rerun to finish),
2 bad arguments or settings (nothing was processed; e.g. an --output-dir that is a file or lies
below one), 130 interrupted.
See the tokenizer module for the BOS/EOD policy, encode for the memory bound and worker
lifetime, domains for the (injective) output names, sources for damaged inputs, shards for the
on-disk layout and atomicity, indexed for the dataset format, blends for the blend file formats.
Neither torch nor megatron is imported by this command or its workers.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from collections import deque
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from ..utils.errors import UsageError
from ..utils.fs import OutputDirLock, read_json, remove_tree
from .blends import WEIGHT_KINDS
from .domains import DomainNameCollision, natural_key
from .encode import EncodeSettings, EncoderPool
from .merge import MergeError, merge_outputs
from .progress import Progress
from .shards import (SPLITS, ShardWriter, assign_shard_ids, clean_partials, load_shard_record,
                     shard_dir, write_manifest)
from .sources import (SUPPORTED_SUFFIXES, CorruptInputError, InputStream, compression_of,
                      file_checksum, input_identity, iter_chunks)
from .summary import render_table
from .tokenizer import (DTYPE_MAX_ID, TokenizerError, choose_dtype, load_tokenizer,
                        resolve_policy, spec_from_args)

# An optional observer of run's progress, for instrumentation and tests: observer(event, committed_shards) with
# event "chunk" (a chunk of the current shard was written to its partial directory), "committed" (a shard was
# published) or "drained" (every shard of the run is finished).
Observer = Callable[[str, int], None]


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files and globs -> existing files (each pattern sorted naturally, duplicates dropped)."""
    paths: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern), key=natural_key) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise UsageError(f"input pattern {pattern!r} matches no file")
        for match in matches:
            path = Path(match)
            if not path.is_file():
                raise UsageError(f"input {match} does not exist or is not a file")
            if not os.access(path, os.R_OK):
                raise UsageError(f"input {match} is not readable")
            try:
                compression_of(path)
            except ValueError as error:
                raise UsageError(str(error)) from None
            if path.resolve() not in {p.resolve() for p in paths}:
                paths.append(path)
    return paths


def check_output_dir(text: str) -> Path:
    """An --output-dir that is, or can become, a writable directory (nothing is created here)."""
    out = Path(text)
    if out.is_symlink() and not out.exists():
        raise UsageError(f"--output-dir {text} is a dangling symbolic link")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {text} is an existing file, not a directory; choose "
                         "another path")
    ancestor = out.absolute()
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"--output-dir {text} lies below {ancestor}, which is a file, not a "
                         "directory; choose another path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"--output-dir {text}: {ancestor} is not writable")
    return out


def make_output_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--output-dir {out}: cannot create it ({error.strerror or error})") from None


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


@dataclass
class ShardTask:
    split: str
    shard_id: str
    path: Path
    identity: dict
    writer: ShardWriter | None = None
    error: str | None = None
    checksum: str | None = None
    extra: dict = field(default_factory=dict)


def _log(message: str, progress: Progress | None = None) -> None:
    if progress is not None:
        progress.message(message)
    else:
        print(message, file=sys.stderr, flush=True)


def _process(tasks: list[ShardTask], settings: EncodeSettings, args: argparse.Namespace,
             out: Path, config: dict, tokenizer_path: str, done: list[dict],
             failed: dict[str, str], observer: Observer | None = None) -> None:
    """Stream every pending shard through the worker pool; commit or abort each shard."""
    queue_depth = args.queue_depth or 2 * max(args.workers, 1)
    progress = Progress(len(tasks), enabled=args.progress)
    inflight: deque = deque()
    state = {"committed": 0}
    observe = observer or (lambda event, committed: None)
    pending_keys = [f"{t.split}/{t.shard_id}" for t in tasks]

    def manifest() -> None:
        write_manifest(out, config, tokenizer_path, done, pending_keys, failed)

    def drain_one() -> None:
        task, future = inflight.popleft()
        key = f"{task.split}/{task.shard_id}"
        if future is None:  # end of this shard's chunks
            pending_keys.remove(key)
            if task.error is not None:
                task.writer.abort()
                failed[key] = task.error
                _log(f"mile-preprocess: FAILED {key}: {task.error}", progress)
            else:
                record = task.writer.commit({
                    "split": task.split, "shard_id": task.shard_id,
                    "input": dict(task.identity, blake2b=task.checksum),
                    "config": config, "tokenizer_path": tokenizer_path})
                done.append(record)
                _log(f"mile-preprocess: shard {key} complete ({record['documents']:,} documents, "
                     f"{record['tokens']:,} tokens, {sum(record['skipped'].values()):,} lines "
                     "skipped)", progress)
                progress.update(shards=1)
            manifest()
            state["committed"] += 1
            observe("committed", state["committed"])
            return
        result = future.result()
        if task.error is None:
            try:
                task.writer.add(result)
            except DomainNameCollision as error:  # only on a hash collision; fail this shard
                task.error = f"{task.path}: {error}"
                return
            progress.update(documents=len(result.lengths), tokens=int(result.lengths.sum()),
                            nbytes=result.input_bytes)
            observe("chunk", state["committed"])

    with EncoderPool(settings, args.workers) as pool:
        try:
            for task in tasks:
                task.writer = ShardWriter(out, task.split, task.shard_id, config["dtype"])
                try:
                    with InputStream(task.path) as stream:
                        for chunk in iter_chunks(stream, args.chunk_bytes):
                            while len(inflight) >= queue_depth:
                                drain_one()
                            inflight.append((task, pool.submit(chunk)))
                        task.checksum = stream.checksum()
                except CorruptInputError as error:
                    task.error = str(error)
                except OSError as error:
                    task.error = f"{task.path}: cannot read ({error})"
                inflight.append((task, None))
            while inflight:
                drain_one()
            observe("drained", state["committed"])
        except BaseException:
            for task in tasks:
                if task.writer is not None and task.writer.partial.exists():
                    task.writer.abort()
            raise
        finally:
            progress.close()


def _shard_config(args: argparse.Namespace):
    """Validate tokenizer, policy and dtype; everything that must fail before any work."""
    try:
        spec = spec_from_args(args.tokenizer_model, args.hf_tokenizer)
        tokenizer = load_tokenizer(spec)
        special = resolve_policy(tokenizer, args.prepend_bos, args.append_eod)
        dtype = choose_dtype(tokenizer.vocab_size, args.dtype)
    except TokenizerError as error:
        raise UsageError(str(error)) from None
    domains = sorted(set(args.domains)) if args.domains else None
    config = {
        "tokenizer": {k: v for k, v in tokenizer.describe().items() if k != "path"},
        "special_tokens": special.describe(), "dtype": dtype.name,
        "text_key": args.text_key, "domain_key": args.domain_key, "domains": domains,
    }
    settings = EncodeSettings(tokenizer=spec, bos_id=special.bos_id, eod_id=special.eod_id,
                              dtype=dtype.name, text_key=args.text_key,
                              domain_key=tuple(args.domain_key.split(".")),
                              domains=frozenset(domains) if domains else None)
    return config, settings, spec.path


def cmd_run(args: argparse.Namespace, observer: Observer | None = None) -> int:
    if args.workers < 0:
        raise UsageError("--workers must be >= 0 (0 = encode in the main process)")
    if args.chunk_bytes < 1024:
        raise UsageError("--chunk-bytes must be at least 1024")
    out = check_output_dir(args.output_dir)
    inputs = {"train": expand_inputs(args.train or []), "valid": expand_inputs(args.valid or []),
              "test": expand_inputs(args.test or [])}
    if not any(inputs.values()):
        raise UsageError("no inputs: pass --train (and usually --valid) files or globs")
    if any(ch.isspace() for ch in str(Path(args.output_dir).resolve())) and not args.no_merge:
        raise UsageError(f"--output-dir {args.output_dir!r} contains whitespace, which Megatron's "
                         "blend files cannot express; choose a path without spaces")
    config, settings, tokenizer_path = _shard_config(args)
    planned: list[ShardTask] = []
    for split in SPLITS:
        try:
            ids = assign_shard_ids(inputs[split])
        except ValueError as error:
            raise UsageError(str(error)) from None
        planned += [ShardTask(split, i, p, input_identity(p)) for i, p in zip(ids, inputs[split])]
    make_output_dir(out)
    with OutputDirLock(out):
        clean_partials(out)
        done: list[dict] = []
        pending: list[ShardTask] = []
        for task in planned:
            record = load_shard_record(shard_dir(out, task.split, task.shard_id))
            if record is None:
                pending.append(task)
                continue
            if record["config"] != config:
                raise UsageError(
                    f"{shard_dir(out, task.split, task.shard_id)} was produced with different "
                    "settings (tokenizer, BOS/EOD policy, dtype, keys or --domains); use a new "
                    "--output-dir or delete that output directory's shards/")
            old = record["input"]
            same = (old["name"], old["size"], old["mtime_ns"]) == (
                task.identity["name"], task.identity["size"], task.identity["mtime_ns"])
            if same and args.verify_checksums:
                same = file_checksum(task.path) == old.get("blake2b")
            if same:
                done.append(record)
            else:
                _log(f"mile-preprocess: input {task.path} changed since shard "
                     f"{task.split}/{task.shard_id} was written; redoing it")
                pending.append(task)
        if pending:  # older merged outputs no longer describe the shards: remove them first
            for stale in ("datasets", "blends"):
                remove_tree(out / stale)
            for stale in ("summary.json", "summary.txt"):
                (out / stale).unlink(missing_ok=True)
        _log(f"mile-preprocess: {len(planned)} shard(s), {len(done)} already complete, "
             f"{len(pending)} to process with {args.workers} worker(s)")
        failed: dict[str, str] = {}
        _process(pending, settings, args, out, config, tokenizer_path, done, failed, observer)
        if failed:
            _log(f"mile-preprocess: {len(failed)} shard(s) failed:\n  " + "\n  ".join(failed.values())
                 + f"\nCompleted shards are kept in {out / 'shards'}; fix or replace the inputs "
                 "and rerun the same command to finish (no merged dataset was written).")
            return 1
        if args.no_merge:
            _log(f"mile-preprocess: all shards complete in {out}; merge with "
                 f"'mile-preprocess merge {out} [OTHER_OUTPUT_DIRS...] --output-dir FINAL'")
            return 0
        selection = {(t.split, t.shard_id) for t in planned}
        summary = merge_outputs([out], out, args.weights, select=selection)
    _print_result(summary, out)
    return 0


def _print_result(summary: dict, out: Path) -> None:
    print(render_table(summary))
    blends = summary["blends"]
    print(f"datasets: {summary['datasets']}")
    for name, path in blends["files"].items():
        print(f"blend file {name}: {path}")
    for note in blends["notes"]:
        print(f"note: {note}")
    print(f"summary: {out / 'summary.json'}")


def cmd_merge(args: argparse.Namespace) -> int:
    out = check_output_dir(args.output_dir)
    sources = [Path(s) for s in args.sources]
    for source in sources:
        if not (source / "shards").is_dir():
            raise UsageError(f"{source} is not a mile-preprocess output directory (no shards/)")
    if any(ch.isspace() for ch in str(out.resolve())):
        raise UsageError(f"--output-dir {args.output_dir!r} contains whitespace")
    make_output_dir(out)
    with OutputDirLock(out):
        try:
            summary = merge_outputs(sources, out, args.weights)
        except MergeError as error:
            raise UsageError(str(error)) from None
    _print_result(summary, out)
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    path = Path(args.output_dir) / "summary.json"
    if not path.is_file():
        raise UsageError(f"{path} does not exist; run 'mile-preprocess run' or 'merge' first")
    print(render_table(read_json(path)))
    return 0


POLICY_HELP = (
    "Every document becomes [BOS] text [EOD] by default. EOD is the tokenizer's EOS id, the id "
    "Megatron's GPTSentencePieceTokenizer/HuggingFaceTokenizer report as 'eod': train with "
    "--eod-mask-loss so the EOD position (which would predict the next document) carries no "
    "loss while predicting EOD itself is trained. BOS/EOD that the tokenizer lacks, or BOS == "
    "EOD, are rejected before any work.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mile-preprocess", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Subcommands: run (tokenize + merge), merge (combine output dirs), summary.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="tokenize inputs into per-domain datasets (resumable)",
                         description=POLICY_HELP)
    inputs = run.add_argument_group("inputs (files or quoted globs; "
                                    + ", ".join(SUPPORTED_SUFFIXES) + "; .zst/.gz streamed)")
    inputs.add_argument("--train", nargs="+", metavar="FILE_OR_GLOB", help="training shards")
    inputs.add_argument("--valid", nargs="+", metavar="FILE_OR_GLOB",
                        help="validation file(s), e.g. the Pile's val.jsonl.zst (per-domain sets)")
    inputs.add_argument("--test", nargs="+", metavar="FILE_OR_GLOB", help="test file(s)")
    inputs.add_argument("--domain-key", default="meta.pile_set_name",
                        help="dotted JSON key holding the domain (default: %(default)s)")
    inputs.add_argument("--text-key", default="text", help="JSON key of the text (default: text)")
    inputs.add_argument("--domains", nargs="+", metavar="NAME",
                        help="keep only these domains (names as in the data or output names, "
                             "e.g. 'Wikipedia (en)' or Wikipedia_en); others are counted as filtered")
    tok = run.add_argument_group("tokenizer and token layout")
    tok.add_argument("--tokenizer-model", metavar="FILE", help="SentencePiece .model file")
    tok.add_argument("--hf-tokenizer", metavar="DIR", help="Hugging Face tokenizer directory "
                     "(needs transformers)")
    tok.add_argument("--prepend-bos", action=argparse.BooleanOptionalAction, default=True,
                     help="prepend the tokenizer's BOS id to every document (default: on)")
    tok.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                     help="append the tokenizer's EOS id = Megatron's EOD (default: on)")
    tok.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_MAX_ID],
                     help="token dtype of the .bin files; auto = uint16 for vocabularies up to "
                          "65,536 ids, else int32 (the smallest Megatron's GPT dataset assumes); "
                          "an explicit dtype too small for the vocabulary is rejected")
    work = run.add_argument_group("execution")
    work.add_argument("--output-dir", required=True, help="output directory (resumable)")
    work.add_argument("--workers", type=int, default=default_workers(),
                      help="tokenizer processes (default: CPUs available = %(default)s; 0 = in "
                           "the main process)")
    work.add_argument("--chunk-bytes", type=int, default=1 << 20,
                      help="decompressed bytes per work item (default: 1 MiB)")
    work.add_argument("--queue-depth", type=int, default=0,
                      help="max chunks in flight (default: 2 x workers); the main process holds "
                           "at most about queue_depth x 5 x chunk_bytes of text and tokens")
    work.add_argument("--no-merge", action="store_true",
                      help="only write per-shard outputs (merge later, e.g. from several machines)")
    work.add_argument("--verify-checksums", action="store_true",
                      help="on resume, re-hash inputs of completed shards instead of trusting "
                           "size + mtime")
    work.add_argument("--weights", choices=WEIGHT_KINDS, default="paper",
                      help="weights of the default blend files: the paper's Pile weights "
                           "(normalised) or token-proportional (both variants are always written)")
    work.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                      help="progress line on stderr (default: only when stderr is a terminal)")

    merge = sub.add_parser("merge", help="merge completed shards of one or more output dirs")
    merge.add_argument("sources", nargs="+", help="mile-preprocess output directories")
    merge.add_argument("--output-dir", required=True)
    merge.add_argument("--weights", choices=WEIGHT_KINDS, default="paper")

    summary = sub.add_parser("summary", help="print the summary table of an output directory")
    summary.add_argument("output_dir")
    return parser


def main(argv: list[str] | None = None, *, observer: Observer | None = None) -> int:
    """The command line; observer (optional) follows `run`'s progress (see Observer)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args, observer)
        return {"merge": cmd_merge, "summary": cmd_summary}[args.command](args)
    except (UsageError, MergeError) as error:
        print(f"mile-preprocess: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mile-preprocess: interrupted; completed shards are kept, rerun to resume",
              file=sys.stderr)
        return 130
    except BrokenProcessPool:
        print("mile-preprocess: error: a worker process died (out of memory or killed?); "
              "completed shards are kept; rerun, with fewer --workers or a smaller "
              "--chunk-bytes if memory is short", file=sys.stderr)
        return 1
    except RuntimeError as error:  # e.g. the output directory is locked
        print(f"mile-preprocess: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
