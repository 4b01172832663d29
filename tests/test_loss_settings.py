"""Environment switches (mile_megatron.settings, one parser for all) and input-check settings that differ
between tensor-parallel ranks (every rank must fail, none may hang), the latter with real gloo processes spawned
with different environments.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import loss_cases as lc
from distributed import DistributedPool
from mile_megatron.loss import settings

ROOT = Path(__file__).resolve().parents[1]
SWITCHES = ("MILE_MEGATRON_INPUT_CHECKS", "MILE_MEGATRON_INPLACE_BACKWARD", "MILE_MEGATRON_CPU")

pytestmark = pytest.mark.timeout(300)


# ----------------------------------------------------------------------------------------------------------------
# The parser
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), (" Yes ", True), ("ON", True),
                                            ("0", False), ("False", False), ("no", False), (" off\n", False),
                                            ("", None), ("   ", None)])
def test_env_flag_values(monkeypatch, value, expected):
    monkeypatch.setenv("MILE_TEST_FLAG", value)
    for default in (True, False):
        assert settings.env_flag("MILE_TEST_FLAG", default) is (default if expected is None else expected)
    monkeypatch.delenv("MILE_TEST_FLAG")
    assert settings.env_flag("MILE_TEST_FLAG", True) is True and settings.env_flag("MILE_TEST_FLAG", False) is False


@pytest.mark.parametrize("value", ["2", "enabled", "y", "tru", "-1", "none"])
def test_env_flag_rejects_anything_else_naming_variable_value_and_choices(monkeypatch, value):
    monkeypatch.setenv("MILE_TEST_FLAG", value)
    with pytest.raises(ValueError) as info:
        settings.env_flag("MILE_TEST_FLAG", True)
    text = str(info.value)
    assert "MILE_TEST_FLAG" in text and repr(value) in text
    assert all(word in text for word in settings.TRUE_VALUES + settings.FALSE_VALUES), text


def test_env_choice(monkeypatch):
    choices = ("auto", "torch", "triton")
    monkeypatch.delenv("MILE_TEST_CHOICE", raising=False)
    assert settings.env_choice("MILE_TEST_CHOICE", choices, "auto") == "auto"
    for value, expected in (("", "auto"), (" Triton ", "triton"), ("TORCH", "torch")):
        monkeypatch.setenv("MILE_TEST_CHOICE", value)
        assert settings.env_choice("MILE_TEST_CHOICE", choices, "auto") == expected
    monkeypatch.setenv("MILE_TEST_CHOICE", "fast")
    with pytest.raises(ValueError) as info:
        settings.env_choice("MILE_TEST_CHOICE", choices, "auto")
    assert all(word in str(info.value) for word in ("MILE_TEST_CHOICE", "'fast'", *choices)), str(info.value)


def test_settings_module_imports_nothing_from_the_project():
    """settings.py imports nothing but its own package's kernel flag (lazily: loss/triton/settings.py)."""
    tree = ast.parse(Path(settings.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert (node.level == 0 and not (node.module or "").startswith("mile_megatron")) or (
                node.level == 1 and node.module == "triton.kernels"), ast.dump(node)
        elif isinstance(node, ast.Import):
            assert not any(alias.name.startswith("mile_megatron") for alias in node.names), ast.dump(node)


_EVERY_SWITCH = r"""
import importlib, os, sys
def attempt(what, call):
    try:
        print(what, "->", repr(call()))
    except ValueError as error:
        print(what, "-> ValueError:", error)
def fresh():
    for name in [n for n in sys.modules if n.startswith("mile_megatron.loss")]:
        del sys.modules[name]
    return importlib.import_module("mile_megatron.loss.settings")
os.environ["MILE_MEGATRON_INPLACE_BACKWARD"] = "maybe"
attempt("MILE_MEGATRON_INPLACE_BACKWARD", lambda: fresh().inplace_backward())
os.environ["MILE_MEGATRON_INPLACE_BACKWARD"] = " On "
os.environ["MILE_MEGATRON_LOSS_BACKEND"] = "fast"
attempt("MILE_MEGATRON_LOSS_BACKEND", lambda: fresh().loss_backend_setting())
os.environ["MILE_MEGATRON_LOSS_BACKEND"] = "torch"
os.environ["MILE_MEGATRON_INPUT_CHECKS"] = "maybe"
attempt("MILE_MEGATRON_INPUT_CHECKS", lambda: fresh().input_checks())
os.environ["MILE_MEGATRON_INPUT_CHECKS"] = "No"
attempt("accepted", lambda: (fresh().input_checks(), sys.modules["mile_megatron.loss.settings"].inplace_backward(),
                             sys.modules["mile_megatron.loss.settings"].loss_backend_setting()))
"""


def test_every_switch_uses_the_parser(monkeypatch):
    """An unknown value of any switch raises ValueError naming it (fresh imports for the import-time switches)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MILE_MEGATRON_")}
    proc = subprocess.run([sys.executable, "-c", _EVERY_SWITCH], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = dict(line.split(" -> ", 1) for line in proc.stdout.splitlines())
    for name in ("MILE_MEGATRON_INPLACE_BACKWARD", "MILE_MEGATRON_LOSS_BACKEND", "MILE_MEGATRON_INPUT_CHECKS"):
        assert lines[name].startswith("ValueError:") and name in lines[name], (name, proc.stdout)
    assert lines["accepted"] == "(False, True, 'torch')", proc.stdout
    # MILE_MEGATRON_CPU is read at call time, by mile-pretrain (cpu_mode) and mile-pretrain-ds.
    from mile_megatron.utils import cpu_mode
    from mile_megatron.engines.deepspeed import cli as pretrain_ds

    monkeypatch.setenv("MILE_MEGATRON_CPU", "maybe")
    for call in (lambda: cpu_mode.cpu_mode_requested([]), lambda: pretrain_ds.parse_args([])):
        with pytest.raises(ValueError, match="MILE_MEGATRON_CPU='maybe'"):
            call()
    monkeypatch.setenv("MILE_MEGATRON_CPU", " YES")
    assert cpu_mode.cpu_mode_requested([]) and pretrain_ds.parse_args([]).cpu
    monkeypatch.setenv("MILE_MEGATRON_CPU", "off")
    assert not cpu_mode.cpu_mode_requested([]) and not pretrain_ds.parse_args([]).cpu


# ----------------------------------------------------------------------------------------------------------------
# Input-check settings that differ between TP ranks
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixed_pool():
    """Two gloo ranks forming one TP=2 group, spawned with MILE_MEGATRON_INPUT_CHECKS=1 on rank 0 and =0 on
    rank 1 (TRITON_INTERPRET=1 so that the Triton path can run too)."""
    common = {"TRITON_INTERPRET": "1", "MILE_MEGATRON_LOSS_BACKEND": "torch"}
    env = [dict(common, MILE_MEGATRON_INPUT_CHECKS="1"), dict(common, MILE_MEGATRON_INPUT_CHECKS="0")]
    with DistributedPool(2, layouts=[(2, 1)], env=env) as world:
        yield world


def worker_mixed_checks(ctx, backend: str, steps: list[tuple[str, str | None]]) -> list[str]:
    """Run `steps` in order: ("bad"|"good" target, set_input_checks value for THIS rank or None to keep it).

    After each loss the rank runs backward and a TP barrier (the next collective): a rank that went on while
    another raised would wait there. Outcome per step: "ok" or "<ExceptionType>: message"."""
    import torch
    import torch.distributed as dist

    import mile_megatron as mm
    from mile_megatron.loss import settings

    settings.set_loss_backend(backend)
    assert settings.use_triton(torch.zeros(2, 8)) == (backend == "triton")
    from_environment = ctx.state.setdefault("checks at import", mm.input_checks())
    assert from_environment == (ctx.rank == 0), "MILE_MEGATRON_INPUT_CHECKS of the spawned rank not applied"
    mm.set_input_checks(from_environment)  # each run starts from the environment's (disagreeing) settings
    par = lc.Parallel.from_layout(ctx.layout(2, 1))
    gen = lc._generator("mixed-checks")
    full = lc.make_logits("normal", (3, 2), 32, gen).float()
    target = lc.make_targets("random", (3, 2), 32, gen)
    outcomes = []
    for kind, setting in steps:
        if setting is not None:
            mm.set_input_checks(setting == f"rank{ctx.rank}:on" or setting == "on")
        wanted = target.clone()
        if kind == "bad":
            wanted[1, 1] = 32  # one id past the padded vocabulary
        try:
            leaf = lc._shard(full, par).clone().requires_grad_(True)
            mm.mile_loss(leaf, wanted, tp_group=par.tp_group).backward()
            dist.barrier(group=par.tp_group)
            outcomes.append("ok")
        except Exception as error:  # noqa: BLE001 - the test inspects type and message
            outcomes.append(f"{type(error).__name__}: {error}")
    return outcomes


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_disagreeing_input_checks_fail_on_every_rank(mixed_pool, backend):
    """MILE_MEGATRON_INPUT_CHECKS=1 on rank 0 and =0 on rank 1: every rank raises the same ValueError (no rank
    goes on to its next collective and hangs), with a bad target or a good one; once the settings agree the
    calls work and a bad target raises on both; a later set_input_checks on one rank only fails on both."""
    steps = [
        ("bad", None),  # env: rank 0 on, rank 1 off
        ("good", None),
        ("good", "on"),  # set_input_checks(True) on both: agree
        ("bad", None),
        ("good", "rank0:on"),  # rank 1 alone switches off again
        ("good", "on"),
    ]
    outcomes = mixed_pool.run(worker_mixed_checks, backend, steps, timeout=40)
    for rank, results in enumerate(outcomes):
        for step, (expected, result) in enumerate(zip(
                ["settings", "settings", "ok", "target", "settings", "ok"], results)):
            where = f"rank {rank} step {step} {steps[step]}: {result}"
            if expected == "ok":
                assert result == "ok", where
            else:
                assert result.startswith("ValueError"), where
                keyword = "MILE_MEGATRON_INPUT_CHECKS" if expected == "settings" else "target ids"
                assert keyword in result, where
