#!/usr/bin/env bash
# The one prepared GPU session: GPU tests, mile-selfcheck on CUDA (Triton kernels; NCCL with 2+ GPUs), the loss
# benchmark and the pretraining-step benchmark, each under a timeout, ~8 minutes in all on one H100 / H200.
#
#   tools/bootstrap.sh && bash benchmarks/gpu_check.sh
#   OUT=/some/dir PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#
# Needs CUDA, torch with triton, megatron-core and this package importable by $PYTHON (default: .venv/bin/python
# when it exists, else python3); Liger-Kernel's row appears only when liger_kernel imports.
# Writes under ${OUT:-benchmarks/results/gpu} (at most 8 files, for a device session's copy-back):
#   summary.txt               card, versions, each step's exit status and duration, then the two tables
#   loss_bench.json           benchmarks/loss_bench.py (3 shapes x every method)
#   loss_bench_tp2.json       the same with --tp 2 (only when 2 or more GPUs are visible)
#   linear_loss_bench.json    benchmarks/linear_loss_bench.py (output layer + loss, fused vs unfused)
#   pretrain_step_bench.json  benchmarks/pretrain_step_bench.py (468m preset: mile (fused), mile-unfused, megatron-ce,
#                             ce, megatron-fused-ce)
#   pretrain_step_1.2b.json   the same for the 1.2b preset, mile (fused) and mile-unfused
#   logs.tar.gz               pytest.log, every step's output and every pretraining run's log
# Exit status: the number of steps that failed (0 = all passed).
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${OUT:-$root/benchmarks/results/gpu}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
mkdir -p "$out/logs"
summary="$out/summary.txt"
: >"$summary"
export PYTHONUNBUFFERED=1
unset MILE_MEGATRON_LOSS_BACKEND MILE_MEGATRON_INPLACE_BACKWARD TRITON_INTERPRET MILE_MEGATRON_CPU
failures=0

note() { echo "$*" | tee -a "$summary"; }

# step NAME SECONDS COMMAND...: run with a timeout, output to logs/NAME.log, status to the summary.
step() {
    local name="$1" limit="$2" began status
    shift 2
    began=$(date +%s)
    timeout --kill-after=20 "$limit" "$@" >"$out/logs/$name.log" 2>&1
    status=$?
    note "$name: exit $status after $(( $(date +%s) - began )) s (limit $limit s)$([[ $status -eq 124 ]] && echo ', TIMED OUT')"
    [[ $status -eq 0 ]] || failures=$((failures + 1))
}

note "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) in $root, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$summary"
"$PYTHON" - <<'PY' 2>&1 | tee -a "$summary"
import importlib.metadata as md
import torch
for name in ("torch", "triton", "megatron-core", "liger-kernel", "pytest"):
    try:
        print(f"{name} {md.version(name)}", end="; ")
    except md.PackageNotFoundError:
        print(f"{name} -", end="; ")
print(f"cuda {torch.version.cuda}; devices {torch.cuda.device_count()}")
PY
gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)

# 1. GPU tests (the kernel tests run at full size when CUDA is present).
step pytest 120 "$PYTHON" -m pytest -q -x tests/test_kernels.py tests/test_loss_api.py tests/test_linear_loss.py
step selfcheck 60 "$PYTHON" -m mile_megatron.apps.selfcheck --device cuda
# 2. Loss benchmark (writes its JSON after every shape, so a timeout keeps the finished shapes).
step loss_bench 140 "$PYTHON" benchmarks/loss_bench.py --json "$out/loss_bench.json"
if [[ "$gpus" -ge 2 ]]; then
    step loss_bench_tp2 90 "$PYTHON" benchmarks/loss_bench.py --tp 2 --shapes 16384x32000 8192x128256 \
        --json "$out/loss_bench_tp2.json"
fi
step linear_loss_bench 90 "$PYTHON" benchmarks/linear_loss_bench.py --json "$out/linear_loss_bench.json"
# 3. Pretraining step (one run per variant, each killed after 110 s; the JSON is written after every run).
step pretrain_step_bench 300 "$PYTHON" benchmarks/pretrain_step_bench.py --json "$out/pretrain_step_bench.json" \
    --log-dir "$out/logs/pretrain_runs" --timeout 110
step pretrain_step_1.2b 160 "$PYTHON" benchmarks/pretrain_step_bench.py --preset 1.2b --micro-batch-size 8 \
    --variants mile mile-unfused --json "$out/pretrain_step_1.2b.json" --log-dir "$out/logs/pretrain_runs_1.2b" \
    --timeout 75

for name in selfcheck loss_bench loss_bench_tp2 linear_loss_bench pretrain_step_bench pretrain_step_1.2b; do
    if [[ -f "$out/logs/$name.log" ]]; then
        note ""
        note "== $name"
        grep -v -e '^W[0-9]' -e 'Warning' "$out/logs/$name.log" | tail -n 45 | tee -a "$summary"
    fi
done
note ""
note "pytest: $(tail -n 1 "$out/logs/pytest.log")"
tar -czf "$out/logs.tar.gz" -C "$out" logs && rm -rf "$out/logs"
note "failed steps: $failures; results in $out"
exit "$failures"
