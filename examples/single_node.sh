#!/usr/bin/env bash
# One node, GPUS_PER_NODE GPUs (default 8); MiLe loss unless LOSS says otherwise; preset 468m
# unless PRESET says otherwise (the paper trains it on 2 x 8 GPUs; one node only takes longer).
#   DATA_ARGS_PATH=... TOKENIZER_MODEL=... CHECKPOINT_DIR=... examples/single_node.sh [more flags]
# Variables: see examples/pretrain.sh and examples/README.md.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export NNODES=1 NODE_RANK=0
export GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
export PRESET="${PRESET:-468m}"
exec bash "$here/pretrain.sh" "$@"
