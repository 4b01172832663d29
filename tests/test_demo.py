"""The README's main command, end to end on CPU: corpus -> tokenizer -> mile-preprocess -> TP=2 MiLe pretraining."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def test_demo_runs_the_whole_job_and_the_loss_falls(tmp_path: Path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "mile_megatron.demo", "--output-dir", str(out), "--train-iters", "30",
         "--documents-per-shard", "120", "--min-ce-drop", "0.5"],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]

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


def test_demo_refuses_a_directory_it_did_not_create(tmp_path: Path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    with pytest.raises(SystemExit, match="was not created by mile-demo"):
        from mile_megatron.demo import main

        main(["--output-dir", str(tmp_path)])
    assert precious.read_text() == "keep me"
