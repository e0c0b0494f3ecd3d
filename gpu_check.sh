#!/usr/bin/env bash
# What one GPU window should produce, in one command, within about 9 minutes on one H100/H200. When a GPU is lent:
#   mkdir -p .gpu && cp ../shared/data/cifar10.tar.gz .gpu/     # here, once; .gpu/ is git-ignored, so carry it
#   device run: command "COMMIT=abc1234 bash gpu_check.sh" (abc1234: `git rev-parse --short HEAD` here; .git does
#   not travel), carry [".gpu"], timeout_s 570; then give_back, unless you rerun at once
#   one rerun fits in the 15 minutes, while the machine is still warm: one stage, e.g. STAGES=smoke, or only the
#   compile paths with more time: STAGES=smoke SMOKE_BUDGET=150 SMOKE_ARGS="--skip plain overlap resume --timeout 140"
# Stage       limit   what (every limit a `timeout`; none measured on a GPU yet)                 result in $OUT
#   smoke     120 s   smoke.py: a few steps and an evaluation of every GPU path, PARALLEL at    smoke.txt, one line a
#                     once (methods x pipelines x plain/--overlap/--compile, precisions, resume)  path; the failed
#                                                                                  paths' logs: smoke_failures.txt
#   bench      95 s   bench.py speed: each method's pipeline, step, end to end, FLOPs, profile    bench.txt
#          35+35+60 s then the levers one at a time: --overlap, --deterministic (its cost), and
#                     SimCLR's step with --compile reduce-overhead (CUDA graphs)
#   reproduce 150 s   reproduce.py: every method on the CIFAR-10 JPEG tree for EPOCHS epochs,     reproduce.md
#                     PARALLEL at once, the published numbers beside; at its limit every run
#                     checkpoints and the table says how far each got (+30 s for that)
#   in all   ~540 s   and machine.txt (GPU, torch, commit, date), details.tar.gz (every log and JSON file)
# Work files go to WORK (default: a new temporary folder), so $OUT holds 6 files (the device tool returns 8).
# The CPU form checks the script itself:
#   DEVICE=cpu DATASET=synthetic EPOCHS=1 SIZE=300 BATCH=64 STEPS=1 ARCH=convnet PARALLEL=2 \
#       SMOKE_ARGS="--skip compile" bash gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-gpu_out}
WORK=${WORK:-$(mktemp -d)}
STAGES=${STAGES:-smoke bench reproduce}
DEVICE=${DEVICE:-auto}
EPOCHS=${EPOCHS:-10}
BATCH=${BATCH:-512}
PARALLEL=${PARALLEL:-16}     # smoke paths (8 of them compile) and reproduce runs (4) at once on the one GPU
STEPS=${STEPS:-20}
PEAK=${PEAK:-989}            # dense bf16 TFLOP/s of an H100/H200 SXM (vendor figure), for the share-of-peak column
SIZE=${SIZE:-50000}
DATASET=${DATASET:-folder}
ARCH=${ARCH:-resnet18}
SMOKE_BUDGET=${SMOKE_BUDGET:-110}
SMOKE_ARGS=${SMOKE_ARGS:-}   # more smoke.py flags, e.g. --skip compile
PYTHON=${PYTHON:-python3}
for stage in $STAGES; do
    case $stage in smoke | bench | reproduce) ;; *) echo "error: STAGES: no stage $stage (smoke, bench, reproduce)" >&2
        exit 2 ;;
    esac
done
if [[ " $STAGES " == *" reproduce "* && $DATASET == folder && ! -d .gpu/cifar10 ]]; then
    [ -f .gpu/cifar10.tar.gz ] || { echo "error: no .gpu/cifar10.tar.gz: cp ../shared/data/cifar10.tar.gz .gpu/ and" \
        "carry .gpu, or DATASET=synthetic" >&2; exit 2; }
    tar xzf .gpu/cifar10.tar.gz -C .gpu
fi
mkdir -p "$OUT" "$WORK"
finish() {  # also after a failure or a time limit: the tables so far, and every log and JSON file in one archive
    [ ! -f "$WORK/reproduce/results.md" ] || cp "$WORK/reproduce/results.md" "$OUT/reproduce.md"
    tar czf "$OUT/details.tar.gz" -C "$WORK" --exclude '*.pt' --exclude '*.npz' --exclude data . || true
}
trap finish EXIT
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"; \
  "$PYTHON" -c "import torch; print('torch', torch.__version__)"; \
  echo "commit ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"; \
  date -u +%F; } > "$OUT/machine.txt"

if [[ " $STAGES " == *" smoke "* ]]; then
    smoke=("$PYTHON" smoke.py --out "$WORK/smoke" --device "$DEVICE" --arch "$ARCH" --parallel "$PARALLEL"
           --budget "$SMOKE_BUDGET")
    [ -z "$SMOKE_ARGS" ] || smoke+=($SMOKE_ARGS)
    timeout -k 5 $((SMOKE_BUDGET + 10)) "${smoke[@]}" > "$WORK/smoke.log" 2>&1 || echo "smoke: exit $?"
    for file in smoke.txt smoke_failures.txt; do
        [ ! -f "$WORK/smoke/$file" ] || cp "$WORK/smoke/$file" "$OUT/"
    done
    cat "$OUT/smoke.txt" 2>/dev/null || tail -n 5 "$WORK/smoke.log"
fi

bench_stage() {  # bench_stage NAME LIMIT FLAGS...: its table in bench.txt, also when stopped at its limit
    local name=$1 limit=$2 code=0 json=$WORK/bench_$1.json
    shift 2
    echo "== bench.py speed $*" >> "$OUT/bench.txt"
    timeout "$limit" "$PYTHON" bench.py speed --device "$DEVICE" --arch "$ARCH" --batch-size "$BATCH" --steps "$STEPS" \
        --peak-tflops "$PEAK" --out "$json" "$@" > "$WORK/bench_$name.txt" 2>&1 || code=$?
    if [ "$code" = 0 ]; then
        cat "$WORK/bench_$name.txt" >> "$OUT/bench.txt"
        return
    fi
    echo "bench $name: exit $code (124: stopped at its $limit s limit); its last lines, then its table so far:" \
        | tee -a "$OUT/bench.txt"
    tail -n 3 "$WORK/bench_$name.txt" >> "$OUT/bench.txt"
    [ ! -f "$json" ] || "$PYTHON" -c "import bench, json, sys; bench.print_speed(json.load(open(sys.argv[1])))" \
        "$json" >> "$OUT/bench.txt"  # bench.py writes it after every method
}
if [[ " $STAGES " == *" bench "* ]]; then
    bench_stage speed 95 --synthetic-size "$SIZE" --skip pil --profile
    # the levers, one at a time, on 10,000 images (a step does not depend on the set's size; making it does)
    lever=(--synthetic-size $((SIZE < 10000 ? SIZE : 10000)) --skip pil data flops)
    bench_stage overlap 35 "${lever[@]}" --overlap
    bench_stage deterministic 35 "${lever[@]}" --deterministic
    bench_stage graphs 60 "${lever[@]}" --methods simclr --compile reduce-overhead --warmup 10  # compiling is slow
    grep -A 6 "^| method" "$OUT/bench.txt" || true
fi

if [[ " $STAGES " == *" reproduce "* ]]; then
    data=(--dataset "$DATASET")
    [ "$DATASET" != folder ] || data+=(--data-dir .gpu/cifar10)
    [ "$DATASET" != synthetic ] || data+=(--synthetic-size "$SIZE")
    timeout -k 30 150 "$PYTHON" reproduce.py "${data[@]}" --epochs "$EPOCHS" --batch-size "$BATCH" --device "$DEVICE" \
        --parallel "$PARALLEL" --out "$WORK/reproduce" > "$WORK/reproduce.txt" 2>&1 || echo "reproduce: exit $?"
    tail -n 8 "$WORK/reproduce.txt"
fi
