"""patches/: the Megatron-LM pretrain_gpt.py patch and patches/apply.sh.

CI has no network, and the upstream file is not vendored, so the real patch is checked for
structure and for the mile_megatron API it calls; apply.sh's whole flow (hash checks, apply,
idempotence, revert, refusal, no half-written files, `patch` and `git apply` back ends) runs on
a synthetic file with its own manifest. With MILE_MEGATRON_LM_DIR pointing at a Megatron-LM
checkout of tag core_v0.19.0, the real patch is also applied to the real file, compiled, and the
patched script trains on CPU (one torchrun launch).
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import json
import os
import py_compile
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATCHES = ROOT / "patches"
APPLY = PATCHES / "apply.sh"
TIMEOUT_S = 60
# Tools apply.sh uses besides the patch back end.
BASE_TOOLS = ("bash", "dirname", "sha256sum", "shasum", "cut", "mktemp", "cp", "stat", "chmod", "mv", "rm", "cat")


def read_manifest(path: Path = PATCHES / "manifest.env") -> dict[str, str]:
    entries = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, value = line.split("=", 1)
            entries[key] = value
    return entries


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_apply(*args: str, script: Path = APPLY, path: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": path or os.environ["PATH"]}
    try:
        return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=env,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"apply.sh did not finish in {TIMEOUT_S} s\nstdout:\n{error.stdout}\nstderr:\n{error.stderr}")


def describe(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mode) for p in sorted(directory.iterdir())}


# ---------------------------------------------------------------------------------------------
# The real patch.
def test_manifest_names_the_upstream_tag_commit_and_hashes():
    manifest = read_manifest()
    assert manifest["MEGATRON_TAG"] == "core_v0.19.0"
    assert re.fullmatch(r"[0-9a-f]{40}", manifest["MEGATRON_COMMIT"])
    assert manifest["TARGET_FILE"] == "pretrain_gpt.py"
    for key in ("ORIGINAL_SHA256", "PATCHED_SHA256"):
        assert re.fullmatch(r"[0-9a-f]{64}", manifest[key]), key
    assert manifest["ORIGINAL_SHA256"] != manifest["PATCHED_SHA256"]
    assert (PATCHES / manifest["PATCH_FILE"]).is_file()
    assert os.access(APPLY, os.X_OK)
    assert subprocess.run(["bash", "-n", str(APPLY)], timeout=TIMEOUT_S).returncode == 0
    readme = (PATCHES / "README.md").read_text()
    for value in manifest.values():
        assert value in readme, f"patches/README.md should state {value}"


def parse_hunks(text: str) -> list[tuple[int, int, int, int, list[str]]]:
    """Hunks of a one-file unified diff: (old_start, old_len, new_start, new_len, lines)."""
    hunks, current = [], None
    for line in text.splitlines():
        header = re.match(r"@@ -(\d+),(\d+) \+(\d+),(\d+) @@", line)
        if header:
            current = (*map(int, header.groups()), [])
            hunks.append(current)
        elif current is not None and line[:1] in (" ", "+", "-"):
            current[4].append(line)
    return hunks


def test_patch_is_one_small_well_formed_diff_of_pretrain_gpt():
    text = (PATCHES / read_manifest()["PATCH_FILE"]).read_text()
    assert re.findall(r"^--- (\S+)", text, re.M) == ["a/pretrain_gpt.py"]
    assert re.findall(r"^\+\+\+ (\S+)", text, re.M) == ["b/pretrain_gpt.py"]
    hunks = parse_hunks(text)
    assert hunks
    changed = 0
    for old_start, old_len, new_start, new_len, lines in hunks:
        assert sum(1 for line in lines if line[0] in " -") == old_len
        assert sum(1 for line in lines if line[0] in " +") == new_len
        changed += sum(1 for line in lines if line[0] in "+-")
    assert changed <= 40, f"the patch should stay small ({changed} changed lines)"
    added = "\n".join(line[1:] for *_, lines in hunks for line in lines if line[0] == "+")
    assert "from mile_megatron.engines.megatron import (" in added
    assert "extra_args_provider=" in added and "add_modelopt_args" in added, "composes ModelOpt's provider"
    # the loss without result checks (upstream's loss_func runs them once on its result)
    assert "mile_loss_func(labels, loss_mask, output_tensor, model=model)" in added
    assert "logits_loss_func" not in added
    # the model returns the output layer's logits (no [b, s, V] / fp32 copy); one gradient division per step
    assert "**(model_forward_kwargs(args) if mile else {})" in added
    assert "install_step_normalization(model_cfg)" in added


def test_mile_megatron_provides_what_the_patch_calls():
    import argparse

    from mile_megatron.engines import megatron as pretrain_gpt

    for function in (pretrain_gpt.logits_loss_func, pretrain_gpt.mile_loss_func):
        assert list(inspect.signature(function).parameters)[:4] == ["labels", "loss_mask", "output_tensor", "model"]
    kwargs = pretrain_gpt.model_forward_kwargs(argparse.Namespace(fp16=False, bf16=True))
    assert kwargs == {"output_processor": pretrain_gpt.vocab_parallel_logits, "fp32_output": False}
    assert pretrain_gpt.model_forward_kwargs(argparse.Namespace(fp16=False, bf16=False)) == {
        "output_processor": pretrain_gpt.vocab_parallel_logits}
    config = argparse.Namespace(finalize_model_grads_func=None)
    hook = pretrain_gpt.install_step_normalization(config)
    assert config.finalize_model_grads_func is hook and pretrain_gpt.install_step_normalization(config) is hook
    parser = argparse.ArgumentParser()
    assert pretrain_gpt.add_megatron_loss_arguments(parser) is parser, "extra_args_provider must return the parser"
    args = parser.parse_args(["--loss", "focal", "--mile-gamma", "2", "--mile-alpha", "official"])
    assert (args.loss, args.mile_gamma, args.mile_sigma, args.mile_alpha) == ("focal", 2.0, 1.0, "official")
    assert parser.parse_args([]).loss == "mile"


# ---------------------------------------------------------------------------------------------
# apply.sh against checkouts it was not made for.
def test_apply_refuses_a_different_pretrain_gpt_and_leaves_it_untouched(tmp_path):
    checkout = tmp_path / "Megatron-LM"
    checkout.mkdir()
    target = checkout / "pretrain_gpt.py"
    target.write_text("# Megatron-LM pretrain_gpt.py from some other release\nprint('hello')\n")
    target.chmod(0o640)
    before = snapshot(checkout)
    manifest = read_manifest()
    for args in ((str(checkout),), ("--revert", str(checkout)), ("--check", str(checkout))):
        result = run_apply(*args)
        assert result.returncode == 1, describe(result)
        for expected in ("refusing", "core_v0.19.0", manifest["MEGATRON_COMMIT"], manifest["ORIGINAL_SHA256"],
                         sha256(target)):
            assert expected in result.stderr, describe(result)
        assert snapshot(checkout) == before, "the checkout must be left exactly as it was"


def test_apply_reports_missing_paths_and_usage(tmp_path):
    result = run_apply(str(tmp_path / "absent"))
    assert result.returncode == 1 and f"'{tmp_path / 'absent'}' is not a directory" in result.stderr, describe(result)
    result = run_apply(str(tmp_path))
    assert result.returncode == 1 and "pretrain_gpt.py' does not exist" in result.stderr, describe(result)
    result = run_apply()
    assert result.returncode == 2 and "usage:" in result.stderr, describe(result)
    result = run_apply("--frobnicate", str(tmp_path))
    assert result.returncode == 2 and "unknown option" in result.stderr, describe(result)


# ---------------------------------------------------------------------------------------------
# apply.sh's full flow on a synthetic "upstream" file with its own manifest and patch.
SYNTHETIC_ORIGINAL = "".join(f"line {i}: upstream code\n" for i in range(40))
SYNTHETIC_PATCHED = SYNTHETIC_ORIGINAL.replace("line 5: upstream code\n", "line 5: upstream code\nadded by mile\n") \
                                      .replace("line 30: upstream code\n", "line 30: changed by mile\n")


def tool_path(tmp_path: Path, backend: str) -> str:
    """A PATH holding apply.sh's tools and exactly one patch back end ('patch' or 'git')."""
    bin_dir = tmp_path / f"bin-{backend}"
    bin_dir.mkdir()
    for tool in (*BASE_TOOLS, backend):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    if not (bin_dir / backend).exists():
        pytest.skip(f"'{backend}' is not installed")
    return str(bin_dir)


def synthetic_patches_dir(tmp_path: Path, patched_sha256: str | None = None) -> Path:
    directory = tmp_path / "patches"
    directory.mkdir()
    shutil.copy2(APPLY, directory / "apply.sh")
    diff = difflib.unified_diff(SYNTHETIC_ORIGINAL.splitlines(keepends=True),
                                SYNTHETIC_PATCHED.splitlines(keepends=True),
                                fromfile="a/pretrain_gpt.py", tofile="b/pretrain_gpt.py")
    (directory / "synthetic.patch").write_text("A description line before the diff.\n\n" + "".join(diff))
    original_sha = hashlib.sha256(SYNTHETIC_ORIGINAL.encode()).hexdigest()
    patched_sha = patched_sha256 or hashlib.sha256(SYNTHETIC_PATCHED.encode()).hexdigest()
    (directory / "manifest.env").write_text(
        "# synthetic\nMEGATRON_TAG=synthetic_tag\nMEGATRON_COMMIT=" + "0" * 40 + "\nTARGET_FILE=pretrain_gpt.py\n"
        f"PATCH_FILE=synthetic.patch\nORIGINAL_SHA256={original_sha}\nPATCHED_SHA256={patched_sha}\n")
    return directory


@pytest.mark.parametrize("backend", ["patch", "git"])
def test_apply_check_idempotence_and_revert_on_the_expected_file(tmp_path, backend):
    path = tool_path(tmp_path, backend)
    script = synthetic_patches_dir(tmp_path) / "apply.sh"
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    target = checkout / "pretrain_gpt.py"
    target.write_text(SYNTHETIC_ORIGINAL)
    target.chmod(0o754)

    result = run_apply("--check", str(checkout), script=script, path=path)
    assert result.returncode == 0 and "unpatched synthetic_tag" in result.stdout, describe(result)
    assert target.read_text() == SYNTHETIC_ORIGINAL

    result = run_apply(str(checkout), script=script, path=path)
    assert result.returncode == 0 and "patched" in result.stdout, describe(result)
    assert target.read_text() == SYNTHETIC_PATCHED
    assert stat.S_IMODE(target.stat().st_mode) == 0o754, "permissions are kept"
    assert sorted(p.name for p in checkout.iterdir()) == ["pretrain_gpt.py"], "no backup or temporary files"

    result = run_apply(str(checkout), script=script, path=path)
    assert result.returncode == 0 and "already has the MiLe patch" in result.stdout, describe(result)
    assert target.read_text() == SYNTHETIC_PATCHED

    result = run_apply("--revert", str(checkout), script=script, path=path)
    assert result.returncode == 0 and "restored" in result.stdout, describe(result)
    assert target.read_text() == SYNTHETIC_ORIGINAL
    assert sorted(p.name for p in checkout.iterdir()) == ["pretrain_gpt.py"]


def test_apply_keeps_the_file_when_the_result_hash_is_wrong(tmp_path):
    script = synthetic_patches_dir(tmp_path, patched_sha256="f" * 64) / "apply.sh"
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "pretrain_gpt.py").write_text(SYNTHETIC_ORIGINAL)
    before = snapshot(checkout)
    result = run_apply(str(checkout), script=script)
    assert result.returncode == 1, describe(result)
    assert "expected " + "f" * 64 in result.stderr and "the file was not changed" in result.stderr, describe(result)
    assert snapshot(checkout) == before


def test_apply_keeps_the_file_when_the_patch_does_not_apply(tmp_path):
    directory = synthetic_patches_dir(tmp_path)
    # A manifest that accepts this file, with a patch whose context does not match it.
    other = "completely different\ncontents\n"
    manifest = (directory / "manifest.env").read_text()
    manifest = re.sub(r"ORIGINAL_SHA256=\w+", "ORIGINAL_SHA256=" + hashlib.sha256(other.encode()).hexdigest(), manifest)
    (directory / "manifest.env").write_text(manifest)
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "pretrain_gpt.py").write_text(other)
    before = snapshot(checkout)
    result = run_apply(str(checkout), script=directory / "apply.sh")
    assert result.returncode == 1 and "did not apply" in result.stderr, describe(result)
    assert snapshot(checkout) == before


# ---------------------------------------------------------------------------------------------
# Optional: the real upstream file (needs a core_v0.19.0 checkout; CI has none and no network).
MEGATRON_LM_DIR = os.environ.get("MILE_MEGATRON_LM_DIR")


@pytest.mark.skipif(not MEGATRON_LM_DIR, reason="set MILE_MEGATRON_LM_DIR to a Megatron-LM core_v0.19.0 checkout")
@pytest.mark.timeout(600)
def test_real_patch_applies_compiles_and_trains_on_cpu(tmp_path):
    source = Path(MEGATRON_LM_DIR)
    manifest = read_manifest()
    assert sha256(source / "pretrain_gpt.py") == manifest["ORIGINAL_SHA256"], \
        "MILE_MEGATRON_LM_DIR must hold the unpatched core_v0.19.0 pretrain_gpt.py"
    checkout = tmp_path / "Megatron-LM"
    checkout.mkdir()
    for name in ("pretrain_gpt.py", "gpt_builders.py", "model_provider.py"):
        shutil.copy2(source / name, checkout / name)
    result = run_apply(str(checkout))
    assert result.returncode == 0, describe(result)
    assert sha256(checkout / "pretrain_gpt.py") == manifest["PATCHED_SHA256"]
    py_compile.compile(str(checkout / "pretrain_gpt.py"), doraise=True)

    # Train the patched script (against the installed megatron-core) on CPU: TP=2, MiLe, 8 steps.
    sys.path.insert(0, str(ROOT / "tests"))
    from test_examples import build_tiny_dataset, lm_losses

    build_tiny_dataset(tmp_path / "tiny")
    (checkout / "run_cpu.py").write_text(
        "import runpy, sys\n"
        "from mile_megatron.utils import cpu_mode\n"
        "from mile_megatron.recipes import LLAMA_ARCHITECTURE_FLAGS, preset_flags\n"
        "cpu_mode.activate()\n"
        "sys.argv = ['pretrain_gpt.py', *cpu_mode.CPU_MEGATRON_FLAGS, *LLAMA_ARCHITECTURE_FLAGS,\n"
        "            *preset_flags('tiny'), *sys.argv[1:]]\n"
        "runpy.run_path('pretrain_gpt.py', run_name='__main__')\n")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "run_cpu.py", "--data-path", str(tmp_path / "tiny"), "--split", "100,0,0",
               "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--train-iters", "8",
               "--eval-iters", "0", "--tensor-model-parallel-size", "2", "--calculate-per-token-loss",
               "--loss", "mile", "--mile-loss-log", str(tmp_path / "loss.jsonl")]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "1",
           "PYTHONPATH": str(checkout)}
    try:
        run = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True, timeout=480)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"patched pretrain_gpt.py did not finish\nstdout:\n{error.stdout}\nstderr:\n{error.stderr}")
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-20000:]
    losses = lm_losses(output)
    assert len(losses) == 8 and "mile loss:" in output, output[-20000:]
    assert losses[-1] < losses[0] - 0.5, losses
    # Megatron prints the exact step objective: sum of numerators / sum of denominators of step 1.
    records = [json.loads(line) for line in (tmp_path / "loss.jsonl").read_text().splitlines()]
    first = [r for r in records if r["split"] == "train" and r["iteration"] == 1]
    printed = float(re.search(r"iteration\s+1/.*?mile loss: ([-+.\dE]+)", output).group(1))
    assert printed == pytest.approx(sum(r["loss_sum"] for r in first) / sum(r["denominator"] for r in first),
                                    rel=2e-6)
