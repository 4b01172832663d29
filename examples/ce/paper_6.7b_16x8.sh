#!/usr/bin/env bash
# The cross-entropy baseline (--loss ce): examples/paper_6.7b_16x8.sh with LOSS=ce; same variables and arguments.
set -euo pipefail
export LOSS=ce
exec bash "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/paper_6.7b_16x8.sh" "$@"
