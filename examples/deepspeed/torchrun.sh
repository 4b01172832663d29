#!/usr/bin/env bash
# Many nodes with torchrun (no ssh): run this once on every node, same variables everywhere except NODE_RANK.
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<node 0> MASTER_PORT=29500 \
#   DATA_ARGS_PATH=... TOKENIZER_MODEL=... CHECKPOINT_DIR=<shared fs> examples/deepspeed/torchrun.sh [more flags]
# GPUS_PER_NODE defaults to 8, PRESET to 1.2b, LOSS to mile, ZERO_STAGE to 2.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
for name in NNODES NODE_RANK MASTER_ADDR MASTER_PORT; do
    [[ -n "${!name:-}" ]] || { echo "examples/deepspeed/torchrun.sh: error: $name is not set (needed on every node: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT)" >&2; exit 1; }
done
export LAUNCHER=torchrun
export GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
export PRESET="${PRESET:-1.2b}"
exec bash "$here/pretrain_ds.sh" "$@"
