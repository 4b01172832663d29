"""Downstream evaluation of a converted Hugging Face LLaMA directory with lm-evaluation-harness.

One ``HFLM`` model is built and ``lm_eval.simple_evaluate`` runs once per distinct few-shot count;
the results are merged into one JSON record together with the model path, the SHA-256 of its
config.json, the BOS policy and the versions of lm_eval / transformers / torch / mile-megatron.

Task selection (``--tasks``, comma separated; ``NAME:N`` sets N shots for that item):

* ``mmlu`` (default): MMLU, 5-shot, as the paper's MMLU column;
* ``commonsense``: hellaswag, openbookqa, winogrande, arc_easy, arc_challenge, boolq, piqa,
  social_iqa, 0-shot;
* ``closed_book_qa``: triviaqa, webqs, nq_open, 0-shot;
* ``paper``: all of the above with those shot counts;
* any other lm_eval task or group name (its own default shots unless ``:N`` or ``--num-fewshot``).

``--num-fewshot N`` overrides every item. Task definitions come from the installed lm_eval; local
task YAMLs are added with ``--include-path DIR`` (indexed alone first, so a run that only uses
local tasks never walks lm_eval's thousands of built-in task files).

BOS policy (explicit, checked before any evaluation): mile-preprocess stores every training
document as ``[BOS] text [EOD]``, so the model only ever saw a document's first token right after
BOS. Every request context is therefore encoded with the tokenizer's BOS prepended
(``HFLM(add_bos_token=True)``, so ``tokenizer(..., add_special_tokens=True)``), and an empty
context (rolling log-likelihood) is conditioned on BOS alone (``prefix_token_id = bos_token_id``).
No EOS is appended. The tool verifies, with the tokenizer lm_eval itself loads, that encoding
``probe`` gives ``[BOS] + ids(probe)``, and refuses to run otherwise. ``--no-bos`` (for data
preprocessed with ``--no-prepend-bos``) encodes without special tokens and conditions empty
contexts on EOS, the EOD separator that then precedes every document.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import EvalError, ModelDir, inspect_model_dir, package_versions, resolve_device, resolve_dtype

RESULT_FORMAT = "mile-eval-harness/1"
DEFAULT_TASKS = "mmlu"
COMMONSENSE = ("hellaswag", "openbookqa", "winogrande", "arc_easy", "arc_challenge", "boolq", "piqa",
               "social_iqa")
CLOSED_BOOK_QA = ("triviaqa", "webqs", "nq_open")
SUITES: dict[str, tuple[tuple[str, int], ...]] = {
    "mmlu": (("mmlu", 5),),
    "commonsense": tuple((task, 0) for task in COMMONSENSE),
    "closed_book_qa": tuple((task, 0) for task in CLOSED_BOOK_QA),
}
SUITES["paper"] = SUITES["mmlu"] + SUITES["commonsense"] + SUITES["closed_book_qa"]
BOS_PROBE = "Question: What is the capital of France?\nAnswer:"
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@dataclass(frozen=True)
class TaskRequest:
    name: str
    num_fewshot: int | None   # None: the task's own default (lm_eval uses 0 when it sets none)


@dataclass
class HarnessPlan:
    """Everything a run needs, resolved and checked, without lm_eval imported."""
    model: ModelDir
    requests: list[TaskRequest]
    hflm_args: dict[str, Any]
    evaluate_args: dict[str, Any]
    bos: dict[str, Any]
    include_paths: list[str] = field(default_factory=list)
    offline: bool = False

    @property
    def runs(self) -> list[dict[str, Any]]:
        """One simple_evaluate call per few-shot count, tasks in request order."""
        runs: dict[int | None, list[str]] = {}
        for request in self.requests:
            runs.setdefault(request.num_fewshot, []).append(request.name)
        return [{"num_fewshot": shots, "tasks": tasks} for shots, tasks in runs.items()]

    def describe(self) -> dict[str, Any]:
        """The resolved plan as JSON (what --dry-run prints)."""
        return {
            "model": self.model.describe(),
            "runs": self.runs,
            "bos": self.bos,
            "hflm_args": self.hflm_args,
            "simple_evaluate_args": self.evaluate_args,
            "include_paths": self.include_paths,
            "offline": self.offline,
        }


def parse_tasks(spec: str, num_fewshot: int | None = None) -> list[TaskRequest]:
    """Expand ``--tasks`` (suites, task names, ``NAME:N``) into ordered unique requests."""
    if num_fewshot is not None and num_fewshot < 0:
        raise EvalError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    requests: dict[str, TaskRequest] = {}
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise EvalError("--tasks is empty; give e.g. --tasks mmlu or --tasks paper")
    for item in items:
        name, sep, shots_text = item.partition(":")
        shots: int | None = None
        if sep:
            try:
                shots = int(shots_text)
            except ValueError:
                raise EvalError(f"--tasks item {item!r}: the shot count after ':' must be an integer") from None
            if shots < 0:
                raise EvalError(f"--tasks item {item!r}: the shot count must be >= 0")
        expanded = ([(task, default) for task, default in SUITES[name]] if name in SUITES
                    else [(name, None)])
        for task, default in expanded:
            chosen = num_fewshot if num_fewshot is not None else shots if shots is not None else default
            previous = requests.get(task)
            if previous is not None and previous.num_fewshot != chosen:
                raise EvalError(f"task {task!r} requested with {previous.num_fewshot} and {chosen} shots; "
                                "request it once")
            requests[task] = TaskRequest(task, chosen)
    return list(requests.values())


def check_bos(model: ModelDir, add_bos: bool = True) -> dict[str, Any]:
    """Load the tokenizer as HFLM does and verify the BOS policy (see module docstring)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model.path), add_bos_token=add_bos,
                                                  use_fast=True, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise EvalError(f"cannot load the tokenizer of {model.path}: {error}") from None
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    plain = list(tokenizer(BOS_PROBE, add_special_tokens=False)["input_ids"])
    encoded = list(tokenizer(BOS_PROBE, add_special_tokens=add_bos)["input_ids"])
    if add_bos:
        if bos is None:
            raise EvalError(f"the tokenizer of {model.path} defines no BOS token, but the model was "
                            "trained on [BOS] text [EOD] documents; reconvert with the training "
                            "tokenizer, or pass --no-bos if the data had no BOS")
        if encoded != [bos] + plain:
            raise EvalError(
                f"the tokenizer of {model.path} encodes {BOS_PROBE!r} with special tokens as "
                f"{encoded[:8]}... instead of [BOS={bos}] + {plain[:8]}...: it must prepend exactly "
                "one BOS and append nothing (check add_bos_token/add_eos_token in tokenizer_config.json)")
        prefix = bos
    else:
        if eos is None:
            raise EvalError(f"--no-bos: the tokenizer of {model.path} defines no EOS to condition "
                            "empty contexts on")
        prefix = eos
    config_bos = model.config.get("bos_token_id")
    if add_bos and isinstance(config_bos, int) and config_bos != bos:
        raise EvalError(f"{model.path}: config.json bos_token_id {config_bos} differs from the "
                        f"tokenizer's BOS {bos}; reconvert the model")
    return {
        "add_bos_token": add_bos, "bos_token_id": bos, "bos_token": tokenizer.bos_token,
        "eos_token_id": eos, "prefix_token_id": prefix, "appends_eos": False,
        "probe": BOS_PROBE, "probe_ids": encoded,
        "why": ("training documents are [BOS] text [EOD] (mile-preprocess --prepend-bos), so every "
                "context is scored after BOS and empty contexts are conditioned on BOS")
        if add_bos else ("--no-bos: documents were not prefixed with BOS; empty contexts are "
                         "conditioned on EOS (the EOD separator that precedes each document)"),
    }


def build_plan(model_path: str | Path, tasks: str = DEFAULT_TASKS, *, num_fewshot: int | None = None,
               device: str | None = None, dtype: str = "auto", batch_size: str = "8",
               max_batch_size: int = 64, max_length: int | None = None, limit: float | None = None,
               include_paths: Sequence[str] = (), seed: int = 1234, bootstrap_iters: int = 100000,
               add_bos: bool = True, offline: bool = False) -> HarnessPlan:
    """Check the inputs and resolve every setting (no lm_eval import, no weights loaded)."""
    model = inspect_model_dir(model_path, need_tokenizer=True)
    requests = parse_tasks(tasks, num_fewshot)
    batch = str(batch_size)
    if not (batch.isdigit() and int(batch) > 0) and not (batch == "auto" or batch.startswith("auto:")):
        raise EvalError(f"--batch-size {batch_size!r}: give a positive integer, 'auto' or 'auto:N'")
    if limit is not None and limit <= 0:
        raise EvalError(f"--limit must be > 0, got {limit}")
    if max_length is not None and max_length < 1:
        raise EvalError(f"--max-length must be >= 1, got {max_length}")
    paths = []
    for path in include_paths:
        if not Path(path).is_dir():
            raise EvalError(f"--include-path {path} is not a directory of lm_eval task YAML files")
        paths.append(str(Path(path).resolve()))
    bos = check_bos(model, add_bos)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    hflm_args = {
        "pretrained": str(model.path),
        "backend": "causal",
        "dtype": dtype,
        "device": device,
        "batch_size": int(batch) if batch.isdigit() else batch,
        "max_batch_size": max_batch_size,
        "max_length": max_length if max_length is not None else model.max_position_embeddings,
        "add_bos_token": add_bos,
        "prefix_token_id": bos["prefix_token_id"],
        "softmax_dtype": "float32" if dtype in ("bfloat16", "float16") else None,
        "trust_remote_code": False,
    }
    evaluate_args = {
        "limit": limit,
        "bootstrap_iters": bootstrap_iters,
        "random_seed": seed, "numpy_random_seed": seed, "torch_random_seed": seed,
        "fewshot_random_seed": seed,
        "log_samples": False,
        "apply_chat_template": False,
    }
    return HarnessPlan(model, requests, hflm_args, evaluate_args, bos, paths, offline)


def set_offline_environment() -> None:
    """Forbid Hub downloads (models, datasets); must run before transformers/datasets import."""
    for name in OFFLINE_ENV:
        os.environ[name] = "1"


def _task_manager(plan: HarnessPlan):
    """A TaskManager that knows every requested name; local include paths are indexed alone first."""
    from lm_eval.tasks import TaskManager

    wanted = [request.name for request in plan.requests]
    if plan.include_paths:
        local = TaskManager(include_path=plan.include_paths, include_defaults=False)
        if all(name in local.all_tasks for name in wanted):
            return local
    manager = TaskManager(include_path=plan.include_paths or None)
    unknown = [name for name in wanted if name not in manager.all_tasks]
    if unknown:
        raise EvalError(f"unknown lm_eval task(s) {', '.join(unknown)} (lm_eval "
                        f"{package_versions('lm_eval')['lm_eval']}); list them with "
                        "'lm_eval ls tasks', or add local YAMLs with --include-path")
    return manager


def _verify_lm_bos(lm, plan: HarnessPlan) -> None:
    """The loaded HFLM encodes exactly as check_bos promised."""
    plain = plan.bos["probe_ids"][1:] if plan.bos["add_bos_token"] else plan.bos["probe_ids"]
    expected = ([plan.bos["bos_token_id"]] if plan.bos["add_bos_token"] else []) + list(plain)
    got = list(lm.tok_encode(BOS_PROBE))
    if got != expected or lm.prefix_token_id != plan.bos["prefix_token_id"]:
        raise EvalError(f"lm_eval's HFLM encodes the probe as {got[:8]}... with prefix token "
                        f"{lm.prefix_token_id}; expected {expected[:8]}... and "
                        f"{plan.bos['prefix_token_id']} — BOS handling differs from the plan")


_MERGED_KEYS = {"results": "results", "groups": "groups", "group_subtasks": "group_subtasks",
                "n-shot": "n_shot", "n-samples": "n_samples", "higher_is_better": "higher_is_better",
                "versions": "task_versions", "configs": "task_configs"}


def run_plan(plan: HarnessPlan, progress: bool = True) -> dict[str, Any]:
    """Run lm_eval.simple_evaluate for every run of the plan; return the merged results record."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    manager = _task_manager(plan)
    try:
        lm = HFLM(**plan.hflm_args)
    except (OSError, ValueError) as error:
        raise EvalError(f"lm_eval could not load {plan.model.path}: {error}") from None
    _verify_lm_bos(lm, plan)
    merged: dict[str, Any] = {key: {} for key in _MERGED_KEYS.values()}
    calls, lm_eval_info = [], {}
    started = time.time()
    for run in plan.runs:
        if progress:
            print(f"mile-eval harness: {run['tasks']} with num_fewshot={run['num_fewshot']}",
                  file=sys.stderr, flush=True)
        output = lm_eval.simple_evaluate(
            model=lm, tasks=list(run["tasks"]), num_fewshot=run["num_fewshot"],
            batch_size=plan.hflm_args["batch_size"], device=plan.hflm_args["device"],
            task_manager=manager, **plan.evaluate_args)
        if output is None:
            raise EvalError("lm_eval returned no results on this process (non-zero rank?)")
        for source, target in _MERGED_KEYS.items():
            merged[target].update(output.get(source) or {})
        calls.append({"tasks": run["tasks"], "num_fewshot": run["num_fewshot"],
                      "lm_eval_config": output.get("config", {})})
        for key in ("lm_eval_version", "transformers_version", "git_hash", "pretty_env_info",
                    "tokenizer_bos_token", "tokenizer_eos_token", "tokenizer_pad_token",
                    "eot_token_id", "max_length"):
            if key in output:
                lm_eval_info.setdefault(key, output[key])
    versions = package_versions("lm_eval", "datasets", "accelerate")
    return {
        "format": RESULT_FORMAT,
        "created_unix": started,
        "seconds": time.time() - started,
        "model": plan.model.describe(),
        "versions": versions,
        "bos": plan.bos,
        "hflm_args": plan.hflm_args,
        "simple_evaluate_args": plan.evaluate_args,
        "runs": calls,
        "summary": summarize(merged, [request.name for request in plan.requests]),
        **merged,
        "lm_eval_info": lm_eval_info,
    }


def summarize(merged: dict[str, Any], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Metrics of each requested task or group (groups aggregate their subtasks) and its shots."""
    summary = {}
    for name in names:
        metrics = merged["groups"].get(name) or merged["results"].get(name) or {}
        entry = {key: value for key, value in metrics.items() if key not in ("alias", "name", "sample_len")}
        shots = sorted(set(_shots(merged, name)))
        entry["num_fewshot"] = shots[0] if len(shots) == 1 else shots or None
        summary[name] = entry
    return summary


def _shots(merged: dict[str, Any], name: str) -> list[int]:
    """Shot counts lm_eval used for a task, or for every leaf task of a group."""
    if name in merged["n_shot"] and name not in merged["group_subtasks"]:
        return [merged["n_shot"][name]]
    return [shot for sub in merged["group_subtasks"].get(name, []) for shot in _shots(merged, sub)]


def render_table(results: dict[str, Any]) -> str:
    """One line per requested task: shots and metrics (value ± stderr where present)."""
    lines = []
    for name, metrics in results["summary"].items():
        parts = []
        for key, value in metrics.items():
            if "_stderr" in key or key == "num_fewshot" or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            parts.append(f"{metric}={value:.4f}" + (f"±{stderr:.4f}" if isinstance(stderr, float) else ""))
        lines.append(f"{name:<20} shots={metrics.get('num_fewshot')!s:<4} " + "  ".join(parts))
    return "\n".join(lines)
