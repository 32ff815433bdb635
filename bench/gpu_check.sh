#!/usr/bin/env bash
# The GPU path, proven: one command, under 8 minutes on one CUDA GPU.
#
#   bash bench/gpu_check.sh            # from the repository root, with the project's venv active
#
# 1. the test suite with CUDA visible (every code path that picks its device picks CUDA: training,
#    generation, chat, checkpoints written on CUDA and loaded back),
# 2. both training stages of the app's default recipe on the bundled data (bench_train.py --part recipe:
#    pretraining then chat tuning, the hit rate on the bundled questions),
# 3. bf16 training throughput and MFU for shape C and a larger shape L, cached generation at batch 1,
#    and the device's logits checked against the CPU's (bench/gpu_speed.py).
# Each step has its own time limit (180 + 180 + 100 s: under 8 minutes in all); the figures go to bench/results/ and the log to bench/results/gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p bench/results
log=bench/results/gpu_check.log
: > "$log"
status=0

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*" | tee -a "$log"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
    [ "$rc" -eq 0 ] || status=1
}

python - <<'PY' 2>&1 | tee -a "$log" || exit 1
import sys, torch
if not torch.cuda.is_available():
    sys.exit("no CUDA device: this check needs one GPU / 此检查需要一块 CUDA GPU")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}, "
      f"bf16 {torch.cuda.is_bf16_supported()}")
PY

step "test suite" 180 python -m pytest -q -x -p no:cacheprovider
step "default recipe, both stages" 180 python bench/bench_train.py --part recipe --out bench/results/gpu_train.json
step "bf16 throughput + MFU (C, L), cached generation" 100 python bench/gpu_speed.py --out bench/results/gpu_speed.json
echo "gpu_check: $([ $status -eq 0 ] && echo PASS || echo FAIL) in $SECONDS s (log: $log)" | tee -a "$log"
exit $status
