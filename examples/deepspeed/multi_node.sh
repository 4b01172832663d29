#!/usr/bin/env bash
# Many nodes with the deepspeed launcher: run this ONCE, on the first host of HOSTFILE; it starts the
# processes of every host over ssh (pdsh). HOSTFILE lines: "<host> slots=<GPUs>". Every host needs the same
# paths (shared file system) and password-less ssh; variables the workers need go into ./.deepspeed_env.
#   HOSTFILE=hosts.txt DATA_ARGS_PATH=... TOKENIZER_MODEL=... CHECKPOINT_DIR=<shared fs> \
#   examples/deepspeed/multi_node.sh [more flags]
# GPUS_PER_NODE defaults to 8, PRESET to 1.2b (the paper: 4 nodes x 8 GPUs), LOSS to mile, ZERO_STAGE to 2.
# MASTER_ADDR / MASTER_PORT are optional (the deepspeed launcher's defaults: first host, 29500).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[[ -n "${HOSTFILE:-}" ]] || { echo "examples/deepspeed/multi_node.sh: error: HOSTFILE is not set (lines '<host> slots=<GPUs>'; the deepspeed launcher starts every host listed there)" >&2; exit 1; }
export LAUNCHER=deepspeed
export GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
export PRESET="${PRESET:-1.2b}"
exec bash "$here/pretrain_ds.sh" "$@"
