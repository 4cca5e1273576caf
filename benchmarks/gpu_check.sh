#!/usr/bin/env bash
# The GPU check of the pretraining step, in one ~6-minute run on one GPU. Needs torch, timm, numpy and pyyaml
# only (no Ray, no MLflow). Prints, for ViT-B on 10 s clips (configs/base.yaml):
#   1. the shipped config: RB and TF masks at the largest batch that fits, ours vs the plain loop, the phase
#      split, host-device syncs inside a step, a short kernel profile, MFU, peak memory, the curriculum mix
#      and the projected GPU-hours of the AudioSet-2M recipe;
#   2. the same with torch.compile of the blocks toggled (run.compile), the evidence for the default;
#   3. batch 256 with activation checkpointing (memory: the paper's global batch 512 on 2 GPUs, 2048 on 8).
# Each part has its own time limit, so one that hangs or fails does not take the others with it.
#     bash benchmarks/gpu_check.sh            (PYTHON=... to choose the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore::FutureWarning

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
compile_default=$($PY -c "import sys; sys.path.insert(0, 'platform'); from ajepa.config import load_config; \
print(str(load_config('configs/base.yaml').run.compile).lower())")
compile_other=$([ "$compile_default" = true ] && echo false || echo true)

part() {  # part SECONDS TITLE ARGS...: one benchmark run under its own time limit
    local limit=$1 title=$2
    shift 2
    echo
    echo "######## $title"
    local start=$SECONDS
    timeout "$limit" "$PY" benchmarks/train_throughput.py --config configs/base.yaml "$@"
    echo "######## ($title: exit $?, $((SECONDS - start)) s)"
}

part 200 "1. shipped config (run.compile=$compile_default)" --batch auto --family rb tf --rounds 3 --profile-steps 2
part 120 "2. run.compile=$compile_other" --batch 128 --family rb tf --rounds 2 --set "run.compile=$compile_other"
part 90 "3. batch 256, TF masks, activation checkpointing" --batch 256 --family tf --rounds 1 --steps 5 \
    --set model.grad_checkpointing=true
