#!/usr/bin/env bash
# The Ray Train GPU path, end to end on one GPU: `jobs/pretrain.py --workers 1 --gpus-per-worker 1` (NCCL
# process group, device placement, the Ray Data ingest into pinned memory, bf16 autocast, torch.compile,
# the online probe, checkpoints), with the worker killed once after its mid-run checkpoint so Ray Train
# restarts it from there (run.max_failures=1); then `jobs/evaluate.py` on the result, on the GPU too.
# Small config (ViT-S, 5 s clips) on the demo store. Prints the jobs' own output.
#     bash scripts/gpu_ray_job.sh [STEPS [--set SECTION.KEY=VALUE ...]]   (GPUS=0: the same on CPU)
# Needs the project's dependencies importable and the demo store for configs/small.yaml in $AJEPA_CACHE
# (where no fluidsynth can build it, e.g. a GPU box without internet, build it elsewhere and bring it).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
steps=${1:-60}
shift $(($# > 0))
half=$((steps / 2))
out=$(mktemp -d)
export HOME=$(mktemp -d) PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore::FutureWarning
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null

echo "######## pretrain $steps steps, checkpoint every $half, the worker dies once at step $((half + 5))"
start=$SECONDS
AJEPA_FAULT_AT_STEP=$((half + 5)) timeout 400 "$PY" jobs/pretrain.py --config configs/small.yaml --out "$out" \
    --steps "$steps" --workers 1 --gpus-per-worker "${GPUS:-1}" --set run.name=gpu --set run.cpus_per_worker=8 \
    --set run.max_failures=1 --set run.log_every=10 --set run.checkpoint_every=$half --set eval.every=$half \
    --set eval.max_clips=200 "$@"
echo "######## (exit $?, $((SECONDS - start)) s)"
ls "$out" "$out/gpu"

echo "######## evaluate the run (linear probe, kNN) on the GPU"
start=$SECONDS
timeout 200 "$PY" jobs/evaluate.py --config configs/small.yaml --out "$out" --checkpoint gpu "$@"
echo "######## (exit $?, $((SECONDS - start)) s)"
