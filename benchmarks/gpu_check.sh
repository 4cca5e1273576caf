#!/usr/bin/env bash
# The GPU check of the pretraining step, in one ~8-minute run on one GPU (the parts' limits add up to 590 s).
# Needs torch, numpy and pyyaml only (no Ray, no MLflow). Prints, for ViT-B on 10 s clips (base.yaml):
#   1. the shipped config: RB and TF masks at the largest batch that fits, ours vs the plain loop, the phase
#      split, host-device syncs inside a step, a short kernel profile, MFU, peak memory, the curriculum mix
#      and the projected GPU-hours of the AudioSet-2M recipe; the profile sums kernel time by kind (linear,
#      attention, inductor's fused glue, copies, other) and rates the linear and attention kernels in model
#      TFLOP/s, which says what each kind of fix can gain;
#   2. the attention kernels alone at the step's shapes (benchmarks/attention.py): flash, efficient, cuDNN and
#      FlexAttention, whose tiles can fit the predictor's short sequences better than flash's (not wired into
#      the model: this says whether it is worth it);
#   3. the candidates toward 45% MFU, one setting each on top of the shipped config (batch 128, one round, a
#      one-step profile):
#      a. model.pred_context=shared: the predictor (57-64% of the step's FLOPs) runs each clip's context once
#         instead of once per target block, 31% fewer model FLOPs a clip for RB, 35% for TF; it changes the
#         model (README, GPU speed: its quality check on the demo), so compare samples/s and the projected
#         GPU-hours, not MFU, which counts the fewer FLOPs. (model.pred_heads=8, 64-wide predictor heads, probed
#         4.8 points lower on the demo: no longer a candidate here; `--set model.pred_heads=8` by hand.)
#      b. model.autocast_residual=true: a bf16 residual stream, half the bytes for the norms and residual adds
#         (the glue is memory-bound: 41 of RB's 216 ms of kernels in the top twelve alone);
#      c. run.compile_mode=max-autotune-no-cudagraphs: Triton GEMM templates that can take the GELU / bias glue
#         into the matmul (autotuning makes the compile slow: the longest limit, and last);
#   and a summary of every step part's samples/s and MFU, to compare the candidates with part 1.
# The compile on/off and batch-256 checks of earlier runs are settled: docs/perf/h100-gpu-check.log.
# Each part has its own time limit, so one that hangs or fails does not take the others with it.
#     bash benchmarks/gpu_check.sh            (PYTHON=... to choose the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore::FutureWarning
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__)"

parts=()
part() {  # part SECONDS TITLE SCRIPT ARGS...: one benchmark run under its own time limit
    local limit=$1 title=$2 script=$3
    shift 3
    echo
    echo "######## $title"
    local start=$SECONDS
    timeout "$limit" "$PY" "benchmarks/$script" --config configs/base.yaml "$@" | tee "$logs/${#parts[@]}"
    echo "######## ($title: exit ${PIPESTATUS[0]}, $((SECONDS - start)) s)"
    parts+=("$title")
}

part 200 "1. shipped config" train_throughput.py --batch auto --family rb tf --rounds 3 --profile-steps 2
part 100 "2. attention kernels at the step's shapes" attention.py
candidate=(train_throughput.py --batch 128 --family rb tf --rounds 1 --profile-steps 1 --profile-rows 6)
part 75 "3a. model.pred_context=shared" "${candidate[@]}" --set model.pred_context=shared
part 75 "3b. model.autocast_residual=true" "${candidate[@]}" --set model.autocast_residual=true
part 140 "3c. run.compile_mode=max-autotune-no-cudagraphs" "${candidate[@]}" \
    --set run.compile_mode=max-autotune-no-cudagraphs

echo
echo "######## summary: ours per mask family and the curriculum mix (attention: part 2 above)"
for i in "${!parts[@]}"; do
    [[ ${parts[$i]} == 2.* ]] && continue
    echo "${parts[$i]}"
    grep -E "^=== |^ours +:|^ours [0-9]|^MFU|^  MFU|^    (linear|attention|fused) |^projected" "$logs/$i" |
        sed 's/^/    /'
done
