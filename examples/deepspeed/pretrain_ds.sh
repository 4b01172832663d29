#!/usr/bin/env bash
# Common launcher for mile-pretrain-ds (Hugging Face LLaMA + DeepSpeed ZeRO, `python -m mile_megatron.engines.deepspeed`).
# The other scripts in examples/deepspeed/ set a few variables and run this one. See examples/deepspeed/README.md.
#
# Required:
#   GPUS_PER_NODE             processes (GPUs) per node
#   DATA_ARGS_PATH            blend file for --data-args-path ("[weight] prefix ..."), or
#   PER_SPLIT_DATA_ARGS_PATH  JSON for --per-split-data-args-path, or MOCK_DATA=1
#   TOKENIZER_MODEL           SentencePiece model, or HF_TOKENIZER (a Hugging Face tokenizer directory), or
#                             VOCAB_SIZE (synthetic ids)
#   CHECKPOINT_DIR            --save and --load directory (created if missing; a relaunch resumes from it)
# LAUNCHER=deepspeed (default): the `deepspeed` launcher; with HOSTFILE it starts every node of the hostfile
#   from this node over ssh (pdsh). LAUNCHER=torchrun: one torchrun agent on this node; NNODES > 1 needs
#   NODE_RANK, MASTER_ADDR, MASTER_PORT.
# Optional: NNODES (1), LOSS (mile|focal|ce), PRESET (tiny|468m|1.2b|6.7b), ZERO_STAGE (0-3, default 2),
#   DS_CONFIG (a DeepSpeed JSON replacing the packaged zero config), HF_INIT (start from a HF model),
#   EXPORT_DIR (Hugging Face model written at the end), LOSS_LOG (JSON lines), EXTRA_ARGS (more flags, split
#   on whitespace; arguments given to this script come after them), CPU=1 (--cpu), PYTHON (python3),
#   DRY_RUN=1 (print the command and exit).
set -euo pipefail

prog="examples/deepspeed/pretrain_ds.sh"
source "$(dirname "${BASH_SOURCE[0]}")/../checks.sh"

# --- variables --------------------------------------------------------------------------------
PYTHON="${PYTHON:-python3}"
LAUNCHER="${LAUNCHER:-deepspeed}"
LOSS="${LOSS:-mile}"
PRESET="${PRESET:-}"
ZERO_STAGE="${ZERO_STAGE:-2}"
nnodes_given="${NNODES:-}"
NNODES="${NNODES:-1}"
CPU="${CPU:-0}"
MOCK_DATA="${MOCK_DATA:-0}"
DRY_RUN="${DRY_RUN:-0}"

command -v "$PYTHON" >/dev/null 2>&1 || die "PYTHON='$PYTHON' is not an executable; activate the project's venv or set PYTHON"
one_of LAUNCHER deepspeed torchrun
one_of LOSS mile focal ce
[[ -z "$PRESET" ]] || one_of PRESET tiny 468m 1.2b 6.7b
one_of ZERO_STAGE 0 1 2 3
one_of CPU 0 1
one_of MOCK_DATA 0 1
one_of DRY_RUN 0 1
[[ -n "$PRESET" || -n "${HF_INIT:-}" ]] || die "set PRESET (tiny, 468m, 1.2b, 6.7b) or HF_INIT (a Hugging Face model directory)"
[[ -z "${HF_INIT:-}" || -f "${HF_INIT}/config.json" ]] || die "HF_INIT='${HF_INIT}' has no config.json (give a save_pretrained directory)"

need_var GPUS_PER_NODE "set the number of processes (GPUs) per node, e.g. GPUS_PER_NODE=8"
need_uint GPUS_PER_NODE 1
need_uint NNODES 1
if [[ "$LAUNCHER" == deepspeed ]]; then
    if [[ -n "${HOSTFILE:-}" ]]; then
        need_file HOSTFILE
        grep -Eq '^[[:space:]]*[^#[:space:]]+[[:space:]]+slots=[0-9]+' "$HOSTFILE" \
            || die "HOSTFILE='$HOSTFILE' has no line like 'node-1 slots=8'"
    elif (( NNODES > 1 )); then
        die "HOSTFILE is not set: the deepspeed launcher starts NNODES=$NNODES nodes from a hostfile ('host slots=N' lines); or use LAUNCHER=torchrun on every node"
    fi
    NODE_RANK="${NODE_RANK:-0}"
else
    check_torchrun_nodes
fi
check_master_port

select_data_source

# Tokenizer: exactly one of TOKENIZER_MODEL, HF_TOKENIZER, VOCAB_SIZE.
tokenizers=0
[[ -n "${TOKENIZER_MODEL:-}" ]] && tokenizers=$((tokenizers + 1))
[[ -n "${HF_TOKENIZER:-}" ]] && tokenizers=$((tokenizers + 1))
[[ -n "${VOCAB_SIZE:-}" ]] && tokenizers=$((tokenizers + 1))
(( tokenizers == 1 )) || die "set exactly one of TOKENIZER_MODEL (SentencePiece .model), HF_TOKENIZER (Hugging Face tokenizer directory) or VOCAB_SIZE (synthetic ids) (found $tokenizers)"
if [[ -n "${TOKENIZER_MODEL:-}" ]]; then
    need_file TOKENIZER_MODEL
    tokenizer_args=(--tokenizer-model "$TOKENIZER_MODEL")
elif [[ -n "${HF_TOKENIZER:-}" ]]; then
    [[ -d "$HF_TOKENIZER" ]] || die "HF_TOKENIZER='$HF_TOKENIZER' is not a directory"
    tokenizer_args=(--hf-tokenizer "$HF_TOKENIZER")
else
    need_uint VOCAB_SIZE 2
    tokenizer_args=(--vocab-size "$VOCAB_SIZE")
fi

need_var CHECKPOINT_DIR "set the checkpoint directory (used for --save and --load)"
parent_exists CHECKPOINT_DIR

optional_args=()
[[ -z "$PRESET" ]] || optional_args+=(--preset "$PRESET")
[[ -z "${HF_INIT:-}" ]] || optional_args+=(--hf-init "$HF_INIT")
if [[ -n "${DS_CONFIG:-}" ]]; then
    need_file DS_CONFIG
    optional_args+=(--deepspeed-config "$DS_CONFIG")
else
    optional_args+=(--zero-stage "$ZERO_STAGE")
fi
if [[ -n "${EXPORT_DIR:-}" ]]; then
    parent_exists EXPORT_DIR
    optional_args+=(--export-hf "$EXPORT_DIR")
fi
if [[ -n "${LOSS_LOG:-}" ]]; then
    parent_exists LOSS_LOG
    optional_args+=(--loss-log "$LOSS_LOG")
fi
[[ "$CPU" == 0 ]] || optional_args+=(--cpu)

extra_args=()
[[ -z "${EXTRA_ARGS:-}" ]] || read -r -a extra_args <<< "$EXTRA_ARGS"

check_datasets_exist

"$PYTHON" -c 'import importlib.util, sys; sys.exit(any(importlib.util.find_spec(m) is None for m in ("mile_megatron", "deepspeed", "transformers")))' \
    || die "mile_megatron, deepspeed and transformers must be importable with PYTHON='$PYTHON'; install the project with its deepspeed extra (tools/bootstrap.sh) or set PYTHON"

# --- command ----------------------------------------------------------------------------------
if [[ "$LAUNCHER" == deepspeed ]]; then
    launcher=("$PYTHON" -m deepspeed.launcher.runner)
    if [[ -n "${HOSTFILE:-}" ]]; then
        launcher+=(--hostfile "$HOSTFILE")
        [[ -z "$nnodes_given" ]] || launcher+=(--num_nodes "$NNODES")  # default: every host of the hostfile
    fi
    launcher+=(--num_gpus "$GPUS_PER_NODE")
    [[ -z "${MASTER_ADDR:-}" ]] || launcher+=(--master_addr "$MASTER_ADDR")
    [[ -z "${MASTER_PORT:-}" ]] || launcher+=(--master_port "$MASTER_PORT")
    launcher+=(--module)
    what="deepspeed launcher${HOSTFILE:+, hostfile $HOSTFILE}"
else
    torchrun_launcher
    launcher+=(-m)
    what="torchrun, node $NODE_RANK of $NNODES"
fi

command=("${launcher[@]}" mile_megatron.engines.deepspeed
         "${optional_args[@]}"
         --loss "$LOSS"
         "${data_args[@]}"
         "${tokenizer_args[@]}"
         --save "$CHECKPOINT_DIR" --load "$CHECKPOINT_DIR"
         "${extra_args[@]}" "$@")

# The CPU accelerator must be chosen before DeepSpeed (or its launcher) starts.
[[ "$CPU" == 0 ]] || export DS_ACCELERATOR=cpu
mode="GPU"; [[ "$CPU" == 0 ]] || mode="CPU"
echo "$prog: $what, $GPUS_PER_NODE $mode processes per node, loss $LOSS${PRESET:+, preset $PRESET}, ZeRO ${DS_CONFIG:+from $DS_CONFIG}${DS_CONFIG:-stage $ZERO_STAGE}" >&2
if [[ "$DRY_RUN" == 1 ]]; then  # the command on stdout, shell-quoted, nothing started
    printf '%q ' "${command[@]}"; echo
    exit 0
fi
printf '%q ' "${command[@]}" >&2; echo >&2
mkdir -p "$CHECKPOINT_DIR"
exec "${command[@]}"
