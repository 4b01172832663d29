#!/usr/bin/env bash
# The paper's 6.7B run: 16 nodes x 8 GPUs = 128 processes, preset 6.7b (32 layers x 4096, seq 2048,
# 2048 sequences = 4.19M tokens per step, 25,000 steps, full activation recomputation, bf16,
# distributed optimizer). Run once per node:
#   NODE_RANK=<0..15> MASTER_ADDR=<node 0> MASTER_PORT=29500 \
#   DATA_ARGS_PATH=... TOKENIZER_MODEL=<LLaMA tokenizer.model> CHECKPOINT_DIR=<shared fs> \
#   examples/paper_6.7b_16x8.sh [more flags]
# Parallelism: TP=1, PP=1, DP=128 (pure data parallelism like the paper's DeepSpeed ZeRO-2 run),
# micro-batch 1 -> 16 micro-batches of gradient accumulation per step. Per 80 GB GPU: bf16 weights
# 13.4 GB + fp32 gradient buffer 26.8 GB + 1/128 of the fp32 optimizer state (0.6 GB) + activations
# (one layer recomputed at a time) stays well under 80 GB. On 40 GB GPUs add
# EXTRA_ARGS="--tensor-model-parallel-size 2 --sequence-parallel" (DP=64, 32 micro-batches).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export NNODES="${NNODES:-16}"
export GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
export PRESET=6.7b
if [[ "$NNODES" != 16 || "$GPUS_PER_NODE" != 8 ]]; then
    echo "examples/paper_6.7b_16x8.sh: note: NNODES=$NNODES x GPUS_PER_NODE=$GPUS_PER_NODE instead of the paper's 16 x 8;" \
         "the global batch (2048 x 2048 tokens) stays the paper's, only gradient accumulation changes" >&2
fi
for name in NODE_RANK MASTER_ADDR MASTER_PORT; do
    [[ -n "${!name:-}" ]] || { echo "examples/paper_6.7b_16x8.sh: error: $name is not set (needed on every node: NODE_RANK, MASTER_ADDR, MASTER_PORT)" >&2; exit 1; }
done
# Parallelism first, so flags in the caller's EXTRA_ARGS win.
export EXTRA_ARGS="--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 ${EXTRA_ARGS:-}"
exec bash "$here/pretrain.sh" "$@"
