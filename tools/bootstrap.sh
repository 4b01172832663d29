#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv with the pinned versions.
#   tools/bootstrap.sh            -> .venv with the package (editable) + test, demo, hf, eval and deepspeed extras
#   EXTRAS=test VENV=/path ...    -> choose extras / location
# Needs Python >= 3.12 (megatron-core >= 0.17 ships megatron.training only for 3.12+).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${VENV:-$root/.venv}"
extras="${EXTRAS:-test,demo,hf,eval,deepspeed}"

find_python() {
    local candidate
    if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"; return; fi
    if command -v pyenv >/dev/null 2>&1; then
        candidate="$(pyenv root)/versions/$(cat .python-version)/bin/python"
        if [[ -x "$candidate" ]]; then echo "$candidate"; return; fi
    fi
    for candidate in python3.13 python3.12 python3; do
        if command -v "$candidate" >/dev/null 2>&1; then command -v "$candidate"; return; fi
    done
    echo "bootstrap: no Python found; install Python >= 3.12 or set PYTHON=/path/to/python3.12" >&2
    exit 1
}

python="$(find_python)"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
    echo "bootstrap: $python is $("$python" -V 2>&1); megatron-core >= 0.17 needs Python >= 3.12." >&2
    echo "           Install it (e.g. 'pyenv install 3.12') or set PYTHON=/path/to/python3.12." >&2
    exit 1
fi
if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -c tools/constraints.txt -e ".[${extras}]"
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
for name in ("torch", "megatron-core", "sentencepiece"):
    print(f"bootstrap: {name} {md.version(name)}")
PY
