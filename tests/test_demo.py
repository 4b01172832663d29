"""The README's main command, end to end on CPU: corpus -> tokenizer -> mile-preprocess -> TP=2 MiLe pretraining
-> checkpoint -> Hugging Face model (logit parity) -> generation and perplexity; then lm-eval on the converted model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_eval_harness import LL_DOCS, write_tasks

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "out"
    result = subprocess.run(
        [sys.executable, "-m", "mile_megatron.apps.demo", "--output-dir", str(out), "--train-iters", "30",
         "--documents-per-shard", "120", "--min-ce-drop", "0.5"],
        capture_output=True, text=True, timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-8000:]
    return out


def test_demo_runs_the_whole_job_and_the_loss_falls(demo: Path):
    out = demo
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_iterations"] == 30
    assert summary["train_ce_drop"] >= 0.5
    # Per-domain validation from the preprocessing tool's validation sets: all 22 Pile domains.
    assert len(summary["validation_ce_per_domain"]) == 22
    assert all(0 < value < 10 for value in summary["validation_ce_per_domain"].values())
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "30"
    # Per-domain indexed datasets and blend files came from mile-preprocess.
    blend = json.loads((out / "data" / "blends" / "per_split_data_args.json").read_text())
    assert len(blend["valid"]) == 22 and len(blend["train"]) == 2 * 22
    for prefix in blend["valid"] + blend["train"][1::2]:
        assert Path(prefix + ".bin").exists() and Path(prefix + ".idx").exists()
    # The converted model passed the logit-parity check (the demo exits nonzero otherwise), generated text,
    # and its per-domain validation perplexity is close to Megatron's own validation loss.
    assert (out / "hf" / "config.json").exists() and (out / "hf" / "model.safetensors.index.json").exists()
    assert summary["generation"]["new_tokens"] > 0 and summary["generation"]["continuation"]
    perplexity = json.loads((out / "perplexity.json").read_text())
    assert len(perplexity["domains"]) == 22
    sets = json.loads((out / "data" / "blends" / "validation_sets.json").read_text())
    safe_name = dict(zip(sets["domains"], sets["names"]))   # "DM Mathematics" -> "DM_Mathematics"
    for domain, result in perplexity["domains"].items():
        megatron_ce = summary["validation_ce_per_domain"][safe_name[domain]]
        assert abs(result["mean_nll"] - megatron_ce) < 0.2, (domain, result, megatron_ce)


def _reference_log_likelihoods(hf_dir: Path, tokenizer_model: Path) -> list[float]:
    """float64 log p(continuation | BOS + context) of LL_DOCS under the converted model, SentencePiece ids."""
    import sentencepiece as spm
    import torch
    from transformers import LlamaForCausalLM

    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    model = LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float64).eval()
    values = []
    for doc in LL_DOCS:
        context = [processor.bos_id()] + processor.encode(doc["context"])
        whole = [processor.bos_id()] + processor.encode(doc["context"] + doc["continuation"])
        assert whole[:len(context)] == context
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].double(), dim=-1)
        values.append(sum(float(log_probs[i - 1, whole[i]]) for i in range(len(context), len(whole))))
    return values


def test_lm_eval_runs_offline_on_the_converted_model(demo: Path, tmp_path: Path):
    tasks = write_tasks(tmp_path / "tasks")
    output = tmp_path / "harness.json"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, str(REPO / "tools" / "evaluate.py"), "harness", str(demo / "hf"), "--tasks", "tiny_mc,tiny_ll",
         "--include-path", str(tasks), "--offline", "--device", "cpu", "--batch-size", "4", "--bootstrap-iters", "0",
         "--output", str(output), "--quiet"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, f"STDOUT:\n{run.stdout}\nSTDERR:\n{run.stderr}"
    summary = json.loads(output.read_text())["summary"]
    assert summary["tiny_mc"]["acc,none"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    expected = math.exp(-sum(_reference_log_likelihoods(demo / "hf", demo / "tokenizer" / "spm.model")) / len(LL_DOCS))
    assert math.log(summary["tiny_ll"]["perplexity,none"]) == pytest.approx(math.log(expected), rel=1e-5)


def test_demo_refuses_a_directory_it_did_not_create(tmp_path: Path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    with pytest.raises(SystemExit, match="was not created by mile-demo"):
        from mile_megatron.apps.demo import main

        main(["--output-dir", str(tmp_path)])
    assert precious.read_text() == "keep me"
