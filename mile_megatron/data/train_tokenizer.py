"""``mile-train-tokenizer``: train a LLaMA-like SentencePiece model from Pile-format inputs.

Settings follow the LLaMA tokenizer: BPE, byte fallback (no unknown characters), digits split
into single tokens, whitespace-only pieces allowed, no text normalisation, ids unk=0, bos=1,
eos=2 (no pad). Inputs are streamed with the same readers as ``mile-preprocess`` (bad lines are
skipped and counted); every document line becomes one training sentence and SentencePiece
samples at most ``--input-sentence-size`` of them, which bounds the trainer's memory.

    mile-train-tokenizer --input 'pile/train/0[0-1].jsonl.zst' --model-prefix tok/pile --vocab-size 32000

writes ``tok/pile.model`` (use with --tokenizer-model) and ``tok/pile.vocab``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterator

from .sources import CorruptInputError, iter_documents


def iter_sentences(paths: list[Path], stats: Counter, max_documents: int | None,
                   max_sentence_bytes: int, text_key: str, domain_key: str,
                   domains: set[str] | None) -> Iterator[str]:
    """Non-empty lines of every kept document, in input order."""
    documents = 0
    for path in paths:
        for item in iter_documents(path, text_key, domain_key):
            if isinstance(item, str):
                stats[f"skipped_{item}"] += 1
                continue
            domain, text = item
            if domains and domain not in domains:
                stats["filtered"] += 1
                continue
            documents += 1
            stats["documents"] += 1
            for line in text.split("\n"):
                if line.strip() and len(line.encode("utf-8")) <= max_sentence_bytes:
                    stats["sentences"] += 1
                    yield line
            if max_documents and documents >= max_documents:
                return


def train(paths: list[Path], model_prefix: Path, vocab_size: int, *, max_documents: int | None = None,
          input_sentence_size: int = 2_000_000, character_coverage: float = 0.99995,
          max_sentence_bytes: int = 16384, threads: int | None = None, hard_vocab_limit: bool = True,
          text_key: str = "text", domain_key: str = "meta.pile_set_name",
          domains: set[str] | None = None, verbose: bool = False) -> dict:
    """Train and atomically write ``<prefix>.model`` and ``<prefix>.vocab``; return stats."""
    import sentencepiece

    if vocab_size < 260:
        raise ValueError("--vocab-size must be at least 260 (256 byte-fallback pieces + specials)")
    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    stats: Counter = Counter()
    with tempfile.TemporaryDirectory(dir=model_prefix.parent, prefix=".spm-") as tmp:
        sentencepiece.SentencePieceTrainer.Train(
            sentence_iterator=iter_sentences(paths, stats, max_documents, max_sentence_bytes,
                                             text_key, domain_key, domains),
            model_prefix=os.path.join(tmp, "model"), vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False, normalization_rule_name="identity",
            character_coverage=character_coverage, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            max_sentence_length=max_sentence_bytes, hard_vocab_limit=hard_vocab_limit,
            num_threads=threads or max(1, os.cpu_count() or 1), minloglevel=0 if verbose else 2)
        if not stats["sentences"]:
            raise ValueError("no usable text in the inputs")
        for suffix in (".model", ".vocab"):
            target = model_prefix.with_name(model_prefix.name + suffix)
            shutil.move(os.path.join(tmp, "model" + suffix), target.with_name("." + target.name + ".tmp"))
            os.replace(target.with_name("." + target.name + ".tmp"), target)
    return dict(stats)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mile-train-tokenizer", description=__doc__.split("\n\n")[0],
                                     epilog="LLaMA-like settings: BPE, byte fallback, split digits, "
                                            "ids unk=0 bos=1 eos=2.")
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_GLOB",
                        help=".jsonl.zst / .jsonl.gz / .jsonl files or quoted globs")
    parser.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--max-documents", type=int, default=None,
                        help="stop reading after this many documents (default: all)")
    parser.add_argument("--input-sentence-size", type=int, default=2_000_000,
                        help="sentences SentencePiece samples for training (bounds memory)")
    parser.add_argument("--character-coverage", type=float, default=0.99995)
    parser.add_argument("--max-sentence-bytes", type=int, default=16384,
                        help="longer lines are not used for training")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--soft-vocab-limit", action="store_true",
                        help="allow a smaller vocabulary when the corpus is too small")
    parser.add_argument("--domains", nargs="+", metavar="NAME", help="use only these domains")
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--domain-key", default="meta.pile_set_name")
    parser.add_argument("--verbose", action="store_true", help="show SentencePiece's log")
    return parser


def main(argv: list[str] | None = None) -> int:
    from .preprocess import UsageError, expand_inputs

    args = build_parser().parse_args(argv)
    try:
        paths = expand_inputs(args.input)
        stats = train(paths, Path(args.model_prefix), args.vocab_size,
                      max_documents=args.max_documents, input_sentence_size=args.input_sentence_size,
                      character_coverage=args.character_coverage,
                      max_sentence_bytes=args.max_sentence_bytes, threads=args.threads,
                      hard_vocab_limit=not args.soft_vocab_limit, text_key=args.text_key,
                      domain_key=args.domain_key, domains=set(args.domains) if args.domains else None,
                      verbose=args.verbose)
    except (UsageError, ValueError, CorruptInputError) as error:
        print(f"mile-train-tokenizer: error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:  # SentencePiece training errors
        print(f"mile-train-tokenizer: error: SentencePiece training failed: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.model_prefix}.model and {args.model_prefix}.vocab from "
          f"{stats.get('documents', 0):,} documents ({stats.get('sentences', 0):,} sentences; "
          + ", ".join(f"{k}={v:,}" for k, v in sorted(stats.items()) if k.startswith("skipped_"))
          + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
