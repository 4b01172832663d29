"""The loss and pretraining-step benchmarks run end to end on CPU (--smoke) and report sound numbers.

One module-scoped launch of each script (in parallel): benchmarks/loss_bench.py --smoke (the CPU methods on two
tiny shapes), the same with the Triton interpreter for our kernel's row (when the kernels are in this checkout),
and benchmarks/pretrain_step_bench.py --smoke (mile-pretrain --cpu, tiny preset: our MiLe loss and Megatron's
own cross-entropy). Their reported losses are checked against the float64 reference.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import loss_bench  # noqa: E402
import linear_loss_bench  # noqa: E402
import pretrain_step_bench  # noqa: E402

from mile_megatron.loss.reference import RefBatch, mile_loss_reference  # noqa: E402

TIMEOUT_S = 240
TRITON_SHAPE = "4x130"


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("MILE_MEGATRON_LOSS_BACKEND", "MILE_MEGATRON_CPU", "RANK", "WORLD_SIZE", "MASTER_PORT",
                "TRITON_INTERPRET"):
        env.pop(key, None)
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", GLOO_SOCKET_IFNAME="lo")
    env.update(extra or {})
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: (completed process-like dict, parsed JSON)} for the smoke launches, started together."""
    work = tmp_path_factory.mktemp("benchmarks")
    specs = {
        "loss": ([str(BENCHMARKS / "loss_bench.py"), "--smoke", "--json", str(work / "loss.json")], {}),
        "step": ([str(BENCHMARKS / "pretrain_step_bench.py"), "--smoke", "--json", str(work / "step.json")], {}),
        "linear": ([str(BENCHMARKS / "linear_loss_bench.py"), "--smoke", "--json", str(work / "linear.json")], {}),
    }
    specs["triton"] = ([str(BENCHMARKS / "loss_bench.py"), "--smoke", "--methods", "ours-triton-mile",
                        "--shapes", TRITON_SHAPE, "--warmup", "0", "--repeats", "1",
                        "--json", str(work / "triton.json")], {"TRITON_INTERPRET": "1"})
    processes = {name: subprocess.Popen([sys.executable, *command], cwd=REPO, env=_env(extra), text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for name, (command, extra) in specs.items()}
    results = {}
    for name, process in processes.items():
        try:
            output, _ = process.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            raise AssertionError(f"{name} smoke run timed out after {TIMEOUT_S} s:\n{output[-6000:]}")
        json_path = work / f"{name}.json"
        assert process.returncode == 0, f"{name} smoke run exited {process.returncode}:\n{output[-6000:]}"
        results[name] = (output, json.loads(json_path.read_text()))
    return results


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def reference_losses(shape: tuple[int, int]) -> dict[str, float]:
    """float64 reference MiLe (alpha global) and CE losses on the inputs loss_bench draws for `shape`."""
    logits, target = loss_bench.make_inputs(*shape, tp=1, rank=0, dtype=torch.bfloat16, device=torch.device("cpu"),
                                            seed=1234)
    batch = RefBatch(logits, target)
    return {kind: mile_loss_reference(batch, kind=kind, alpha="global" if kind == "mile" else "none")[0].loss
            for kind in ("mile", "ce")}


def test_loss_bench_smoke_prints_the_table_and_writes_the_json_schema(runs):
    output, result = runs["loss"]
    assert result["benchmark"] == "loss_bench" and result["complete"] is True
    assert "loss_bench.py --smoke" in result["command"]
    environment = result["environment"]
    for key in ("device", "torch", "triton", "megatron_core", "liger_kernel", "python", "world_size"):
        assert key in environment, key
    assert environment["device"].startswith("cpu") and environment["torch"] == torch.__version__
    assert finite(result["copy_bandwidth_gbs"]) and result["copy_bandwidth_gbs"] > 0
    shapes = [tuple(int(x) for x in s.split("x")) for s in loss_bench.SMOKE_SHAPES]
    rows = {(tuple(row["shape"]), row["method"]): row for row in result["rows"]}
    assert set(rows) == {(shape, method) for shape in shapes for method in loss_bench.SMOKE_METHODS}
    header = next(line for line in output.splitlines() if line.strip().startswith("shape"))
    for column in ("method", "fwd+bwd ms", "BW frac", "extra MiB", "loss diff", "grad rel"):
        assert column in header
    for (shape, method), row in rows.items():
        assert any(line.split()[:2] == [f"{shape[0]}x{shape[1]}", method] for line in output.splitlines()), method
        if method.startswith("ours-triton"):  # Triton on CPU only under the interpreter (the run below)
            assert row["status"] == "skipped" and "TRITON_INTERPRET" in row["reason"]
            continue
        assert row["status"] == "ok", row
        assert row["ideal_bytes"] == shape[0] * shape[1] * 3 * 2  # bf16: 6 bytes per element
        for key in ("time_ms", "time_ms_min", "time_ms_max", "floor_ms", "bandwidth_fraction", "loss"):
            assert finite(row[key]) and row[key] > 0, (method, key, row[key])
        assert row["time_ms_min"] <= row["time_ms"] <= row["time_ms_max"]
        assert row["extra_peak_mib"] is None  # CUDA only
        # Correctness column: every method against the project's torch path on the same inputs.
        assert row["loss_abs_diff"] < 1e-4, row
        assert row["grad_rel_diff"] < 2e-2, row  # gradients are rounded once to bf16


def test_loss_bench_losses_match_the_float64_reference(runs):
    _, result = runs["loss"]
    for text in loss_bench.SMOKE_SHAPES:
        shape = tuple(int(x) for x in text.split("x"))
        expected = reference_losses(shape)
        for row in result["rows"]:
            if tuple(row["shape"]) == shape and row["status"] == "ok":
                # The paper's clamp moves H by at most V x 1.84e-7 nats; everything else is fp32 arithmetic.
                assert row["loss"] == pytest.approx(expected[row["loss_kind"]], rel=1e-5, abs=1e-5), row["method"]


def test_triton_row_runs_under_the_interpreter(runs):
    _, result = runs["triton"]
    (row,) = result["rows"]
    assert row["method"] == "ours-triton-mile" and row["status"] == "ok", row
    assert row["backend"] == "triton"
    assert finite(row["time_ms"]) and row["loss_abs_diff"] < 1e-5 and row["grad_rel_diff"] < 2e-2
    shape = tuple(int(x) for x in TRITON_SHAPE.split("x"))
    assert row["loss"] == pytest.approx(reference_losses(shape)["mile"], rel=1e-5)


def test_paper_formula_matches_the_reference_when_the_clamp_is_inactive():
    """The paper's eager baseline equals the exact MiLe loss (and gradient) when every p > 1e-8."""
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(12, 50, generator=generator, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 50, (12,), generator=generator)
    loss_bench.paper_mile_loss(logits, target, gamma=1.5, sigma=0.5).backward()
    (expected,) = mile_loss_reference(RefBatch(logits, target), kind="mile", gamma=1.5, sigma=0.5, alpha="global")
    assert logits.grad is not None
    assert float(loss_bench.paper_mile_loss(logits.detach(), target, 1.5, 0.5)) == pytest.approx(expected.loss,
                                                                                                  rel=1e-12)
    torch.testing.assert_close(logits.grad, expected.grad, rtol=1e-10, atol=1e-14)


def test_pretrain_step_bench_smoke_reports_time_memory_and_the_same_first_loss(runs):
    output, result = runs["step"]
    assert result["benchmark"] == "pretrain_step_bench" and result["complete"] is True
    assert "--cpu" in result["common_flags"] and "tiny" in result["common_flags"]
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) == set(pretrain_step_bench.SMOKE_VARIANTS)
    for name, row in rows.items():
        assert row["status"] == "ok", row
        assert any(line.startswith(name + " ") for line in output.splitlines()), name
        assert row["timed_iterations"] == row["iterations"] - row["skipped_iterations"] >= 1
        assert finite(row["step_ms"]) and row["step_ms"] > 0
        assert row["tokens_per_s"] == pytest.approx(row["tokens_per_step"] / (row["step_ms"] / 1e3))
        assert finite(row["max_rss_mib"]) and row["max_rss_mib"] > 100
        assert row["peak_allocated_gib"] is None  # CUDA only
        # A near-uniform initial model: cross-entropy close to ln(V).
        assert abs(row["lm_loss_first"] - math.log(32000)) < 0.1
    # Same initialisation and data: the first step's CE from our loss and from Megatron's own CE agree.
    assert rows["mile"]["lm_loss_first"] == pytest.approx(rows["megatron-ce"]["lm_loss_first"], rel=1e-5)
    ratio = result["comparisons"]["mile_vs_megatron-ce"]
    assert ratio["step_time_ratio"] == pytest.approx(rows["mile"]["step_ms"] / rows["megatron-ce"]["step_ms"])
    assert ratio["peak_memory_measure"] == "max_rss_mib" and finite(ratio["peak_memory_ratio"])


def test_pretrain_step_bench_parses_megatron_logs_and_flags_failures():
    args = pretrain_step_bench.parse_args(["--smoke", "--iterations", "4", "--skip", "2", "--json", "/tmp/x.json"])
    variant = pretrain_step_bench.VARIANTS[0]
    lines = [f" [2026-01-01 00:00:0{i}.0] iteration        {i}/       4 | consumed samples: {2 * i:12d} | "
             f"elapsed time per iteration (ms): {100.0 * i:.1f} | learning rate: 1.0E-03 | global batch size:     2 |"
             f" lm loss: {10.0 - i:.6E} | loss scale: 1.0 |" for i in range(1, 5)]
    result_line = f"{pretrain_step_bench.RESULT_TAG} " + json.dumps({"variant": "mile", "max_rss_mib": 900.0})
    good = "\n".join([*lines, result_line])
    row = pretrain_step_bench.parse_run(variant, good, 0, args)
    assert row["status"] == "ok" and row["timed_iterations"] == 2
    assert row["step_ms"] == pytest.approx(350.0) and (row["step_ms_min"], row["step_ms_max"]) == (300.0, 400.0)
    assert row["tokens_per_s"] == pytest.approx(128 / 0.35)
    assert (row["lm_loss_first"], row["lm_loss_last"]) == (9.0, 6.0)
    failed = pretrain_step_bench.parse_run(variant, "\n".join(lines[:1] + ["Traceback: boom"]), 1, args)
    assert failed["status"] == "error" and "exit status 1" in failed["reason"] and "boom" in failed["reason"]
    timed_out = pretrain_step_bench.parse_run(variant, good, None, args)
    assert timed_out["status"] == "error" and "timed out" in timed_out["reason"]


def test_linear_loss_bench_smoke_compares_fused_and_unfused(runs):
    """The fused output layer + loss and the unfused one on the same inputs: one row each per shape, the fused row
    with its time ratio and the loss and gradient differences (tiny on CPU fp32)."""
    output, result = runs["linear"]
    assert result["benchmark"] == "linear_loss_bench" and result["complete"] is True
    assert "targets on one H100" in output
    shapes = {row["shape"] for row in result["rows"]}
    assert shapes == set(linear_loss_bench.SMOKE_SHAPES)
    for row in result["rows"]:
        assert row["method"] in ("fused", "unfused") and finite(row["time_ms"]) and finite(row["loss"])
        if row["method"] == "fused":
            assert finite(row["time_ratio"]) and row["peak_ratio"] is None  # peak memory: CUDA only
            assert row["loss_abs_diff"] < 1e-5 and row["grad_hidden_rel_diff"] < 1e-5
            assert row["grad_weight_rel_diff"] < 1e-5
