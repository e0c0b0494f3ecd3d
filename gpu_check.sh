#!/usr/bin/env bash
# The measurements a short GPU window should produce (< 9 minutes on one H100/H200), in one command:
#   mkdir -p .gpu && cp ../shared/data/cifar10.tar.gz .gpu/     # here; .gpu/ is git-ignored, carried to the GPU
#   bash gpu_check.sh                                            # there; results under $OUT (default gpu_out)
# 1. bench.py speed: images/s of each method (pipeline, step, end to end), TFLOP/s and share of peak, profile;
#    then end to end with --overlap, and SimCLR's step with --compile reduce-overhead (CUDA graphs).
# 2. reproduce.py: every method on the CIFAR-10 JPEG tree for EPOCHS epochs, PARALLEL runs sharing the GPU,
#    with the online probe, weighted kNN and the published numbers at the same budget beside ours. At its
#    time limit it stops the runs (each checkpoints) and writes the table of how far each got.
# Smaller settings check the script itself on a CPU:
#   DATASET=synthetic EPOCHS=1 SIZE=300 BATCH=64 STEPS=1 ARCH=convnet PARALLEL=2 bash gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-gpu_out}
EPOCHS=${EPOCHS:-10}
BATCH=${BATCH:-512}
PARALLEL=${PARALLEL:-4}
STEPS=${STEPS:-20}
PEAK=${PEAK:-989}            # dense bf16 TFLOP/s of an H100/H200 SXM (vendor figure), for the share-of-peak column
SIZE=${SIZE:-50000}
DATASET=${DATASET:-folder}
ARCH=${ARCH:-resnet18}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
if [ "$DATASET" = folder ] && [ ! -d .gpu/cifar10 ]; then
    tar xzf .gpu/cifar10.tar.gz -C .gpu
fi
data=(--dataset "$DATASET")
[ "$DATASET" = folder ] && data+=(--data-dir .gpu/cifar10)
[ "$DATASET" = synthetic ] && data+=(--synthetic-size "$SIZE")
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"; \
  "$PYTHON" -c "import torch; print('torch', torch.__version__)"; git rev-parse --short HEAD 2>/dev/null || true; \
  date -u +%F; } > "$OUT/machine.txt"
bench=("$PYTHON" bench.py speed --arch "$ARCH" --synthetic-size "$SIZE" --batch-size "$BATCH" --steps "$STEPS" \
       --peak-tflops "$PEAK")
timeout 140 "${bench[@]}" --skip pil --profile --out "$OUT/bench_speed.json" > "$OUT/bench_speed.txt" 2>&1 \
    || echo "bench: exit $?"
# the levers, one at a time: the next batch augmented on a side stream; CUDA graphs (SimCLR alone: compiling is slow)
timeout 60 "${bench[@]}" --skip pil data flops --overlap --out "$OUT/bench_overlap.json" > "$OUT/bench_overlap.txt" 2>&1 \
    || echo "bench --overlap: exit $?"
timeout 80 "${bench[@]}" --skip pil data flops --methods simclr --compile reduce-overhead --warmup 10 \
    --out "$OUT/bench_graphs.json" > "$OUT/bench_graphs.txt" 2>&1 || echo "bench --compile reduce-overhead: exit $?"
timeout -k 30 220 "$PYTHON" reproduce.py "${data[@]}" --epochs "$EPOCHS" --batch-size "$BATCH" --parallel "$PARALLEL" \
    --out "$OUT/reproduce" > "$OUT/reproduce.txt" 2>&1 || echo "reproduce: exit $?"
tail -n 12 "$OUT/bench_speed.txt" "$OUT/bench_overlap.txt" "$OUT/bench_graphs.txt" "$OUT/reproduce.txt"
