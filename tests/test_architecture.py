"""The tree shows the architecture, and imports follow it (checked on the source, function-level imports included).

    loss/      the product: imports nothing else from mile_megatron, and its modules import each other without a
               cycle; the all-gather wire format is defined once (loss/common.py)
    recipes    the paper's recipes as typed data: imports nothing
    utils/     files, the one UsageError, ports, megatron-core on CPU: imports only the loss library's settings
    data/      The Pile -> indexed datasets; the dataset config both engines read them with
    convert/   checkpoints <-> Hugging Face;  evaluate/: lm-eval and perplexity of converted models
    hf/        transformers glue: loss, LLaMA configs, Megatron-data adapter
    engines/   megatron (mile-pretrain) and deepspeed (mile-pretrain-ds): never import each other; nothing but
               apps/ (and benchmarks, patches, tests) imports the Megatron engine
    apps/      mile-demo, mile-selfcheck
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mile_megatron"

# component -> components it may import
ALLOWED: dict[str, set[str]] = {
    "api": {"loss"},
    "loss": set(),
    "recipes": set(),
    "utils": {"loss"},
    "data": {"utils"},
    "convert": {"utils", "recipes"},
    "evaluate": {"utils", "api"},
    "hf": {"loss", "recipes", "data", "convert", "utils"},
    "engines": set(),
    "engines.megatron": {"loss", "recipes", "data", "utils"},
    "engines.deepspeed": {"loss", "recipes", "data", "utils", "hf", "convert"},
    "apps": {"api", "loss", "recipes", "utils", "data", "convert", "evaluate", "hf", "engines", "engines.megatron",
             "engines.deepspeed"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def component(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "api"
    if parts[1] == "engines" and len(parts) > 2:
        return f"engines.{parts[2]}"
    return parts[1]


def imported_modules(path: Path) -> list[tuple[str, int, bool]]:
    """(absolute module, line, at module level) of every mile_megatron import in `path`."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [target] if node.module else [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        for target in targets:
            if target == "mile_megatron" or target.startswith("mile_megatron."):
                found.append((target, node.lineno, id(node) in top_level))
    return found


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_components_import_only_what_the_architecture_allows():
    violations = []
    for path in sources():
        own = component(module_name(path))
        assert own in ALLOWED, f"{path}: component {own!r} is not in the architecture (tests/test_architecture.py)"
        for target, line, _ in imported_modules(path):
            other = component(target)
            if other != own and other not in ALLOWED[own]:
                violations.append(f"{path.relative_to(ROOT)}:{line}: {own} imports {target} ({other})")
    assert not violations, "imports against the architecture:\n" + "\n".join(violations)


def test_the_loss_library_has_no_import_cycle():
    graph: dict[str, set[str]] = {}
    for path in sorted((PACKAGE / "loss").rglob("*.py")):
        name = module_name(path)
        graph[name] = {target for target, _, top in imported_modules(path) if top and target != name}
    modules = set(graph)
    graph = {name: {t for t in targets if t in modules} for name, targets in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle in the loss library: " + " -> ".join(trail + [node, nxt]))
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_the_wire_format_is_defined_once():
    """The all-gather's per-token statistics and trailer sizes are assigned in loss/common.py only."""
    owners = []
    for path in (PACKAGE / "loss").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign):
                names = {target.id for target in node.targets if isinstance(target, ast.Name)}
                if names & {"STATS", "TRAILER", "_STATS", "_TRAILER", "FLOOR"}:
                    owners.append(str(path.relative_to(PACKAGE)))
    assert sorted(set(owners)) == ["loss/common.py"], owners


def test_tests_only_switches_are_not_read_by_product_code():
    """Test hooks reach the engines through explicit seams (tests/hooked_*.py), not environment variables."""
    for path in sources():
        text = path.read_text()
        assert "TEST_" not in text, path
