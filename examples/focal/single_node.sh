#!/usr/bin/env bash
# The focal-loss baseline (--loss focal; --mile-gamma sets its gamma): examples/single_node.sh with LOSS=focal; same variables and arguments.
set -euo pipefail
export LOSS=focal
exec bash "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/single_node.sh" "$@"
