#!/usr/bin/env bash
# One node, GPUS_PER_NODE GPUs (default 8), the deepspeed launcher; MiLe loss unless LOSS says otherwise;
# preset 468m and ZeRO-2 (the paper's) unless PRESET / ZERO_STAGE say otherwise.
#   DATA_ARGS_PATH=... TOKENIZER_MODEL=... CHECKPOINT_DIR=... examples/deepspeed/single_node.sh [more flags]
# Variables: see examples/deepspeed/pretrain_ds.sh and examples/deepspeed/README.md.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export NNODES=1 NODE_RANK=0
export LAUNCHER="${LAUNCHER:-deepspeed}"
export GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
export PRESET="${PRESET:-468m}"
exec bash "$here/pretrain_ds.sh" "$@"
