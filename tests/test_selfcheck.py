"""mile-selfcheck: the installed console script's TP check against the float64 reference (CPU here; CUDA with
NCCL and the Triton kernels when a GPU is present)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mile_megatron.apps import selfcheck

CUDA = torch.cuda.is_available()


def _run(*args: str) -> subprocess.CompletedProcess:
    script = shutil.which("mile-selfcheck", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "mile_megatron.apps.selfcheck"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=300)


def test_cpu_check_passes_and_reports_every_case():
    result = _run("--device", "cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "TP=2 (gloo, CPU, torch loss path)" in result.stdout
    for name, *_ in selfcheck.CASES:
        assert re.search(rf"^{re.escape(name)}\s", result.stdout, re.M), name
    assert "OK: every result within tolerance" in result.stdout


@pytest.mark.skipif(CUDA, reason="a GPU is visible")
def test_cuda_request_without_a_gpu_is_refused_clearly():
    result = _run("--device", "cuda")
    assert result.returncode == 2 and "no CUDA GPU is visible (use --device cpu)" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.skipif(not CUDA, reason="needs CUDA (Triton kernels, NCCL)")
def test_cuda_check_runs_the_triton_kernels_over_nccl():
    result = _run("--device", "cuda")
    assert result.returncode == 0, result.stdout + result.stderr
    tp = min(2, torch.cuda.device_count())
    assert f"TP={tp} (nccl, " in result.stdout and "triton loss path" in result.stdout
