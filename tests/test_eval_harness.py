"""mile-eval harness: lm-evaluation-harness end to end offline on a local task, and the MMLU plan.

The end-to-end run uses the real lm_eval 0.4.13 (simple_evaluate, HFLM, a YAML task on local JSONL
files through the `json` dataset builder) in a subprocess with the Hub disabled. Its loglikelihood
task is re-scored here in float64 with BOS prepended, which pins down the BOS handling.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from test_eval_tiny_model import BOS_ID, MAX_POSITIONS, sentencepiece_path, tiny_llama_dir

REPO = Path(__file__).resolve().parents[1]
COMMONSENSE = ["hellaswag", "openbookqa", "winogrande", "arc_easy", "arc_challenge", "boolq", "piqa",
               "social_iqa"]
CLOSED_BOOK = ["triviaqa", "webqs", "nq_open"]

MC_DOCS = [{"question": f"What is {a} plus {b}?", "choices": [str(a + b), str(a + b + 1), str(a * b + 7)],
            "answer": 0} for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 2), (9, 1)]]
# lm_eval scores a loglikelihood request as (context, continuation) concatenated as given.
LL_DOCS = [{"context": "The quick brown fox", "continuation": " jumps over the lazy dog."},
           {"context": "Lists are", "continuation": " mutable sequences"},
           {"context": "The return statement", "continuation": " leaves the current function call"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory)


def write_tasks(directory: Path) -> Path:
    """Two local lm_eval tasks: multiple choice (few-shot from a train file) and loglikelihood."""
    directory.mkdir()
    files = {"mc_test.jsonl": MC_DOCS[:4], "mc_train.jsonl": MC_DOCS[4:], "ll_test.jsonl": LL_DOCS}
    for name, docs in files.items():
        (directory / name).write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (directory / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {directory / 'mc_test.jsonl'}
    train: {directory / 'mc_train.jsonl'}
test_split: test
fewshot_split: train
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    (directory / "tiny_ll.yaml").write_text(f"""task: tiny_ll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {directory / 'll_test.jsonl'}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
metadata:
  version: 1.0
""")
    return directory


def reference_perplexity(model_dir: Path, add_bos: bool) -> float:
    """exp(-mean over docs of log p(continuation | context)), float64, tokens from SentencePiece."""
    import sentencepiece as spm
    import torch
    from transformers import LlamaForCausalLM

    processor = spm.SentencePieceProcessor(model_file=str(sentencepiece_path(model_dir)))
    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64).eval()
    prefix = [BOS_ID] if add_bos else []
    lls = []
    for doc in LL_DOCS:
        context = prefix + processor.encode(doc["context"])
        whole = prefix + processor.encode(doc["context"] + doc["continuation"])
        assert whole[:len(context)] == context           # the split point is a token boundary
        with torch.no_grad():
            logits = model(torch.tensor([whole[:-1]])).logits[0].to(torch.float64)
        log_probs = torch.log_softmax(logits, dim=-1)
        lls.append(sum(float(log_probs[i - 1, whole[i]]) for i in range(len(context), len(whole))))
    return math.exp(-sum(lls) / len(lls))


def test_harness_end_to_end_offline_with_local_tasks(model_dir, tmp_path):
    tasks = write_tasks(tmp_path / "tasks")
    output = tmp_path / "results" / "harness.json"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "tools" / "evaluate.py"), "harness", str(model_dir),
               "--tasks", "tiny_mc:1,tiny_ll", "--include-path", str(tasks), "--offline", "--device", "cpu",
               "--batch-size", "4", "--bootstrap-iters", "0", "--output", str(output), "--quiet"]
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"mile-eval harness failed\nSTDOUT:\n{run.stdout}\nSTDERR:\n{run.stderr}"
    results = json.loads(output.read_text())

    assert results["format"] == "mile-eval-harness/1"
    for package in ("lm_eval", "transformers", "torch", "mile-megatron"):
        assert results["versions"][package] == metadata.version(package)
    assert results["model"]["path"] == str(model_dir.resolve())
    assert results["model"]["config_sha256"] == hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()
    assert results["bos"]["add_bos_token"] is True and results["bos"]["prefix_token_id"] == BOS_ID
    assert results["hflm_args"]["add_bos_token"] is True and results["hflm_args"]["max_length"] == MAX_POSITIONS
    # One simple_evaluate call per shot count, in request order.
    assert [(r["tasks"], r["num_fewshot"]) for r in results["runs"]] == [(["tiny_mc"], 1), (["tiny_ll"], None)]
    assert results["n_shot"] == {"tiny_mc": 1, "tiny_ll": 0}
    assert results["summary"]["tiny_mc"]["num_fewshot"] == 1 and results["summary"]["tiny_ll"]["num_fewshot"] == 0
    assert results["n_samples"]["tiny_mc"]["effective"] == 4 and results["n_samples"]["tiny_ll"]["effective"] == 3
    accuracy = results["summary"]["tiny_mc"]["acc,none"]
    assert accuracy in (0.0, 0.25, 0.5, 0.75, 1.0)
    # The loglikelihood task, re-scored independently with BOS in front of every context.
    perplexity = results["summary"]["tiny_ll"]["perplexity,none"]
    with_bos = reference_perplexity(model_dir, add_bos=True)
    assert math.log(perplexity) == pytest.approx(math.log(with_bos), rel=1e-5)
    without_bos = reference_perplexity(model_dir, add_bos=False)
    assert abs(math.log(with_bos) - math.log(without_bos)) > 1e-2   # the check can tell them apart
    assert "tiny_mc" in run.stdout and "results:" in run.stdout


def dry_run(capsys, model_dir: Path, *extra: str) -> dict:
    from mile_megatron.evaluate.cli import main

    assert main(["harness", str(model_dir), "--device", "cpu", "--dry-run", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_default_is_mmlu_5_shot_with_bos(model_dir, capsys):
    plan = dry_run(capsys, model_dir)
    assert plan["runs"] == [{"num_fewshot": 5, "tasks": ["mmlu"]}]
    args = plan["hflm_args"]
    assert args["pretrained"] == str(model_dir.resolve()) and args["backend"] == "causal"
    assert args["add_bos_token"] is True and args["prefix_token_id"] == BOS_ID
    settings = (args["dtype"], args["device"], args["batch_size"], args["max_length"])
    assert settings == ("float32", "cpu", 8, MAX_POSITIONS)
    assert plan["simple_evaluate_args"]["limit"] is None and plan["simple_evaluate_args"]["log_samples"] is False
    assert plan["bos"]["probe_ids"][0] == BOS_ID and plan["offline"] is False

    # The installed lm_eval defines these names, and MMLU's YAML leaves num_fewshot to the caller
    # (lm_eval ignores an override when a task's YAML pins num_fewshot: 0).
    import lm_eval
    import yaml
    from lm_eval.tasks import TaskManager

    tasks_root = Path(lm_eval.__file__).parent / "tasks"
    mmlu_dir = tasks_root / "mmlu" / "default"
    assert "mmlu" in TaskManager(include_path=str(mmlu_dir), include_defaults=False).all_tasks
    template = yaml.safe_load((mmlu_dir / "_default_template_yaml").read_text())
    assert "num_fewshot" not in template and template["fewshot_split"] == "dev"
    dirs = ["hellaswag", "openbookqa", "winogrande", "arc", "super_glue/boolq", "piqa", "siqa", "triviaqa",
            "webqs", "nq_open"]
    index = TaskManager(include_path=[str(tasks_root / d) for d in dirs], include_defaults=False).all_tasks
    assert set(COMMONSENSE + CLOSED_BOOK) <= set(index)


def test_suites_and_shot_overrides(model_dir, capsys):
    plan = dry_run(capsys, model_dir, "--tasks", "paper", "--dtype", "bfloat16", "--batch-size", "auto:2",
                   "--limit", "0.5")
    assert plan["runs"] == [{"num_fewshot": 5, "tasks": ["mmlu"]},
                            {"num_fewshot": 0, "tasks": COMMONSENSE + CLOSED_BOOK}]
    assert plan["hflm_args"]["softmax_dtype"] == "float32" and plan["hflm_args"]["batch_size"] == "auto:2"
    assert plan["simple_evaluate_args"]["limit"] == 0.5
    plan = dry_run(capsys, model_dir, "--tasks", "hellaswag:10,mmlu,piqa", "--num-fewshot", "3", "--no-bos")
    assert plan["runs"] == [{"num_fewshot": 3, "tasks": ["hellaswag", "mmlu", "piqa"]}]
    assert plan["hflm_args"]["add_bos_token"] is False and plan["hflm_args"]["prefix_token_id"] == 2
    plan = dry_run(capsys, model_dir, "--tasks", "commonsense,arc_easy:0,lambada_openai,mmlu:1")
    assert plan["runs"] == [{"num_fewshot": 0, "tasks": COMMONSENSE},
                            {"num_fewshot": None, "tasks": ["lambada_openai"]},
                            {"num_fewshot": 1, "tasks": ["mmlu"]}]


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "mmlu:five"], "shot count after ':' must be an integer"),
    (["--tasks", " , "], "--tasks is empty"),
    (["--tasks", "paper,mmlu:0"], "task 'mmlu' requested with 5 and 0 shots"),
    (["--batch-size", "0"], "give a positive integer, 'auto' or 'auto:N'"),
    (["--include-path", "/nonexistent/tasks"], "is not a directory of lm_eval task YAML files"),
])
def test_harness_bad_options(model_dir, capsys, argv, message):
    from mile_megatron.evaluate.cli import main

    assert main(["harness", str(model_dir), "--device", "cpu", "--dry-run", *argv]) == 2
    assert message in capsys.readouterr().err


def test_harness_bad_model_directories(model_dir, tmp_path, capsys):
    import shutil

    from mile_megatron.evaluate.cli import main

    assert main(["harness", str(tmp_path / "absent"), "--dry-run"]) == 2
    assert "does not exist; pass the output directory of mile-convert-hf" in capsys.readouterr().err
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, no_tokenizer / name)
    assert main(["harness", str(no_tokenizer), "--dry-run"]) == 2
    assert "has no tokenizer" in capsys.readouterr().err
    mistral = tmp_path / "mistral"
    shutil.copytree(model_dir, mistral)
    config = json.loads((mistral / "config.json").read_text())
    config.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (mistral / "config.json").write_text(json.dumps(config))
    assert main(["harness", str(mistral), "--dry-run"]) == 2
    assert "holds a 'mistral' model" in capsys.readouterr().err
