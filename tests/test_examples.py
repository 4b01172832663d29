"""examples/: launcher checks, Slurm rank/address logic, and a real two-"node" CPU training launch.

The scripts run as real bash processes. Missing variables and paths must stop them before torchrun
starts (DRY_RUN=1 prints the command instead of starting it). The Slurm script is driven through
stand-in `srun` / `scontrol` executables (Slurm itself is not installed here). The last test
starts examples/pretrain.sh twice on 127.0.0.1 (NNODES=2, NODE_RANK 0 and 1, one CPU process
each) around the real mile_megatron.engines.megatron entry point and checks that the tiny model trains.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
LOSSES = ("mile", "ce", "focal")
THIN_SCRIPTS = ("single_node.sh", "multi_node.sh", "paper_6.7b_16x8.sh")
SHORT_TIMEOUT_S = 60


def all_scripts() -> list[Path]:
    return sorted(p for p in EXAMPLES.rglob("*") if p.suffix in (".sh", ".sbatch"))


def script_path(loss: str, name: str) -> Path:
    return EXAMPLES / name if loss == "mile" else EXAMPLES / loss / name


def run_script(script: Path, env: dict[str, str], *args: str, cwd: Path | None = None,
               timeout: float = SHORT_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run a script with exactly `env` (plus PATH) and return the completed process."""
    full_env = {"PATH": os.environ["PATH"], "PYTHON": sys.executable, **env}
    try:
        return subprocess.run(["bash", str(script), *args], env=full_env, cwd=cwd or ROOT,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{script} did not finish in {timeout} s\nstdout:\n{error.stdout}\nstderr:\n{error.stderr}")


def describe(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, str]:
    """A complete, valid set of launcher variables (the data files exist but are empty)."""
    prefix = tmp_path / "data" / "corpus_text_document"
    prefix.parent.mkdir()
    for suffix in (".bin", ".idx"):
        prefix.with_name(prefix.name + suffix).write_bytes(b"")
    blend = tmp_path / "blend.txt"
    blend.write_text(f"0.7 {prefix} 0.3 {prefix}\n")
    tokenizer = tmp_path / "tokenizer.model"
    tokenizer.write_bytes(b"not read by a dry run")
    return {
        "DATA_ARGS_PATH": str(blend),
        "TOKENIZER_MODEL": str(tokenizer),
        "CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
        "DRY_RUN": "1",
    }


def multi_node(inputs: dict[str, str], **extra: str) -> dict[str, str]:
    return {**inputs, "NNODES": "4", "NODE_RANK": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29555",
            **extra}


def dry_run_command(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, describe(result)
    lines = [line for line in result.stdout.splitlines() if "torch.distributed.run" in line]
    assert len(lines) == 1, describe(result)
    return shlex.split(lines[0])


def flag_value(command: list[str], flag: str) -> str:
    assert flag in command, (flag, command)
    return command[command.index(flag) + 1]


# ---------------------------------------------------------------------------------------------
def test_every_script_passes_bash_syntax_check_and_is_executable():
    scripts = all_scripts()
    assert len(scripts) == 1 + 1 + 4 * 3 + 5, [str(p) for p in scripts]  # checks.sh; Megatron: 1 + 4 per loss; DeepSpeed: 5
    for script in scripts:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"{script}: {result.stderr}"
        assert os.access(script, os.X_OK), f"{script} is not executable"
        text = script.read_text()
        assert text.startswith("#!/usr/bin/env bash\n"), script
        assert "set -euo pipefail" in text, script


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("name", THIN_SCRIPTS)
def test_thin_scripts_compose_the_expected_command(inputs, loss, name):
    env = inputs if name == "single_node.sh" else multi_node(inputs)
    command = dry_run_command(run_script(script_path(loss, name), env, "--lr", "1e-4"))
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert flag_value(command, "--nproc-per-node") == "8"
    assert flag_value(command, "--loss") == loss
    assert command[command.index("-m", 3) + 1] == "mile_megatron.engines.megatron"
    assert flag_value(command, "--data-args-path") == inputs["DATA_ARGS_PATH"]
    assert flag_value(command, "--tokenizer-model") == inputs["TOKENIZER_MODEL"]
    assert flag_value(command, "--save") == flag_value(command, "--load") == inputs["CHECKPOINT_DIR"]
    assert command[-2:] == ["--lr", "1e-4"], "script arguments come last so they win"
    expected_preset = {"single_node.sh": "468m", "multi_node.sh": "1.2b", "paper_6.7b_16x8.sh": "6.7b"}[name]
    assert flag_value(command, "--preset") == expected_preset
    if name == "single_node.sh":
        assert "--standalone" in command and "--node-rank" not in command
    else:
        assert "--standalone" not in command
        assert flag_value(command, "--master-addr") == "10.0.0.1"
        assert flag_value(command, "--master-port") == "29555"
        assert flag_value(command, "--node-rank") == "2"
    if name == "paper_6.7b_16x8.sh":
        assert flag_value(command, "--nnodes") == "4"  # NNODES given by the caller wins over 16
        assert flag_value(command, "--tensor-model-parallel-size") == "1"
        assert flag_value(command, "--pipeline-model-parallel-size") == "1"
    assert not Path(inputs["CHECKPOINT_DIR"]).exists(), "a dry run creates nothing"


def test_paper_script_defaults_to_16_nodes_of_8_and_user_flags_win(inputs):
    env = {**inputs, "NODE_RANK": "15", "MASTER_ADDR": "head", "MASTER_PORT": "6000",
           "EXTRA_ARGS": "--tensor-model-parallel-size 2 --sequence-parallel"}
    result = run_script(EXAMPLES / "paper_6.7b_16x8.sh", env)
    command = dry_run_command(result)
    assert flag_value(command, "--nnodes") == "16"
    assert flag_value(command, "--nproc-per-node") == "8"
    assert flag_value(command, "--node-rank") == "15"
    tp_values = [command[i + 1] for i, item in enumerate(command) if item == "--tensor-model-parallel-size"]
    assert tp_values == ["1", "2"], "the caller's EXTRA_ARGS come after the script's choice (argparse: last wins)"
    assert "note:" not in result.stderr


def test_launcher_options_map_to_flags(inputs, tmp_path):
    per_split = tmp_path / "splits.json"
    prefix = re.split(r"\s+", Path(inputs["DATA_ARGS_PATH"]).read_text().strip())[1]
    per_split.write_text(json.dumps({"train": [prefix], "valid": f"1 {prefix} 1 {prefix}", "test": None}))
    env = {**inputs, "GPUS_PER_NODE": "3", "CPU": "1", "PRESET": "tiny", "LOSS": "focal",
           "TENSORBOARD_DIR": str(tmp_path / "tb"), "MILE_LOSS_LOG": str(tmp_path / "loss.jsonl"),
           "EXTRA_ARGS": "--mile-gamma 2  --train-iters 3", "PER_SPLIT_DATA_ARGS_PATH": str(per_split)}
    del env["DATA_ARGS_PATH"]
    command = dry_run_command(run_script(EXAMPLES / "pretrain.sh", env, "--exit-signal-handler"))
    assert "--cpu" in command
    assert flag_value(command, "--nproc-per-node") == "3"
    assert flag_value(command, "--per-split-data-args-path") == str(per_split)
    assert "--data-args-path" not in command
    assert flag_value(command, "--tensorboard-dir") == env["TENSORBOARD_DIR"]
    assert flag_value(command, "--mile-loss-log") == env["MILE_LOSS_LOG"]
    assert flag_value(command, "--mile-gamma") == "2"
    assert command[-3:] == ["--train-iters", "3", "--exit-signal-handler"]

    env = {**inputs, "GPUS_PER_NODE": "1", "TOKENIZER_TYPE": "NullTokenizer", "VOCAB_SIZE": "128",
           "MOCK_DATA": "1"}
    del env["TOKENIZER_MODEL"], env["DATA_ARGS_PATH"]
    command = dry_run_command(run_script(EXAMPLES / "pretrain.sh", env))
    assert flag_value(command, "--tokenizer-type") == "NullTokenizer"
    assert flag_value(command, "--vocab-size") == "128"
    assert "--mock-data" in command and "--tokenizer-model" not in command


# Each case: (script, variables to remove, variables to change, text the error must contain).
MISSING_CASES = [
    ("pretrain.sh", ["GPUS_PER_NODE"], {}, "GPUS_PER_NODE is not set"),
    ("pretrain.sh", ["DATA_ARGS_PATH"], {}, "DATA_ARGS_PATH"),
    ("pretrain.sh", ["TOKENIZER_MODEL"], {}, "TOKENIZER_MODEL is not set"),
    ("pretrain.sh", ["CHECKPOINT_DIR"], {}, "CHECKPOINT_DIR is not set"),
    ("pretrain.sh", [], {"NNODES": "2"}, "NODE_RANK is not set"),
    ("pretrain.sh", [], {"NNODES": "2", "NODE_RANK": "1"}, "MASTER_ADDR is not set"),
    ("pretrain.sh", [], {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "h"}, "MASTER_PORT is not set"),
    ("pretrain.sh", [], {"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
     "NODE_RANK=2 must be < NNODES=2"),
    ("pretrain.sh", [], {"GPUS_PER_NODE": "eight"}, "GPUS_PER_NODE='eight' must be an integer"),
    ("pretrain.sh", [], {"LOSS": "mse"}, "LOSS='mse' is not one of"),
    ("pretrain.sh", [], {"PRESET": "70b"}, "PRESET='70b' is not one of"),
    ("pretrain.sh", [], {"DATA_ARGS_PATH": "/nonexistent/blend.txt"}, "DATA_ARGS_PATH='/nonexistent/blend.txt' does not exist"),
    ("pretrain.sh", [], {"TOKENIZER_MODEL": "/nonexistent/tok.model"}, "TOKENIZER_MODEL='/nonexistent/tok.model' does not exist"),
    ("pretrain.sh", [], {"CHECKPOINT_DIR": "/nonexistent/parent/ckpt"}, "parent directory '/nonexistent/parent' does not exist"),
    ("pretrain.sh", [], {"TOKENIZER_TYPE": "NullTokenizer"}, "VOCAB_SIZE is not set"),
    ("pretrain.sh", [], {"MOCK_DATA": "1"}, "set exactly one of DATA_ARGS_PATH"),
    ("pretrain.sh", [], {"PYTHON": "/nonexistent/python"}, "PYTHON='/nonexistent/python'"),
    ("multi_node.sh", ["NODE_RANK"], {}, "NODE_RANK is not set"),
    ("multi_node.sh", ["NNODES"], {}, "NNODES is not set"),
    ("multi_node.sh", ["MASTER_ADDR"], {}, "MASTER_ADDR is not set"),
    ("multi_node.sh", ["MASTER_PORT"], {}, "MASTER_PORT is not set"),
    ("paper_6.7b_16x8.sh", ["NODE_RANK"], {}, "NODE_RANK is not set"),
    ("paper_6.7b_16x8.sh", ["MASTER_PORT"], {}, "MASTER_PORT is not set"),
    ("single_node.sh", ["CHECKPOINT_DIR"], {}, "CHECKPOINT_DIR is not set"),
    ("single_node.sh", ["TOKENIZER_MODEL"], {}, "TOKENIZER_MODEL is not set"),
]


# pretrain.sh has no per-loss wrapper; the thin scripts are checked for every loss.
MISSING_CASES_BY_LOSS = [(loss, *case) for case in MISSING_CASES
                         for loss in (LOSSES if case[0] != "pretrain.sh" else ("mile",))]


@pytest.mark.parametrize("loss,name,remove,change,message", MISSING_CASES_BY_LOSS,
                         ids=[f"{c[0]}-{c[1]}-{'-'.join(c[2]) or '-'.join(c[3])}" for c in MISSING_CASES_BY_LOSS])
def test_missing_or_bad_variable_stops_before_torchrun(inputs, loss, name, remove, change, message):
    env = multi_node(inputs) if name in ("multi_node.sh", "paper_6.7b_16x8.sh") else dict(inputs)
    env["GPUS_PER_NODE"] = "2"
    env.pop("DRY_RUN")  # a check that failed to fire would start torchrun: it must not get that far
    env["PYTHON"] = sys.executable
    for key in remove:
        env.pop(key, None)
    env.update(change)
    result = run_script(script_path(loss, name), env)
    assert result.returncode != 0, describe(result)
    assert message in result.stderr, describe(result)
    assert "torch.distributed.run" not in result.stderr + result.stdout, describe(result)
    assert not Path(inputs["CHECKPOINT_DIR"]).exists()


def test_missing_dataset_files_named_in_blend_and_per_split_files(inputs, tmp_path):
    blend = tmp_path / "bad_blend.txt"
    blend.write_text(f"1.0 {tmp_path}/absent_prefix\n")
    result = run_script(EXAMPLES / "pretrain.sh", {**inputs, "GPUS_PER_NODE": "1", "DATA_ARGS_PATH": str(blend)})
    assert result.returncode != 0 and f"'{tmp_path}/absent_prefix.bin' does not exist" in result.stderr, describe(result)

    env = {**inputs, "GPUS_PER_NODE": "1", "PER_SPLIT_DATA_ARGS_PATH": str(tmp_path / "splits.json")}
    del env["DATA_ARGS_PATH"]
    (tmp_path / "splits.json").write_text(json.dumps({"train": [f"{tmp_path}/absent"], "valid": None}))
    result = run_script(EXAMPLES / "pretrain.sh", env)
    assert result.returncode != 0 and "needs keys train, valid, test" in result.stderr, describe(result)
    (tmp_path / "splits.json").write_text("{not json")
    result = run_script(EXAMPLES / "pretrain.sh", env)
    assert result.returncode != 0 and "is not valid JSON" in result.stderr, describe(result)


# ---------------------------------------------------------------------------------------------
# Slurm: stand-in executables. `scontrol show hostnames` lists the allocation; `srun` runs its
# command once per node with SLURM_NODEID set, like one task per node.
FAKE_SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] || exit 3
printf '%s\\n' gpu-node-07 gpu-node-08 gpu-node-09
"""
FAKE_SRUN = """#!/usr/bin/env bash
nodes=""
while [[ "$1" == --* ]]; do
    case "$1" in --nodes=*) nodes="${1#--nodes=}" ;; esac
    shift
done
for ((id = 0; id < nodes; id++)); do SLURM_NODEID=$id "$@" || exit $?; done
"""


@pytest.mark.parametrize("loss", LOSSES)
def test_slurm_script_starts_one_agent_per_node_with_rank_and_rendezvous_host(inputs, tmp_path, loss):
    bin_dir = tmp_path / "fake_slurm_bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    spool = tmp_path / "spool"  # sbatch runs a copy of the batch file from its spool directory
    spool.mkdir()
    batch = spool / "slurm_script"
    batch.write_text(script_path(loss, "slurm.sbatch").read_text())
    env = {**inputs, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable,
           "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu-node-[07-09]", "SLURM_JOB_NUM_NODES": "3",
           "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_GPUS_ON_NODE": "4"}
    result = subprocess.run(["bash", str(batch)], env=env, cwd=spool, capture_output=True, text=True,
                            timeout=SHORT_TIMEOUT_S)
    assert result.returncode == 0, describe(result)
    commands = [shlex.split(line) for line in result.stdout.splitlines() if "torch.distributed.run" in line]
    assert len(commands) == 3, describe(result)
    for node_rank, command in enumerate(commands):
        assert flag_value(command, "--node-rank") == str(node_rank)
        assert flag_value(command, "--nnodes") == "3"
        assert flag_value(command, "--master-addr") == "gpu-node-07"
        assert flag_value(command, "--master-port") == str(20000 + 123456 % 20000)
        assert flag_value(command, "--nproc-per-node") == "4"
        assert flag_value(command, "--loss") == loss
        assert flag_value(command, "--preset") == "1.2b"  # SCRIPT defaults to multi_node.sh

    env["SCRIPT"] = "paper_6.7b_16x8.sh"
    result = subprocess.run(["bash", str(batch)], env=env, cwd=spool, capture_output=True, text=True,
                            timeout=SHORT_TIMEOUT_S)
    assert result.returncode == 0, describe(result)
    commands = [shlex.split(line) for line in result.stdout.splitlines() if "torch.distributed.run" in line]
    assert [flag_value(c, "--preset") for c in commands] == ["6.7b"] * 3, describe(result)

    env.pop("SLURM_JOB_ID")
    result = subprocess.run(["bash", str(batch)], env=env, cwd=spool, capture_output=True, text=True,
                            timeout=SHORT_TIMEOUT_S)
    assert result.returncode != 0 and "submit this file with sbatch" in result.stderr, describe(result)


# ---------------------------------------------------------------------------------------------
# The real thing: two torchrun agents ("nodes") on 127.0.0.1, one CPU process each (DP=2).
VOCAB_SIZE = 128
TRAIN_ITERS = 12


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_tiny_dataset(prefix: Path) -> None:
    """Documents that follow a fixed rule (next = 3 * current + 1 mod 100), so the loss can fall fast."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    rng = np.random.default_rng(0)
    for _ in range(64):
        token = int(rng.integers(0, 100))
        document = []
        for _ in range(int(rng.integers(40, 120))):
            document.append(token)
            token = (3 * token + 1) % 100
        document.append(VOCAB_SIZE - 1)  # NullTokenizer's end-of-document id
        builder.add_document(np.array(document, dtype=np.int32), [len(document)])
    builder.finalize(f"{prefix}.idx")


def lm_losses(stdout: str) -> list[float]:
    return [float(v) for v in re.findall(r"\blm loss: ([0-9.eE+-]+)", stdout)]


AGENT_DEADLINE_S = 480  # both agents together; a typical run takes 20-90 s on 2 busy cores
PEER_GRACE_S = 60       # after one agent fails, how long the other may take to notice


def launch_two_nodes(env: dict[str, str], workdir: Path) -> tuple[list[int | str], list[str]]:
    """Start examples/pretrain.sh as node 0 and node 1; return their exit codes and outputs.

    Each agent gets its own process group so that cleanup also ends its worker processes.
    """
    agents, logs = [], []
    codes: list[int | str] = ["not started", "not started"]
    try:
        for node_rank in (0, 1):
            log = open(workdir / f"node{node_rank}.log", "w+")
            logs.append(log)
            agents.append(subprocess.Popen(["bash", str(EXAMPLES / "pretrain.sh")],
                                           env={**env, "NODE_RANK": str(node_rank)}, cwd=workdir,
                                           stdout=log, stderr=subprocess.STDOUT, text=True,
                                           start_new_session=True))
        deadline = time.monotonic() + AGENT_DEADLINE_S
        while time.monotonic() < deadline and any(agent.poll() is None for agent in agents):
            if any(agent.returncode not in (None, 0) for agent in agents):
                deadline = min(deadline, time.monotonic() + PEER_GRACE_S)
            try:
                next(a for a in agents if a.poll() is None).wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        codes = [agent.returncode if agent.returncode is not None else "killed after deadline"
                 for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait(timeout=30)
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
            log.close()
    return codes, outputs


@pytest.mark.timeout(600)
def test_two_node_launch_on_localhost_trains(tmp_path):
    prefix = tmp_path / "tiny_text_document"
    build_tiny_dataset(prefix)
    blend = tmp_path / "blend.txt"
    blend.write_text(f"{prefix}\n")
    loss_log = tmp_path / "mile_loss.jsonl"
    checkpoints = tmp_path / "checkpoints"
    common = {
        "PATH": os.environ["PATH"], "PYTHON": sys.executable, "HOME": str(tmp_path),
        "CPU": "1", "NNODES": "2", "GPUS_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1",
        "PRESET": "tiny", "LOSS": "mile", "DATA_ARGS_PATH": str(blend),
        "TOKENIZER_TYPE": "NullTokenizer", "VOCAB_SIZE": str(VOCAB_SIZE), "CHECKPOINT_DIR": str(checkpoints),
        "MILE_LOSS_LOG": str(loss_log),
        "EXTRA_ARGS": f"--train-iters {TRAIN_ITERS} --eval-iters 0 --split 100,0,0 --save-interval 1000",
        "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp_path),
    }
    codes, outputs = launch_two_nodes({**common, "MASTER_PORT": str(free_port())}, tmp_path)
    if codes != [0, 0] and any("address already in use" in out.lower() for out in outputs):
        # The free port was taken between probing and binding: retry once on a new one.
        shutil.rmtree(checkpoints, ignore_errors=True)
        loss_log.unlink(missing_ok=True)
        codes, outputs = launch_two_nodes({**common, "MASTER_PORT": str(free_port())}, tmp_path)
    report = "\n".join(f"===== node {rank} (exit {code}) =====\n{out[-20000:]}"
                       for rank, (code, out) in enumerate(zip(codes, outputs)))
    assert codes == [0, 0], report

    # Megatron prints `lm loss` on the last rank (node 1): plain cross-entropy, falling.
    losses = lm_losses(outputs[1])
    assert len(losses) == TRAIN_ITERS, report
    assert all(v == v and v < 20 for v in losses), report
    assert max(losses[-3:]) < losses[0] - 0.5, f"loss did not fall: {losses}\n{report}"

    # Both data-parallel ranks (one per "node") trained every iteration with the MiLe loss.
    records = [json.loads(line) for line in loss_log.read_text().splitlines()]
    train = [r for r in records if r.get("split", "train") == "train"]
    assert {r["dp_rank"] for r in train} == {0, 1}, records[:4]
    assert {r["iteration"] for r in train} == set(range(1, TRAIN_ITERS + 1)), records[:4]
    assert all(r["alpha"] > 0 and r["entropy"] >= 0 for r in train)

    # The final checkpoint was saved through Megatron.
    tracker = checkpoints / "latest_checkpointed_iteration.txt"
    assert tracker.exists() and tracker.read_text().strip() == str(TRAIN_ITERS), report
