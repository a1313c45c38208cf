#!/usr/bin/env bash
# The GPU path, checked on one GPU machine in one command (a 480 s budget, BUDGET_S; no network):
#
#   benchmarks/gpu_check.sh [OUT_DIR]
#
# One line per item, PASS, FAIL or SKIP (items that need two GPUs, on one):
#   versions                  torch/CUDA, vLLM (0.33.x, the CUDA build), DeepSpeed, Ray, the GPUs
#   1, 2, 3                   frozen roles on their GPU; collectives on GPU ranks; a rank without a GPU
#                             sees none (benchmarks/gpu_check.py devices)
#   6                         the NCCL sender's tied aliases, through vLLM's own stream check
#   gpu tests                 the tests marked `gpu` (the vLLM engine on a GPU, IPC and NCCL sync)
#   ppo / remax / dpo         two steps with every role on the GPU, ZeRO-3, bf16, vLLM at 0.3 of the
#                             GPU (PPO with rollout.sleep_between_steps): log-prob difference and sync
#                             bytes, then each role's max_memory_allocated against the planner's figure
# It exits non-zero when any line is FAIL. Needs the package installed with its `vllm` extra and
# pytest (`pip install -e '.[vllm,dev]'`); PYTHON picks the interpreter, BUDGET_S the total time.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
python=${PYTHON:-python}
out=${1:-$(mktemp -d -t rlhf-ray-gpu-check.XXXXXX)}
budget_s=${BUDGET_S:-480}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export RAY_USAGE_STATS_ENABLED=0
# Actors that reserve no GPU see none (the driver's ray.init sets it for its workers too).
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1

start=$SECONDS
failed=0

# check NAME TIMEOUT_S COMMAND...: run COMMAND within the time left (at most TIMEOUT_S), echo its
# PASS/FAIL/SKIP lines; a command that prints none, or times out, is one FAIL line for NAME.
check() {
    local name=$1 limit=$2
    shift 2
    local left=$((budget_s - (SECONDS - start)))
    if ((left < 10)); then
        echo "FAIL $name: not started, the ${budget_s} s budget is spent"
        failed=1
        return
    fi
    ((limit > left)) && limit=$left
    local log="$out/${name// /_}.log" rc=0
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1 || rc=$?
    local lines
    lines=$(grep -E '^(PASS|FAIL|SKIP) ' "$log")
    if [[ -n "$lines" ]]; then
        echo "$lines"
        grep -q '^FAIL ' <<<"$lines" && failed=1
    fi
    if ((rc == 124 || rc == 137)); then
        echo "FAIL $name: timed out after ${limit} s (log: $log)"
        failed=1
    elif ((rc != 0)) && ! grep -q '^FAIL ' <<<"$lines"; then
        echo "FAIL $name: exit status $rc (log: $log)"
        failed=1
    fi
}

check versions 60 "$python" benchmarks/gpu_check.py versions
check "items 1-3" 150 "$python" benchmarks/gpu_check.py devices
check "item 6" 90 "$python" benchmarks/gpu_check.py tied
check "gpu tests" 200 "$python" benchmarks/gpu_check.py gpu-tests "$out"
for run in ppo remax dpo; do
    check "$run" 200 "$python" benchmarks/gpu_check.py run "$run" "$out"
done

echo "gpu_check: $((SECONDS - start)) s, logs and runs in $out"
exit "$failed"
