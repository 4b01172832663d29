#!/usr/bin/env bash
# Common launcher: one torchrun agent on this node around `python -m mile_megatron.engines.megatron`.
# Every other script in examples/ sets a few variables and runs this one. See examples/README.md.
#
# Required:
#   GPUS_PER_NODE             processes (GPUs) on this node
#   DATA_ARGS_PATH            blend file for --data-args-path ("[weight] prefix ..."), or
#   PER_SPLIT_DATA_ARGS_PATH  JSON for --per-split-data-args-path ({"train": ..., "valid": ..., "test": ...}),
#                             or MOCK_DATA=1 (Megatron's synthetic data, for throughput checks)
#   TOKENIZER_MODEL           SentencePiece model file (TOKENIZER_TYPE=NullTokenizer needs VOCAB_SIZE instead)
#   CHECKPOINT_DIR            --save and --load directory (created if missing; a run resumes from it)
# Multi-node (NNODES > 1): NODE_RANK, MASTER_ADDR, MASTER_PORT.
# Optional: NNODES (1), LOSS (mile|focal|ce, default mile), PRESET (tiny|468m|1.2b|6.7b),
#   TOKENIZER_TYPE (GPTSentencePieceTokenizer), VOCAB_SIZE, TENSORBOARD_DIR, MILE_LOSS_LOG,
#   EXTRA_ARGS (more Megatron / mile flags, split on whitespace; arguments given to this script are
#   appended after them), CPU=1 (CPU mode: --cpu, gloo), PYTHON (python3), DRY_RUN=1 (print the
#   command and exit).
set -euo pipefail

prog="examples/pretrain.sh"
source "$(dirname "${BASH_SOURCE[0]}")/checks.sh"

# --- variables --------------------------------------------------------------------------------
PYTHON="${PYTHON:-python3}"
LOSS="${LOSS:-mile}"
PRESET="${PRESET:-}"
NNODES="${NNODES:-1}"
CPU="${CPU:-0}"
MOCK_DATA="${MOCK_DATA:-0}"
TOKENIZER_TYPE="${TOKENIZER_TYPE:-GPTSentencePieceTokenizer}"
DRY_RUN="${DRY_RUN:-0}"

command -v "$PYTHON" >/dev/null 2>&1 || die "PYTHON='$PYTHON' is not an executable; activate the project's venv or set PYTHON"
one_of LOSS mile focal ce
[[ -z "$PRESET" ]] || one_of PRESET tiny 468m 1.2b 6.7b
one_of CPU 0 1
one_of MOCK_DATA 0 1
one_of DRY_RUN 0 1

need_var GPUS_PER_NODE "set the number of processes (GPUs) per node, e.g. GPUS_PER_NODE=8"
need_uint GPUS_PER_NODE 1
need_uint NNODES 1
check_torchrun_nodes
check_master_port

select_data_source

tokenizer_args=(--tokenizer-type "$TOKENIZER_TYPE")
if [[ "$TOKENIZER_TYPE" == NullTokenizer ]]; then
    need_var VOCAB_SIZE "TOKENIZER_TYPE=NullTokenizer needs the vocabulary size (token ids are 0 .. VOCAB_SIZE-1)"
    need_uint VOCAB_SIZE 2
    tokenizer_args+=(--vocab-size "$VOCAB_SIZE")
else
    need_var TOKENIZER_MODEL "set the tokenizer model (a SentencePiece .model file, e.g. from mile-train-tokenizer)"
    if [[ "$TOKENIZER_TYPE" == *SentencePiece* ]]; then
        need_file TOKENIZER_MODEL
    fi
    tokenizer_args+=(--tokenizer-model "$TOKENIZER_MODEL")
fi

need_var CHECKPOINT_DIR "set the checkpoint directory (used for --save and --load)"
parent_exists CHECKPOINT_DIR

optional_args=()
if [[ -n "${TENSORBOARD_DIR:-}" ]]; then
    [[ -d "$(dirname "$TENSORBOARD_DIR")" ]] || die "TENSORBOARD_DIR='$TENSORBOARD_DIR': parent directory does not exist"
    optional_args+=(--tensorboard-dir "$TENSORBOARD_DIR")
fi
if [[ -n "${MILE_LOSS_LOG:-}" ]]; then
    [[ -d "$(dirname "$MILE_LOSS_LOG")" ]] || die "MILE_LOSS_LOG='$MILE_LOSS_LOG': parent directory does not exist"
    optional_args+=(--mile-loss-log "$MILE_LOSS_LOG")
fi
[[ -z "$PRESET" ]] || optional_args=(--preset "$PRESET" "${optional_args[@]}")
[[ "$CPU" == 0 ]] || optional_args+=(--cpu)

extra_args=()
[[ -z "${EXTRA_ARGS:-}" ]] || read -r -a extra_args <<< "$EXTRA_ARGS"

check_datasets_exist

"$PYTHON" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("mile_megatron") is None)' \
    || die "mile_megatron is not importable with PYTHON='$PYTHON'; activate the project's venv (tools/bootstrap.sh) or set PYTHON"

# --- command ----------------------------------------------------------------------------------
torchrun_launcher

command=("${launcher[@]}" -m mile_megatron.engines.megatron
         "${optional_args[@]}"
         --loss "$LOSS"
         "${data_args[@]}"
         "${tokenizer_args[@]}"
         --save "$CHECKPOINT_DIR" --load "$CHECKPOINT_DIR"
         "${extra_args[@]}" "$@")

export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
mode="GPU"; [[ "$CPU" == 0 ]] || mode="CPU"
echo "$prog: node $NODE_RANK of $NNODES, $GPUS_PER_NODE $mode processes, loss $LOSS${PRESET:+, preset $PRESET}" >&2
if [[ "$DRY_RUN" == 1 ]]; then  # the command on stdout, shell-quoted, nothing started
    printf '%q ' "${command[@]}"; echo
    exit 0
fi
printf '%q ' "${command[@]}" >&2; echo >&2
mkdir -p "$CHECKPOINT_DIR"
exec "${command[@]}"
