"""The repository's promises about itself: README commands, CI entry, pins, layout, no apex dependency."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert block, "README must open with a fenced block holding the set-up commands"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.split("#")[0].strip()]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    main_command, test_command = commands
    assert "mile-demo" in main_command
    assert "pytest" in test_command
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines, f".ci/run must run README's test command verbatim: {test_command!r}"


def test_fixed_top_level_layout():
    for name in ("mile_megatron", "patches", "examples", "tools", "tests", "README.md", ".python-version"):
        assert (ROOT / name).exists(), name
    assert (ROOT / ".python-version").read_text().strip().startswith("3.12")


def test_megatron_core_pin_matches_constraints_and_apex_is_not_a_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "mile-megatron"
    assert project["requires-python"] == ">=3.12"
    deps = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    # a supported range in the package (an NGC container keeps its own 0.19.x), the tested pin in constraints
    assert "megatron-core>=0.19,<0.20" in project["dependencies"]
    assert not [d for d in deps if re.match(r"apex\b", d)], "the PyPI 'apex' is unrelated to NVIDIA apex"
    constraints = (ROOT / "tools" / "constraints.txt").read_text()
    assert "megatron-core==0.19.2" in constraints


def test_start_up_check_names_the_supported_megatron_core_range():
    import pytest

    from mile_megatron.engines.megatron.cli import SUPPORTED_RANGE_TEXT, check_megatron_core_version
    from mile_megatron.utils.errors import UsageError

    assert SUPPORTED_RANGE_TEXT == ">=0.19,<0.20"
    for good in ("0.19.0", "0.19.2", "0.19.3rc1", "0.19.2+503e06c"):
        check_megatron_core_version(good)
    for bad in ("0.18.2", "0.20.0", "1.0.0"):
        with pytest.raises(UsageError, match=f"megatron-core {bad} is installed; mile-pretrain supports "
                                             r"megatron-core>=0\.19,<0\.20"):
            check_megatron_core_version(bad)
    check_megatron_core_version()  # the installed one


def test_installed_megatron_core_is_the_pinned_one():
    import importlib.metadata

    assert importlib.metadata.version("megatron-core") == "0.19.2"


def test_console_scripts_resolve():
    import importlib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name, target in scripts.items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name
