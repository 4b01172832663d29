"""Launch the real mile-pretrain (and mile-pretrain-ds) entry points with torchrun on CPU and read their logs.

Launches go through tests/hooked_engines.py, which calls the engines' main() with the test hooks that the launch's
environment asks for (TEST_NONFINITE_ITERATION, TEST_HOLD_ITERATION, TEST_DUMP_DIR, TEST_DS_DUMP_DIR) and none
otherwise.

Every launch uses `torchrun --standalone` (no fixed port), GLOO_SOCKET_IFNAME=lo, a timeout that
kills the whole process group, and raises with the captured output on failure. Runs are cached
per pytest session (`RunCache`) so several tests share one launch.

Test data: a tiny Megatron indexed dataset (IndexedDatasetBuilder) over a 61-token alphabet whose
documents follow the bigram rule t[i+1] = (5 t[i] + 3) mod 61 with 10% random tokens, so a
2-layer model learns it in a few steps (cross-entropy falls from ln 64 toward ~0.5).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 240
PATTERN_VOCAB = 61

# A tiny fp32 LLaMA model; 64-entry vocabulary padded identically for TP=1 and TP=2.
TINY_FLAGS: tuple[str, ...] = (
    "--cpu", "--preset", "tiny",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "64", "--make-vocab-size-divisible-by", "32",
    "--seq-length", "32", "--max-position-embeddings", "32",
    "--micro-batch-size", "2", "--global-batch-size", "4",
    "--lr", "1e-2", "--min-lr", "1e-3", "--lr-warmup-iters", "1",
    "--split", "95,5,0", "--eval-interval", "1000", "--eval-iters", "1",
    "--log-interval", "1", "--seed", "1234",
)


def write_pattern_dataset(prefix: Path, documents: int = 300, seed: int = 0) -> Path:
    """Write `prefix`.bin/.idx with IndexedDatasetBuilder; returns prefix."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for _ in range(documents):
        length = int(rng.integers(40, 160))
        tokens = [int(rng.integers(0, PATTERN_VOCAB))]
        for _ in range(length - 1):
            noise = rng.random() < 0.1
            tokens.append(int(rng.integers(0, PATTERN_VOCAB)) if noise else (5 * tokens[-1] + 3) % PATTERN_VOCAB)
        builder.add_document(np.array(tokens, dtype=np.int32), [length])
    builder.finalize(f"{prefix}.idx")
    return prefix


def tiny_flags(data_prefix: Path, *extra: str, train_iters: int = 8) -> list[str]:
    return [*TINY_FLAGS, "--data-path", str(data_prefix), "--train-iters", str(train_iters), *extra]


def launch_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("MILE_MEGATRON_CPU", "TEST_NONFINITE_ITERATION", "TEST_HOLD_ITERATION", "TEST_DUMP_DIR",
                "TEST_DS_DUMP_DIR", "TEST_PARAMETERS_FILE", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                "PYTORCH_NVML_BASED_CUDA_CHECK"):  # the last one is exported by DeepSpeed's import
        env.pop(key, None)
    env.update({
        "GLOO_SOCKET_IFNAME": "lo",
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        "PYTHONWARNINGS": "ignore",
    })
    env.update(extra or {})
    return env


HOOKED_ENGINES = Path(__file__).resolve().parent / "hooked_engines.py"


def torchrun_command(nproc: int, flags: list[str], engine: str = "megatron") -> list[str]:
    """torchrun of tests/hooked_engines.py ENGINE (megatron: mile-pretrain, deepspeed: mile-pretrain-ds)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            str(HOOKED_ENGINES), engine, *flags]


def run_torchrun(name: str, nproc: int, flags: list[str], *, engine: str = "megatron",
                 env: dict[str, str] | None = None, timeout: float = LAUNCH_TIMEOUT_S) -> tuple[int, str]:
    """Run `engine` under torchrun to completion: (exit status, combined output); on timeout the whole process
    group is killed and AssertionError carries the output's tail."""
    process = subprocess.Popen(torchrun_command(nproc, flags, engine), cwd=REPO, env=launch_env(env),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        output, _ = process.communicate()
        raise AssertionError(f"run {name!r} timed out after {timeout} s; output tail:\n{output[-12000:]}")
    return process.returncode, output


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class Run:
    name: str
    returncode: int
    output: str
    log_path: Path
    save_dir: Path | None
    records: list[dict] = field(default_factory=list)

    def train(self) -> dict[tuple[int, int, int], dict]:
        """Training records keyed by (iteration, dp_rank, micro-batch)."""
        return {(r["iteration"], r["dp_rank"], r["microbatch"]): r
                for r in self.records if r["split"] == "train"}

    def iteration_ce(self) -> dict[int, float]:
        """Token-weighted mean CE per iteration over every micro-batch and DP rank."""
        sums: dict[int, list[float]] = {}
        for record in self.records:
            if record["split"] == "train":
                total = sums.setdefault(record["iteration"], [0.0, 0.0])
                total[0] += record["ce"] * record["tokens"]
                total[1] += record["tokens"]
        return {iteration: s / n for iteration, (s, n) in sorted(sums.items())}

    def describe(self) -> str:
        return f"run {self.name!r} exited {self.returncode}; output tail:\n{self.output[-12000:]}"


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def launch(workdir: Path, name: str, nproc: int, flags: list[str], *, env: dict[str, str] | None = None,
           save: bool = False, expect_success: bool = True, timeout: float = LAUNCH_TIMEOUT_S) -> Run:
    """Run the entry point to completion; raise AssertionError with its output if it fails."""
    log_path = workdir / f"{name}.jsonl"
    log_path.unlink(missing_ok=True)
    save_dir = workdir / f"{name}_ckpt" if save else None
    all_flags = list(flags) + ["--mile-loss-log", str(log_path)]
    if save_dir is not None and "--save" not in flags:
        all_flags += ["--save", str(save_dir)]
    returncode, output = run_torchrun(name, nproc, all_flags, env=env, timeout=timeout)
    run = Run(name, returncode, output, log_path, save_dir, read_records(log_path))
    if expect_success and run.returncode != 0:
        raise AssertionError(run.describe())
    return run


def launch_and_kill_one_worker(workdir: Path, name: str, nproc: int, flags: list[str], *, hold_iteration: int,
                               checkpoint_iteration: int, timeout: float = LAUNCH_TIMEOUT_S) -> Run:
    """Start a run that parks at `hold_iteration`, wait until the checkpoint of `checkpoint_iteration`
    exists and the loss log shows `hold_iteration`, then SIGKILL one worker (the highest rank)."""
    import psutil

    log_path = workdir / f"{name}.jsonl"
    log_path.unlink(missing_ok=True)
    save_dir = workdir / f"{name}_ckpt"
    all_flags = list(flags) + ["--mile-loss-log", str(log_path), "--save", str(save_dir)]
    env = launch_env({"TEST_HOLD_ITERATION": str(hold_iteration)})
    output_path = workdir / f"{name}.out"
    with open(output_path, "w") as output_file:
        process = subprocess.Popen(torchrun_command(nproc, all_flags), cwd=REPO, env=env, stdout=output_file,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + timeout
    latest = save_dir / "latest_checkpointed_iteration.txt"
    try:
        while True:
            held = any(r["split"] == "train" and r["iteration"] >= hold_iteration for r in read_records(log_path))
            saved = latest.exists() and latest.read_text().strip() == str(checkpoint_iteration)
            if held and saved:
                break
            if process.poll() is not None:
                raise AssertionError(f"run {name!r} ended (rc {process.returncode}) before it could be "
                                     f"killed; output tail:\n{output_path.read_text()[-12000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"run {name!r} never reached iteration {hold_iteration}; output tail:\n"
                                     f"{output_path.read_text()[-12000:]}")
            time.sleep(0.2)  # polling a condition that stays true once reached: no race
        workers = sorted(psutil.Process(process.pid).children(), key=lambda p: p.pid)
        assert len(workers) == nproc, f"expected {nproc} workers, found {workers}"
        workers[-1].send_signal(signal.SIGKILL)
        returncode = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            _kill_group(process)
            process.wait()
    output = output_path.read_text()
    return Run(name, returncode, output, log_path, save_dir, read_records(log_path))


class RunCache:
    """Launches shared by several tests in one pytest session, each launched at most once.

    `prefetch` starts independent launches in the background, two at a time, so that one launch's
    idle phases (agent start-up, rendezvous, teardown) overlap another's work on a 2-core machine.
    """

    def __init__(self, workdir: Path, data_prefix: Path, specs: dict[str, tuple[int, list[str], dict]]):
        self.workdir = workdir
        self.data_prefix = data_prefix
        self.specs = specs
        self._futures: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="megatron-run")

    def _submit(self, name: str) -> Future:
        with self._lock:
            if name not in self._futures:
                nproc, flags, kwargs = self.specs[name]
                self._futures[name] = self._pool.submit(launch, self.workdir, name, nproc, flags, **kwargs)
            return self._futures[name]

    def prefetch(self, names: list[str]) -> None:
        for name in names:
            self._submit(name)

    def get(self, name: str) -> Run:
        return self._submit(name).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
