"""End-to-end tests of `mile_megatron.engines.deepspeed` (mile-pretrain-ds): real torchrun, DeepSpeed ZeRO-2 on its
CPU accelerator with gloo, a tiny Hugging Face LLaMA, and a small Megatron indexed dataset.

Five launches are shared by the module (two run at a time), all MiLe with alpha "global" on the same global
batches of 4 sequences, so all optimise the same step objective sum(w * CE * mask) / sum(w * mask):
  mile    2 processes x 2 accumulated micro-batches of 1 sequence (ZeRO-2); saves at step SAVE_AT and at the
          end, exports a Hugging Face model
  acc4    1 process x 4 accumulated micro-batches of 1 sequence (ZeRO-2)
  zero3   2 processes x 2 accumulated micro-batches (ZeRO-3: the gradient division on each rank's partitions)
  single  1 process x 1 micro-batch of 4 sequences (ZeRO-0: the denominator is known before the only backward)
  resume  2 processes, resumes a copy of mile's step-SAVE_AT checkpoint and trains to the end
The entry's test-only dump (TEST_DS_DUMP_DIR) gives the first step's logits, loss statistics and
logits gradients, checked against the float64 reference, and the trained model's logits on a fixed batch,
checked against the exported Hugging Face model. The launches start in the background at the module's first
test; the tests without launches (command line, configs, schedule, examples/deepspeed/ scripts) come first and
run meanwhile.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from megatron_runs import REPO, read_records, run_torchrun, write_pattern_dataset

from mile_megatron.loss.reference import RefBatch, mile_loss_reference

TRAIN_ITERS = 6
SAVE_AT = 3
LAUNCH_TIMEOUT_S = 300
# Vocabulary 61 = the pattern alphabet; NullTokenizer's eod is id 60, which the pattern data holds at about one
# position in 61, so --eod-mask-loss leaves micro-batches with different numbers of counted tokens (with seed 7
# the first global batch counts 31, 29, 32 and 31 of its 32-position samples).
VOCAB = 61
COMMON = ("--cpu", "--preset", "tiny", "--vocab-size", str(VOCAB), "--eod-mask-loss", "--split", "95,5,0",
          "--seq-length", "32", "--global-batch-size", "4", "--train-iters", str(TRAIN_ITERS), "--lr", "1e-2",
          "--min-lr", "1e-3", "--lr-warmup-iters", "1", "--seed", "7", "--log-interval", "1", "--zero-stage", "2",
          "--loss", "mile", "--mile-alpha", "global")


@dataclass
class DsRun:
    name: str
    workdir: Path
    returncode: int
    output: str

    @property
    def records(self) -> list[dict]:
        return read_records(self.workdir / "loss.jsonl")

    def by_iteration(self) -> dict[int, dict]:
        return {record["iteration"]: record for record in self.records}

    def dump(self, name: str) -> dict:
        return torch.load(self.workdir / "dump" / f"{name}.pt", weights_only=False)

    def describe(self) -> str:
        return f"run {self.name!r} exited {self.returncode}; output tail:\n{self.output[-12000:]}"


def launch(root: Path, name: str, nproc: int, flags: list[str], expect_success: bool = True) -> DsRun:
    workdir = root / name
    workdir.mkdir(parents=True, exist_ok=True)
    flags = [*flags, "--loss-log", str(workdir / "loss.jsonl"), "--data-cache-path", str(workdir / "cache")]
    returncode, output = run_torchrun(name, nproc, flags, engine="deepspeed",
                                      env={"TEST_DS_DUMP_DIR": str(workdir / "dump")},
                                      timeout=LAUNCH_TIMEOUT_S)
    run = DsRun(name, workdir, returncode, output)
    if expect_success and run.returncode != 0:
        raise AssertionError(run.describe())
    return run


class Runs:
    """The dataset and the module's launches, two jobs at a time; `resume` starts once `mile` has finished."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ds-run")
        self._futures: dict[str, Future] = {}
        self._lock = threading.Lock()

    def _flags(self, *extra: str) -> list[str]:
        return [*COMMON, "--data-path", str(self.get("data")), *extra]

    def _data(self) -> Path:
        return write_pattern_dataset(self.root / "pattern")

    def _mile(self) -> DsRun:
        workdir = self.root / "mile"
        return launch(self.root, "mile", 2, self._flags(
            "--micro-batch-size", "1", "--save", str(workdir / "ckpt"), "--save-interval", str(SAVE_AT),
            "--export-hf", str(workdir / "hf")))

    def _acc4(self) -> DsRun:
        return launch(self.root, "acc4", 1, self._flags("--micro-batch-size", "1"))

    def _zero3(self) -> DsRun:
        return launch(self.root, "zero3", 2, self._flags("--micro-batch-size", "1", "--zero-stage", "3"))

    def _single(self) -> DsRun:
        return launch(self.root, "single", 1, self._flags("--micro-batch-size", "4", "--zero-stage", "0"))

    def _resume(self) -> DsRun:
        source = self.get("mile").workdir / "ckpt"
        target = self.root / "resume_ckpt"
        tag = f"iter_{SAVE_AT:07d}"
        shutil.copytree(source / tag, target / tag)
        (target / "latest").write_text(tag)
        return launch(self.root, "resume", 2, self._flags("--micro-batch-size", "1", "--load", str(target)))

    def _nonfinite(self) -> DsRun:
        """mile's flags from a model whose embedding row of one token is NaN, a token that only rank 1's step-1
        micro-batches hold (read from mile's dumps): rank 1's loss is NaN, rank 0's finite."""
        from mile_megatron.hf.models import build_model, llama_config

        dumps = load_step1(self.get("mile"), ranks=2, micro_batches=2)
        seen = [set(torch.cat([d["tokens"].view(-1) for d in rank]).tolist()) for rank in dumps]
        token = min(seen[1] - seen[0])
        model = build_model(llama_config("tiny", VOCAB, seq_length=32), seed=7)
        with torch.no_grad():
            model.model.embed_tokens.weight[token] = float("nan")
        model.save_pretrained(self.root / "nan_model")
        return launch(self.root, "nonfinite", 2, self._flags("--micro-batch-size", "1", "--hf-init",
                                                             str(self.root / "nan_model")), expect_success=False)

    def start(self) -> None:
        for name in ("data", "mile", "acc4", "zero3", "single", "resume", "nonfinite"):  # a job waits inside its worker for what it needs
            self.get_future(name)

    def get_future(self, name: str) -> Future:
        with self._lock:
            if name not in self._futures:
                self._futures[name] = self._pool.submit(getattr(self, f"_{name}"))
            return self._futures[name]

    def get(self, name: str):
        return self.get_future(name).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


NEEDS_LAUNCHES = {"test_two_process_zero2_run_trains_and_logs",
                  "test_first_step_loss_alpha_and_gradient_match_reference",
                  "test_every_split_of_the_global_batch_and_zero_stage_optimises_the_same_objective",
                  "test_resume_reproduces_the_uninterrupted_run",
                  "test_exported_model_reproduces_the_trained_logits",
                  "test_non_finite_loss_on_one_rank_stops_every_rank"}


@pytest.fixture(scope="module", autouse=True)
def runs(tmp_path_factory, request) -> Runs:
    """Starts the launches in the background at the module's first test, so the tests without launches (first
    in this file) run meanwhile."""
    cache = Runs(tmp_path_factory.mktemp("ds_runs"))
    if any(item.name in NEEDS_LAUNCHES for item in request.session.items):
        cache.start()
    yield cache
    cache.close()


def assert_same_records(reference: DsRun, other: DsRun, iterations, tolerance: float,
                        fields=("ce", "loss", "entropy", "alpha", "grad_norm", "lr")) -> None:
    expected, actual = reference.by_iteration(), other.by_iteration()
    for iteration in iterations:
        assert iteration in actual, f"{other.name} has no record of iteration {iteration}:\n{other.describe()}"
        for field in fields:
            expected_value = pytest.approx(expected[iteration][field], rel=tolerance, abs=tolerance)
            assert actual[iteration][field] == expected_value, (
                f"{field} differs at iteration {iteration}: {reference.name}={expected[iteration][field]!r} "
                f"{other.name}={actual[iteration][field]!r}")
        for field in ("tokens", "consumed_samples"):
            assert actual[iteration][field] == expected[iteration][field]


def load_step1(run: DsRun, ranks: int, micro_batches: int) -> list[list[dict]]:
    """[rank][micro-batch] first-step dumps."""
    return [[run.dump(f"step1_rank{rank}_micro{micro}") for micro in range(micro_batches)] for rank in range(ranks)]


# -------------------------------------------------------------------------------------------------
# Command line, configuration and schedule (no launch).
def tiny_args(*extra: str):
    from mile_megatron.engines.deepspeed.cli import parse_args

    return parse_args(["--preset", "tiny", "--vocab-size", "64", "--mock-data", "--seq-length", "32",
                       "--micro-batch-size", "2", "--global-batch-size", "8", *extra])


def test_learning_rate_is_megatrons_linear_warmup_then_cosine():
    from mile_megatron.engines.deepspeed.config import learning_rate

    def lr(step, warmup=2):
        return learning_rate(step, lr=1.0, min_lr=0.1, warmup=warmup, total=10)

    assert [lr(0), lr(1), lr(2)] == [0.0, 0.5, 1.0]
    assert lr(6) == pytest.approx(0.55)  # half way through the cosine: (1 + 0.1) / 2
    assert lr(4) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2)
    assert lr(10) == pytest.approx(0.1) and lr(11) == 0.1
    assert lr(0, warmup=0) == 1.0


def test_presets_give_the_paper_recipe_and_command_line_flags_win():
    from mile_megatron.engines.deepspeed.cli import PAPER_DEFAULTS, parse_args

    base = ["--vocab-size", "64", "--mock-data"]
    args = parse_args(["--preset", "468m", *base, "--lr", "1e-4"])
    assert (args.lr, args.min_lr, args.lr_warmup_iters, args.adam_beta1, args.adam_beta2, args.adam_eps,
            args.weight_decay, args.clip_grad, args.seed) == (1e-4, 0.0, 2000, 0.9, 0.95, 1e-8, 0.1, 1.0, 111)
    assert (args.seq_length, args.micro_batch_size, args.global_batch_size, args.train_iters) == (1024, 8, 1024, 100000)
    assert args.eod_mask_loss and args.preset_bf16 and not args.gradient_checkpointing
    assert parse_args(["--preset", "6.7b", *base]).gradient_checkpointing
    assert not parse_args(["--preset", "468m", *base, "--no-eod-mask-loss"]).eod_mask_loss
    bare = parse_args(["--hf-init", "x", *base])
    assert {name: getattr(bare, name) for name in PAPER_DEFAULTS} == PAPER_DEFAULTS
    assert bare.seq_length is None and not bare.preset_bf16


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_packaged_zero_configs_are_filled_from_the_command_line(stage):
    from mile_megatron.engines.deepspeed.config import deepspeed_config

    args = tiny_args("--zero-stage", str(stage), "--clip-grad", "0.5", "--lr", "2e-3", "--weight-decay", "0.05")
    args.precision = "fp32"
    config = deepspeed_config(args, dp_size=2)
    assert config["zero_optimization"]["stage"] == stage
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"]) == (2, 2, 8)
    assert config["gradient_clipping"] == 0.5 and config["bf16"]["enabled"] is False
    assert config["optimizer"] == {"type": "AdamW", "params": {"lr": 2e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                                                "weight_decay": 0.05}}
    assert "auto" not in json.dumps(config)
    args.cpu = True  # torch AdamW is passed in instead of DeepSpeed's (compiled) optimizers
    cpu_config = deepspeed_config(args, dp_size=2)
    assert "optimizer" not in cpu_config and cpu_config["zero_allow_untested_optimizer"] is True


def test_user_deepspeed_config_replaces_the_packaged_one_but_not_the_flags():
    from mile_megatron.engines.deepspeed.config import deepspeed_config
    from mile_megatron.utils.errors import UsageError

    def config_for(user: dict, *extra: str, dp_size: int = 2):
        args = tiny_args("--deepspeed-config", json.dumps(user), *extra)
        args.precision = "bf16"
        return deepspeed_config(args, dp_size=dp_size)

    config = config_for({"zero_optimization": {"stage": 1, "reduce_bucket_size": 123}, "train_batch_size": 8,
                         "gradient_clipping": "auto"})
    assert config["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 123}
    assert config["train_batch_size"] == 8 and config["bf16"]["enabled"] is True
    assert config["gradient_accumulation_steps"] == 2
    bad = [
        ({"train_batch_size": 64}, (), "--global-batch-size"),
        ({"gradient_clipping": 2.0}, (), "--clip-grad"),
        ({"optimizer": {"type": "AdamW", "params": {"lr": 0.5}}}, (), "--lr"),
        ({"optimizer": {"type": "Lamb"}}, (), "AdamW"),
        ({"scheduler": {"type": "WarmupLR"}}, (), "scheduler"),
        ({"fp16": {"enabled": True}}, (), "--bf16"),
        ({"zero_optimization": {"stage": 1}}, ("--zero-stage", "3"), "--zero-stage 3"),
        ({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}, (), "zero_optimization.reduce_bucket_size"),
    ]
    for user, extra, message in bad:
        with pytest.raises(UsageError, match=message):
            config_for(user, *extra)
    with pytest.raises(UsageError, match="not a multiple"):
        config_for({}, dp_size=3)


def test_weight_decay_skips_one_dimensional_parameters():
    from mile_megatron.hf.models import build_model, llama_config
    from mile_megatron.engines.deepspeed.config import parameter_groups

    model = build_model(llama_config("tiny", 64), seed=1)
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): name for name, p in model.named_parameters()}
    norms = {name for name, _ in model.named_parameters() if "norm" in name}
    assert {names[id(p)] for p in no_decay["params"]} == norms
    assert all(p.dim() == 2 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_export_writes_the_tokenizer_the_run_was_given(tmp_path):
    import sentencepiece
    from transformers import AutoTokenizer

    from mile_megatron.engines.deepspeed.checkpoint import tokenizer_writer

    words = ["entropy", "weighted", "loss", "the", "model", "token", "42", "x"]
    sentences = [" ".join(words[(i * 5 + j * 3) % len(words)] for j in range(8)) for i in range(100)]
    sentencepiece.SentencePieceTrainer.Train(
        sentence_iterator=iter(sentences), model_prefix=str(tmp_path / "spm"), vocab_size=300, model_type="bpe",
        byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "spm.model"))
    write = tokenizer_writer(tiny_args("--tokenizer-model", str(tmp_path / "spm.model")))
    (tmp_path / "from_sp").mkdir()
    write(tmp_path / "from_sp")
    assert (tmp_path / "from_sp" / "tokenizer.model").is_file()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "from_sp")
    assert tokenizer("the model loss")["input_ids"] == [1] + processor.encode("the model loss")
    write = tokenizer_writer(tiny_args("--hf-tokenizer", str(tmp_path / "from_sp")))
    (tmp_path / "from_hf").mkdir()
    write(tmp_path / "from_hf")
    assert AutoTokenizer.from_pretrained(tmp_path / "from_hf")("the model loss")["input_ids"] == \
        tokenizer("the model loss")["input_ids"]
    assert tokenizer_writer(tiny_args()) is None  # synthetic ids: no tokenizer files


def test_bad_command_lines_stop_with_a_clear_message(tmp_path, capsys, monkeypatch):
    from mile_megatron.engines.deepspeed.checkpoint import EXPORT_MARKER, export_dir_problem
    from mile_megatron.engines.deepspeed.cli import main

    monkeypatch.delenv("RANK", raising=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not ours")
    cases = [
        (["--vocab-size", "64", "--mock-data"], "give --preset"),
        (["--preset", "tiny", "--mock-data"], "exactly one of --tokenizer-model"),
        (["--preset", "tiny", "--vocab-size", "64", "--mock-data", "--data-path", "x"], "exactly one data source"),
        (["--preset", "tiny", "--vocab-size", "64", "--mock-data", "--export-hf", str(tmp_path / "new")],
         "--export-hf needs --save"),
        (["--preset", "tiny", "--vocab-size", "64", "--mock-data", "--save", str(tmp_path / "s"),
          "--export-hf", str(foreign)], "was not written by mile-pretrain-ds"),
        (["--preset", "tiny", "--vocab-size", "64", "--mock-data", "--lr", "1e-3", "--min-lr", "1e-2"],
         "--min-lr 0.01 is above --lr 0.001"),
        (["--preset", "tiny", "--vocab-size", "64", "--mock-data", "--hf-init", str(tmp_path)], "no config.json"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert "mile-pretrain-ds: error:" in error and message in error and "Traceback" not in error, (argv, error)
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / EXPORT_MARKER).write_text("{}")
    (ours / "model.safetensors").write_bytes(b"")
    assert export_dir_problem(ours) is None and export_dir_problem(tmp_path / "absent") is None
    assert "not empty" in export_dir_problem(foreign)


# -------------------------------------------------------------------------------------------------
# examples/deepspeed/: real bash runs (DRY_RUN=1 prints the command instead of starting it).
EXAMPLES = REPO / "examples" / "deepspeed"
SCRIPTS = ("pretrain_ds.sh", "single_node.sh", "multi_node.sh", "torchrun.sh", "slurm.sbatch")


def run_script(script: str, env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = {"PATH": os.environ["PATH"], "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(script if "/" in str(script) else EXAMPLES / script), *args], env=full_env,
                          cwd=cwd or REPO, capture_output=True, text=True, timeout=60)


def dry_command(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "mile_megatron.engines.deepspeed" in line]
    assert len(lines) == 1, result.stdout + result.stderr
    return shlex.split(lines[0])


def value(command: list[str], flag: str) -> str:
    assert flag in command, (flag, command)
    return command[command.index(flag) + 1]


@pytest.fixture
def script_inputs(tmp_path) -> dict[str, str]:
    prefix = tmp_path / "corpus_text_document"
    for suffix in (".bin", ".idx"):
        Path(f"{prefix}{suffix}").write_bytes(b"")
    (tmp_path / "blend.txt").write_text(f"0.5 {prefix} 0.5 {prefix}\n")
    (tmp_path / "hosts.txt").write_text("gpu-1 slots=8\ngpu-2 slots=8\n")
    (tmp_path / "tokenizer.model").write_bytes(b"not read by a dry run")
    return {"DATA_ARGS_PATH": str(tmp_path / "blend.txt"), "TOKENIZER_MODEL": str(tmp_path / "tokenizer.model"),
            "CHECKPOINT_DIR": str(tmp_path / "ckpt"), "DRY_RUN": "1"}


def test_deepspeed_example_scripts_pass_bash_syntax_check_and_are_executable():
    for name in SCRIPTS:
        script = EXAMPLES / name
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"{name}: {result.stderr}"
        assert os.access(script, os.X_OK), f"{name} is not executable"
        text = script.read_text()
        assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text, name


def test_deepspeed_example_scripts_compose_the_launch_commands(script_inputs, tmp_path):
    single = dry_command(run_script("single_node.sh", script_inputs, "--lr", "1e-4"))
    assert single[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    assert value(single, "--num_gpus") == "8" and "--hostfile" not in single
    assert single[single.index("--module") + 1] == "mile_megatron.engines.deepspeed"
    assert (value(single, "--preset"), value(single, "--zero-stage"), value(single, "--loss")) == ("468m", "2", "mile")
    assert value(single, "--save") == value(single, "--load") == script_inputs["CHECKPOINT_DIR"]
    assert value(single, "--data-args-path") == script_inputs["DATA_ARGS_PATH"]
    assert value(single, "--tokenizer-model") == script_inputs["TOKENIZER_MODEL"]
    assert single[-2:] == ["--lr", "1e-4"], "script arguments come last so they win"

    hosts = str(tmp_path / "hosts.txt")
    multi = dry_command(run_script("multi_node.sh", {**script_inputs, "HOSTFILE": hosts, "NNODES": "2",
                                                     "ZERO_STAGE": "3", "EXPORT_DIR": str(tmp_path / "hf")}))
    assert value(multi, "--hostfile") == hosts and value(multi, "--num_nodes") == "2"
    assert (value(multi, "--preset"), value(multi, "--zero-stage")) == ("1.2b", "3")
    assert value(multi, "--export-hf") == str(tmp_path / "hf")

    env = {**script_inputs, "NNODES": "4", "NODE_RANK": "3", "MASTER_ADDR": "gpu-1", "MASTER_PORT": "29555",
           "LOSS": "ce", "EXTRA_ARGS": "--mile-gamma 2 --train-iters 5"}
    del env["TOKENIZER_MODEL"]
    env["VOCAB_SIZE"] = "128"
    per_node = dry_command(run_script("torchrun.sh", env))
    assert per_node[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert (value(per_node, "--nnodes"), value(per_node, "--node-rank"), value(per_node, "--master-addr"),
            value(per_node, "--master-port"), value(per_node, "--nproc-per-node")) == ("4", "3", "gpu-1", "29555", "8")
    assert value(per_node, "--vocab-size") == "128" and value(per_node, "--loss") == "ce"
    assert per_node[-4:] == ["--mile-gamma", "2", "--train-iters", "5"]

    cpu = dry_command(run_script("pretrain_ds.sh", {**script_inputs, "CPU": "1", "LAUNCHER": "torchrun",
                                                    "GPUS_PER_NODE": "2", "PRESET": "tiny",
                                                    "DS_CONFIG": str(tmp_path / "hosts.txt")}))
    assert "--cpu" in cpu and "--standalone" in cpu and "--zero-stage" not in cpu
    assert value(cpu, "--deepspeed-config") == str(tmp_path / "hosts.txt")
    assert not Path(script_inputs["CHECKPOINT_DIR"]).exists(), "a dry run creates nothing"


def test_deepspeed_slurm_script_runs_torchrun_once_per_node(script_inputs, tmp_path):
    bin_dir = tmp_path / "fake_slurm"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\nprintf '%s\\n' node-a node-b\n")
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
                                  'for id in 0 1; do SLURM_NODEID=$id "$@" || exit $?; done\n')
    for name in ("scontrol", "srun"):
        (bin_dir / name).chmod(0o755)
    spool = tmp_path / "spool"  # sbatch runs a copy of the batch file from its spool directory
    spool.mkdir()
    (spool / "slurm_script").write_text((EXAMPLES / "slurm.sbatch").read_text())
    env = {**script_inputs, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_SUBMIT_DIR": str(REPO), "SLURM_GPUS_ON_NODE": "4"}
    result = run_script(str(spool / "slurm_script"), env, cwd=spool)
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line) for line in result.stdout.splitlines() if "mile_megatron.engines.deepspeed" in line]
    assert [value(c, "--node-rank") for c in commands] == ["0", "1"], result.stdout + result.stderr
    for command in commands:
        assert (value(command, "--nnodes"), value(command, "--master-addr"), value(command, "--master-port"),
                value(command, "--nproc-per-node")) == ("2", "node-a", str(20000 + 4242 % 20000), "4")


BAD_SCRIPT_CASES = [
    ("multi_node.sh", {}, [], "HOSTFILE is not set"),
    ("pretrain_ds.sh", {"PRESET": "tiny", "GPUS_PER_NODE": "8", "NNODES": "2"}, [], "HOSTFILE is not set"),
    ("pretrain_ds.sh", {"PRESET": "tiny", "GPUS_PER_NODE": "8", "HOSTFILE": "/nonexistent/hosts"}, [],
     "HOSTFILE='/nonexistent/hosts'"),
    ("pretrain_ds.sh", {"PRESET": "tiny"}, [], "GPUS_PER_NODE is not set"),
    ("torchrun.sh", {"NNODES": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, [], "NODE_RANK is not set"),
    ("pretrain_ds.sh", {"GPUS_PER_NODE": "8"}, [], "set PRESET"),
    ("single_node.sh", {"VOCAB_SIZE": "64"}, [], "exactly one of TOKENIZER_MODEL"),
    ("single_node.sh", {}, ["TOKENIZER_MODEL"], "exactly one of TOKENIZER_MODEL"),
    ("single_node.sh", {"ZERO_STAGE": "4"}, [], "ZERO_STAGE='4' is not one of"),
    ("single_node.sh", {"LAUNCHER": "mpirun"}, [], "LAUNCHER='mpirun' is not one of"),
    ("single_node.sh", {"DS_CONFIG": "/nonexistent/ds.json"}, [], "DS_CONFIG='/nonexistent/ds.json' does not exist"),
    ("single_node.sh", {"HF_INIT": "/nonexistent/model"}, [], "HF_INIT='/nonexistent/model' has no config.json"),
    ("single_node.sh", {}, ["CHECKPOINT_DIR"], "CHECKPOINT_DIR is not set"),
    ("single_node.sh", {"DATA_ARGS_PATH": "/nonexistent/blend.txt"}, [], "DATA_ARGS_PATH='/nonexistent/blend.txt'"),
]


@pytest.mark.parametrize("script,change,remove,message", BAD_SCRIPT_CASES,
                         ids=[f"{c[0]}-{c[3][:24]}" for c in BAD_SCRIPT_CASES])
def test_deepspeed_example_scripts_stop_on_missing_or_bad_variables(script_inputs, script, change, remove, message):
    env = {**script_inputs, **change}
    env.pop("DRY_RUN")  # a check that failed to fire would start the launcher: it must not get that far
    for name in remove:
        env.pop(name)
    result = run_script(script, env)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert "mile_megatron.engines.deepspeed" not in result.stdout + result.stderr


def test_deepspeed_example_scripts_name_a_missing_dataset(script_inputs, tmp_path):
    (tmp_path / "bad.txt").write_text(f"{tmp_path}/absent_prefix\n")
    result = run_script("single_node.sh", {**script_inputs, "DATA_ARGS_PATH": str(tmp_path / "bad.txt")})
    assert result.returncode != 0 and f"'{tmp_path}/absent_prefix.bin' does not exist" in result.stderr, result.stderr


# -------------------------------------------------------------------------------------------------
# Launches (they run in the background from the module's first test on; the resume test comes last).
def test_two_process_zero2_run_trains_and_logs(runs):
    run = runs.get("mile")
    records = run.by_iteration()
    assert sorted(records) == list(range(1, TRAIN_ITERS + 1)), run.describe()
    assert all(math.isfinite(r[field]) for r in records.values() for field in ("ce", "loss", "entropy", "alpha"))
    assert records[1]["ce"] > math.log(VOCAB) - 0.3, f"initial CE {records[1]['ce']} should be near ln(V)"
    last = (records[TRAIN_ITERS]["ce"] + records[TRAIN_ITERS - 1]["ce"]) / 2
    assert last < records[1]["ce"] - 0.5, f"loss did not fall: {[r['ce'] for r in records.values()]}"
    # Global batch 4 x 32 positions; --eod-mask-loss drops the positions holding id 60 (EOD here).
    assert all(r["consumed_samples"] == 4 * i and 100 < r["tokens"] <= 128 for i, r in records.items())
    assert len({r["tokens"] for r in records.values()}) > 1, "the data should give varying token counts"
    # MiLe weights (sigma + H)^gamma ~ 5 here; alpha normalises them to mean one.
    assert all(0.1 < r["alpha"] < 0.3 and r["loss"] != r["ce"] for r in records.values())
    # Megatron's schedule: lr 0 at the first step (warmup 1), peak at the second, cosine towards min lr.
    assert records[1]["lr"] == 0.0 and records[2]["lr"] == pytest.approx(1e-2)
    assert "ZeRO stage 2" in run.output and f"iteration {TRAIN_ITERS}/{TRAIN_ITERS}" in run.output
    checkpoint = run.workdir / "ckpt"
    assert (checkpoint / "latest").read_text().strip() == f"iter_{TRAIN_ITERS:07d}"
    for tag in (f"iter_{SAVE_AT:07d}", f"iter_{TRAIN_ITERS:07d}"):
        names = {path.name for path in (checkpoint / tag).iterdir()}
        assert {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                "zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_state_rank0.pt", "rng_state_rank1.pt"} <= names


def test_first_step_loss_alpha_and_gradient_match_reference(runs):
    """Step 1 of `mile` against float64: each micro-batch's numerator sum(w * CE * mask) and denominator
    sum(w * mask), the gradient reaching its logits (coefficient dp_size / N times d numerator / d logits), and the
    logged step loss and alpha over all four micro-batches of both ranks (alpha = N / sum(w * mask))."""
    run = runs.get("mile")
    dumps = [d for rank in load_step1(run, ranks=2, micro_batches=2) for d in rank]
    batches = [RefBatch(d["logits"].double(), d["labels"], d["loss_mask"]) for d in dumps]
    total = sum(float(d["loss_mask"].sum()) for d in dumps)
    assert total < 128, "some positions should be masked"
    step = mile_loss_reference(batches, kind="mile", alpha="global")  # alpha over the whole step
    numerators = mile_loss_reference(batches, kind="mile", alpha="none")
    for index, (dump, expected) in enumerate(zip(dumps, numerators)):
        where = f"rank {index // 2}, micro-batch {index % 2}"
        assert dump["dp_size"] == 2 and dump["accumulation"] == 2
        assert float(dump["total_tokens"]) == total, where
        assert float(dump["alpha"]) == 1.0, where  # global: alpha comes from the step's sums, not per micro-batch
        assert float(dump["numerator"]) == pytest.approx(expected.loss_sum, rel=1e-5), where
        weight_sum = float((expected.tokens.weight * dump["loss_mask"].double()).sum())
        assert float(dump["denominator"]) == pytest.approx(weight_sum, rel=1e-5), where
        assert float(dump["entropy_sum"]) == pytest.approx(expected.entropy_sum, rel=1e-5), where
        assert float(dump["coefficient"]) == pytest.approx(2 / total, rel=1e-12), where
        torch.testing.assert_close(dump["logits_grad"].double(), 2 / total * expected.loss_sum_grad,
                                   rtol=1e-4, atol=1e-9, msg=where)
    logged = run.by_iteration()[1]
    assert logged["tokens"] == total
    assert logged["alpha"] == pytest.approx(step[0].alpha, rel=1e-6)
    assert logged["loss"] == pytest.approx(sum(r.loss_sum for r in step) / total, rel=1e-5)
    assert logged["ce"] == pytest.approx(sum(r.ce_sum for r in step) / total, rel=1e-5)


def test_every_split_of_the_global_batch_and_zero_stage_optimises_the_same_objective(runs):
    """2 ranks x 2 micro-batches (ZeRO-2), 1 rank x 4 (ZeRO-2), 2 x 2 with ZeRO-3 and 1 x 1 micro-batch of 4
    (ZeRO-0): the same per-step loss, alpha, gradient norm and trained weights. A per-micro-batch alpha would make
    each split a different objective (the paper code's rule, --mile-alpha official)."""
    mile = runs.get("mile")
    assert "accumulation 2 x 2 = global batch 4" in mile.output
    for name, fields in (("acc4", None), ("zero3", None), ("single", ("ce", "loss", "entropy", "alpha", "lr"))):
        other = runs.get(name)
        assert_same_records(mile, other, range(1, TRAIN_ITERS + 1), tolerance=2e-5,
                            **({"fields": fields} if fields else {}))
        # The trained models' logits on the dataset's first sequence (the final dump holds a micro-batch).
        torch.testing.assert_close(other.dump("final_rank0")["logits"][:1], mile.dump("final_rank0")["logits"],
                                   rtol=0, atol=2e-5, msg=f"{name} ends with other weights")
    assert "accumulation 4 x 1 = global batch 4" in runs.get("acc4").output
    assert "ZeRO stage 3" in runs.get("zero3").output
    assert "accumulation 1 x 1 = global batch 4" in runs.get("single").output
    # The micro-batches of the single process hold the sequences of both ranks' micro-batches.
    single = load_step1(runs.get("acc4"), ranks=1, micro_batches=4)[0]
    pairs = load_step1(mile, ranks=2, micro_batches=2)
    assert all(torch.equal(single[2 * k + r]["tokens"], pairs[r][k]["tokens"]) for k in (0, 1) for r in (0, 1))


def test_exported_model_reproduces_the_trained_logits(runs):
    from transformers import LlamaForCausalLM

    from mile_megatron.engines.deepspeed.checkpoint import EXPORT_MARKER

    run = runs.get("mile")
    export = run.workdir / "hf"
    marker = json.loads((export / EXPORT_MARKER).read_text())
    assert marker["iteration"] == TRAIN_ITERS and "model.safetensors" in marker["files"]
    model = LlamaForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    assert model.config.vocab_size == VOCAB and not model.config.tie_word_embeddings
    final = run.dump("final_rank0")
    with torch.no_grad():
        logits = model(input_ids=final["tokens"], position_ids=final["position_ids"]).logits
    torch.testing.assert_close(logits, final["logits"], rtol=0, atol=1e-5)


def test_resume_reproduces_the_uninterrupted_run(runs):
    reference, resumed = runs.get("mile"), runs.get("resume")
    assert min(resumed.by_iteration()) == SAVE_AT + 1, resumed.describe()
    assert f"resumed {runs.root / 'resume_ckpt'}" in resumed.output
    assert_same_records(reference, resumed, range(SAVE_AT + 1, TRAIN_ITERS + 1), tolerance=1e-6)
    torch.testing.assert_close(resumed.dump("final_rank0")["logits"], reference.dump("final_rank0")["logits"],
                               rtol=0, atol=1e-5, msg="the resumed run ends with other weights")


def test_non_finite_loss_on_one_rank_stops_every_rank(runs):
    """A NaN loss on rank 1 only: both ranks stop at step 1 with the same message, before any update, instead of
    rank 0 waiting in a collective until the communication timeout."""
    run = runs.get("nonfinite")
    assert run.returncode != 0, run.describe()
    for rank in (0, 1):
        assert f"non-finite loss at iteration 1 on rank {rank}" in run.output, run.describe()
    assert run.records == [], "no step may complete"
