#!/usr/bin/env bash
# The cross-entropy baseline (--loss ce): examples/multi_node.sh with LOSS=ce; same variables and arguments.
set -euo pipefail
export LOSS=ce
exec bash "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/multi_node.sh" "$@"
