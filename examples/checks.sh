#!/usr/bin/env bash
# Checks shared by the launchers (examples/pretrain.sh, examples/deepspeed/pretrain_ds.sh); sourced, never run.
# The caller sets `prog` (its name in messages) and PYTHON before sourcing.
set -euo pipefail

die() { echo "$prog: error: $*" >&2; exit 1; }
need_var() {  # need_var NAME HINT: NAME must be set and non-empty
    [[ -n "${!1:-}" ]] || die "$1 is not set: $2"
}
need_uint() {  # need_uint NAME MIN: NAME must be an integer >= MIN
    [[ "${!1}" =~ ^[0-9]+$ ]] && (( 10#${!1} >= $2 )) || die "$1='${!1}' must be an integer >= $2"
}
need_file() {  # need_file NAME: the file named by variable NAME must exist
    [[ -f "${!1}" ]] || die "$1='${!1}' does not exist (or is not a file)"
}
one_of() {  # one_of NAME VALUE...: NAME's value must be one of VALUE...
    local name="$1" value="${!1}"; shift
    local allowed
    for allowed in "$@"; do [[ "$value" == "$allowed" ]] && return 0; done
    die "$name='$value' is not one of: $*"
}
parent_exists() {  # parent_exists NAME: the parent directory of the path in NAME must exist
    local parent; parent="$(dirname "${!1}")"
    [[ -d "$parent" ]] || die "$1='${!1}': parent directory '$parent' does not exist"
}

# check_torchrun_nodes: NNODES > 1 needs NODE_RANK < NNODES, MASTER_ADDR and MASTER_PORT (torchrun's static
# rendezvous); one node has NODE_RANK 0. Then torchrun_launcher sets `launcher` (--standalone on one node without
# MASTER_PORT).
check_torchrun_nodes() {
    if (( NNODES > 1 )); then
        need_var NODE_RANK "set this node's rank (0 .. NNODES-1) when NNODES=$NNODES"
        need_uint NODE_RANK 0
        (( 10#$NODE_RANK < NNODES )) || die "NODE_RANK=$NODE_RANK must be < NNODES=$NNODES"
        need_var MASTER_ADDR "set the address of the node with NODE_RANK=0 when NNODES=$NNODES"
        need_var MASTER_PORT "set a free TCP port on MASTER_ADDR when NNODES=$NNODES"
    else
        NODE_RANK="${NODE_RANK:-0}"
        [[ "$NODE_RANK" == 0 ]] || die "NODE_RANK=$NODE_RANK but NNODES=1; set NNODES for a multi-node run"
    fi
}
check_master_port() {  # MASTER_PORT, when set, is a TCP port
    [[ -z "${MASTER_PORT:-}" ]] || { need_uint MASTER_PORT 1; (( 10#$MASTER_PORT <= 65535 )) || die "MASTER_PORT=$MASTER_PORT is not a TCP port"; }
}
torchrun_launcher() {
    launcher=("$PYTHON" -m torch.distributed.run --nproc-per-node "$GPUS_PER_NODE")
    if (( NNODES == 1 )) && [[ -z "${MASTER_PORT:-}" ]]; then
        launcher+=(--standalone --nnodes 1)
    else
        launcher+=(--nnodes "$NNODES" --node-rank "$NODE_RANK"
                   --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "$MASTER_PORT")
    fi
}

# select_data_source: exactly one of DATA_ARGS_PATH, PER_SPLIT_DATA_ARGS_PATH, MOCK_DATA=1; sets data_args.
select_data_source() {
    local sources=0
    [[ -n "${DATA_ARGS_PATH:-}" ]] && sources=$((sources + 1))
    [[ -n "${PER_SPLIT_DATA_ARGS_PATH:-}" ]] && sources=$((sources + 1))
    [[ "$MOCK_DATA" == 1 ]] && sources=$((sources + 1))
    (( sources == 1 )) || die "set exactly one of DATA_ARGS_PATH (blend file from mile-preprocess), PER_SPLIT_DATA_ARGS_PATH (per-split JSON) or MOCK_DATA=1 (found $sources)"
    if [[ -n "${DATA_ARGS_PATH:-}" ]]; then
        need_file DATA_ARGS_PATH
        data_args=(--data-args-path "$DATA_ARGS_PATH")
    elif [[ -n "${PER_SPLIT_DATA_ARGS_PATH:-}" ]]; then
        need_file PER_SPLIT_DATA_ARGS_PATH
        data_args=(--per-split-data-args-path "$PER_SPLIT_DATA_ARGS_PATH")
    else
        data_args=(--mock-data)
    fi
}

# check_datasets_exist: every prefix the data file names has its .bin and .idx (Megatron would only find out after
# start-up on every node). Megatron's blend format: an odd-length list is all prefixes, an even-length one
# alternates weight, prefix. URLs (object storage) are not checked.
check_datasets_exist() {
    [[ "$MOCK_DATA" == 0 ]] || return 0
    "$PYTHON" - "$prog" "${DATA_ARGS_PATH:-}" "${PER_SPLIT_DATA_ARGS_PATH:-}" <<'PY' || exit 1
import json, os, sys

prog, blend_path, per_split_path = sys.argv[1:4]
if blend_path:
    variable, path = "DATA_ARGS_PATH", blend_path
    with open(path) as f:
        lists = {"blend": f.read().split()}
else:
    variable, path = "PER_SPLIT_DATA_ARGS_PATH", per_split_path
    try:
        with open(path) as f:
            spec = json.load(f)
    except json.JSONDecodeError as e:
        sys.exit(f"{prog}: error: {variable}='{path}' is not valid JSON: {e}")
    missing = [s for s in ("train", "valid", "test") if not isinstance(spec, dict) or s not in spec]
    if missing:
        sys.exit(f"{prog}: error: {variable}='{path}' needs keys train, valid, test (missing {missing})")
    lists = {s: (v.split() if isinstance(v, str) else list(v or [])) for s, v in spec.items()}
if not any(lists.values()):
    sys.exit(f"{prog}: error: {variable}='{path}' names no dataset")
for split, tokens in lists.items():
    for prefix in (tokens if len(tokens) % 2 else tokens[1::2]):
        if "://" in prefix:
            continue
        for suffix in (".bin", ".idx"):
            if not os.path.isfile(prefix + suffix):
                sys.exit(f"{prog}: error: {variable}='{path}' ({split}) names dataset '{prefix}', but "
                         f"'{prefix}{suffix}' does not exist")
PY
}
