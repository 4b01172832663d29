"""mile-eval perplexity: per-domain NLL on Megatron indexed datasets against a float64 reference.

The reference runs the same HF model in float64 on every window separately (no batching, no
padding) and takes plain torch.log_softmax in float64; the windows are cut here from the token
lists written to the datasets, independently of the tool's window planner.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from test_eval_tiny_model import BOS_ID, EOS_ID, VOCAB, corpus_lines, sentencepiece_path, tiny_llama_dir

CONTEXT = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def model64(model_dir):
    import torch
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64).eval()


def write_dataset(prefix: Path, documents: list[list[int]]) -> str:
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for document in documents:
        builder.add_item(torch.tensor(document, dtype=torch.int64))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def encode_documents(model_dir: Path, lines: list[str], sizes: list[int]) -> list[list[int]]:
    """[BOS] text [EOD] documents of `sizes[i]` consecutive lines (the mile-preprocess layout)."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(sentencepiece_path(model_dir)))
    documents, position = [], 0
    for size in sizes:
        text = "\n".join(lines[position:position + size])
        position += size
        documents.append([BOS_ID, *processor.encode(text), EOS_ID])
    return documents


@pytest.fixture(scope="module")
def domains(model_dir, tmp_path_factory):
    """Three domains: long and short documents, a 1-token and a 2-token document."""
    lines = corpus_lines(700)
    root = tmp_path_factory.mktemp("ppl_data")
    documents = {
        "Alpha": encode_documents(model_dir, lines[0:], [1, 3, 1, 2]),
        "Beta (x)": encode_documents(model_dir, lines[20:], [2, 1, 1]) + [[BOS_ID], [BOS_ID, EOS_ID]],
        "Gamma": encode_documents(model_dir, lines[40:], [4]),
    }
    from mile_megatron.evaluate.perplexity import Domain

    specs = [Domain(name, write_dataset(root / name.replace(" ", "_"), docs)) for name, docs in documents.items()]
    return specs, documents


def reference_nll(model64, documents, method: str, context: int = CONTEXT, eod_id: int | None = None,
                  max_targets: int | None = None) -> tuple[float, int]:
    """Sum of -log p over targets and their count, one float64 forward per window."""
    import torch

    streams = [[t for doc in documents for t in doc]] if method == "packed" else documents
    if max_targets is not None:            # the first max_targets targets (packed stream only)
        assert method == "packed"
        streams = [streams[0][:max_targets + 1]]
    total, count = 0.0, 0
    for stream in streams:
        for start in range(0, len(stream) - 1, context):
            window = stream[start:start + context + 1]
            with torch.no_grad():
                logits = model64(torch.tensor([window[:-1]])).logits[0].to(torch.float64)
            log_probs = torch.log_softmax(logits, dim=-1)
            for i, target in enumerate(window[1:]):
                if eod_id is not None and window[i] == eod_id:
                    continue
                total -= float(log_probs[i, target])
                count += 1
    return total, count


def test_plan_windows_by_hand():
    from mile_megatron.evaluate.perplexity import plan_windows

    lengths = np.array([5, 1, 0, 7])           # stream offsets 0, 5, 6, 6; 13 tokens
    starts, counts = plan_windows(lengths, 4, "packed")
    assert starts.tolist() == [0, 4, 8] and counts.tolist() == [5, 5, 5]   # 12 = T-1 targets
    starts, counts = plan_windows(lengths, 4, "document")
    assert starts.tolist() == [0, 6, 10] and counts.tolist() == [5, 5, 3]  # (5-1) + (7-1) targets
    starts, counts = plan_windows(lengths, 4, "packed", max_targets=6)
    assert starts.tolist() == [0, 4] and counts.tolist() == [5, 3]
    starts, counts = plan_windows(lengths, 100, "packed")
    assert starts.tolist() == [0] and counts.tolist() == [13]


@pytest.mark.parametrize("method", ["packed", "document"])
def test_perplexity_equals_float64_reference(model_dir, model64, domains, method):
    from mile_megatron.evaluate.perplexity import evaluate_perplexity

    specs, documents = domains
    results = evaluate_perplexity(model_dir, specs, context_length=CONTEXT, method=method, batch_size=3,
                                  device="cpu", dtype="float64", progress=False)
    reference = {name: reference_nll(model64, docs, method) for name, docs in documents.items()}
    means = {}
    for name, (nll_sum, count) in reference.items():
        got = results["domains"][name]
        assert got["predicted_tokens"] == count
        assert got["nll_sum"] == pytest.approx(nll_sum, rel=1e-10)
        means[name] = nll_sum / count
        assert got["mean_nll"] == pytest.approx(means[name], rel=1e-10)
        assert got["perplexity"] == pytest.approx(math.exp(means[name]), rel=1e-10)
    # Packed: every token after the first of the stream; document: all but each document's first.
    tokens = {name: sum(map(len, docs)) for name, docs in documents.items()}
    expected = ({n: t - 1 for n, t in tokens.items()} if method == "packed"
                else {n: sum(max(len(d) - 1, 0) for d in documents[n]) for n in documents})
    assert {n: r["predicted_tokens"] for n, r in results["domains"].items()} == expected
    summary = results["summary"]
    assert summary["uniform_mean_nll"] == pytest.approx(sum(means.values()) / 3, rel=1e-10)
    assert summary["uniform_perplexity"] == pytest.approx(math.exp(sum(means.values()) / 3), rel=1e-10)
    worst = max(means, key=means.get)
    assert summary["worst_domain"] == worst and summary["worst_mean_nll"] == pytest.approx(means[worst], rel=1e-10)
    pooled = sum(s for s, _ in reference.values()) / sum(c for _, c in reference.values())
    assert summary["pooled_mean_nll"] == pytest.approx(pooled, rel=1e-10)
    assert results["settings"]["method"] == method and results["settings"]["context_length"] == CONTEXT


def test_eod_mask_token_limit_and_float32(model_dir, model64, domains):
    from mile_megatron.evaluate.perplexity import evaluate_perplexity

    specs, documents = domains
    limit = 150
    masked = evaluate_perplexity(model_dir, specs, context_length=CONTEXT, batch_size=2, device="cpu",
                                 dtype="float64", max_tokens_per_domain=limit, eod_mask_loss=True,
                                 progress=False)
    counts = []
    for name, docs in documents.items():
        nll_sum, count = reference_nll(model64, docs, "packed", eod_id=EOS_ID, max_targets=limit)
        assert masked["domains"][name]["predicted_tokens"] == count
        assert masked["domains"][name]["nll_sum"] == pytest.approx(nll_sum, rel=1e-10)
        counts.append(count)
    assert min(counts) < limit        # some document boundary fell inside the first `limit` targets
    # Default CPU dtype (float32 weights, float32 log-softmax, float64 sums) stays close.
    single = evaluate_perplexity(model_dir, specs[:1], context_length=CONTEXT, device="cpu", progress=False)
    assert single["settings"]["dtype"] == "float32"
    nll_sum, count = reference_nll(model64, documents["Alpha"], "packed")
    assert single["domains"]["Alpha"]["nll_sum"] == pytest.approx(nll_sum, rel=1e-5)


PILE_LINES = [("Wikipedia (en)", 0, 3), ("Github", 10, 2), ("Wikipedia (en)", 30, 2), ("ArXiv", 50, 4),
              ("Github", 70, 1)]


def test_cli_on_mile_preprocess_output(model_dir, model64, tmp_path, capsys):
    """End to end: mile-preprocess's real validation output -> mile-eval perplexity --data."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from mile_megatron.data.preprocess import main as preprocess
    from mile_megatron.evaluate.cli import main

    lines = corpus_lines(700)
    valid = tmp_path / "val.jsonl"
    valid.write_text("".join(json.dumps({"text": "\n".join(lines[a:a + n]), "meta": {"pile_set_name": d}}) + "\n"
                             for d, a, n in PILE_LINES))
    out = tmp_path / "pile"
    assert preprocess(["run", "--valid", str(valid), "--tokenizer-model", str(sentencepiece_path(model_dir)),
                       "--output-dir", str(out), "--workers", "0", "--no-progress"]) == 0
    capsys.readouterr()
    result_path = tmp_path / "ppl.json"
    assert main(["perplexity", str(model_dir), "--data", str(out), "--dtype", "float64", "--device", "cpu",
                 "--context-length", "32", "--output", str(result_path), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "uniform average" in printed and "worst: " in printed
    results = json.loads(result_path.read_text())
    assert results["format"] == "mile-eval-perplexity/1"
    assert list(results["domains"]) == json.loads((out / "blends" / "validation_sets.json").read_text())["domains"]
    assert set(results["domains"]) == {"Wikipedia (en)", "Github", "ArXiv"}
    assert results["source"]["preprocess"]["special_tokens"]["bos_id"] == BOS_ID
    assert results["model"]["path"] == str(model_dir.resolve())
    for name, record in results["domains"].items():
        dataset = IndexedDataset(record["prefix"])
        documents = [dataset[i].tolist() for i in range(len(dataset))]
        assert all(doc[0] == BOS_ID and doc[-1] == EOS_ID for doc in documents)   # [BOS] text [EOD]
        nll_sum, count = reference_nll(model64, documents, "packed", context=32)
        assert record["predicted_tokens"] == count
        assert record["nll_sum"] == pytest.approx(nll_sum, rel=1e-10)
    means = {n: r["mean_nll"] for n, r in results["domains"].items()}
    assert results["summary"]["worst_domain"] == max(means, key=means.get)
    assert results["summary"]["uniform_mean_nll"] == pytest.approx(sum(means.values()) / 3, rel=1e-12)


def _run_error(capsys, argv: list[str]) -> str:
    from mile_megatron.evaluate.cli import main

    assert main(argv) == 2
    return capsys.readouterr().err


def test_bad_inputs_give_clear_errors(model_dir, domains, tmp_path, capsys):
    specs, _ = domains
    output = tmp_path / "never.json"
    good = f"A={specs[0].prefix}"
    common = ["--device", "cpu", "--output", str(output), "--quiet"]

    err = _run_error(capsys, ["perplexity", str(tmp_path / "missing"), "--prefix", good, *common])
    assert "does not exist" in err and "mile-convert-hf" in err

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                                                  "vocab_size": 50257}))
    err = _run_error(capsys, ["perplexity", str(gpt2), "--prefix", good, *common])
    assert "'gpt2' model" in err and "not LLaMA" in err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no config.json" in _run_error(capsys, ["perplexity", str(empty), "--prefix", good, *common])

    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(model_dir / "config.json", partial / "config.json")
    (partial / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    err = _run_error(capsys, ["perplexity", str(partial), "--prefix", good, *common])
    assert "lacks weight shard(s) model-00002-of-00002.safetensors" in err

    err = _run_error(capsys, ["perplexity", str(model_dir), "--prefix", f"A={tmp_path / 'nope'}", *common])
    assert "dataset prefix" in err and "nope.bin and" in err and "'A'" in err

    err = _run_error(capsys, ["perplexity", str(model_dir), "--data", str(tmp_path), *common])
    assert "has no blends/validation_sets.json" in err

    err = _run_error(capsys, ["perplexity", str(model_dir), "--prefix", good, "--context-length", "65", *common])
    assert "exceeds the model's max_position_embeddings 64" in err

    foreign = write_dataset(tmp_path / "foreign", [[BOS_ID, 5, VOCAB + 3, EOS_ID]])
    err = _run_error(capsys, ["perplexity", str(model_dir), "--prefix", f"F={foreign}", *common])
    assert f"token id {VOCAB + 3}" in err and "different tokenizer" in err

    assert not output.exists()                  # nothing half-written on any failure
