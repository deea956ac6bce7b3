#!/usr/bin/env bash
# The checks only a CUDA machine can make, in under 8 minutes, each against its alternative in the same run:
#   1. bench train resnet50: warmstart's step in bf16 + channels_last, eager and compiled, vs an fp32 eager loop
#   2. bench data on real JPEGs: warmstart's default (CPU) decoder vs --decoder gpu (nvJPEG), each vs the classic
#      example's pipeline, same files and workers
#   3. a 2-epoch train on imagenette-dev (EMA on: model and EMA scored in one pass, checkpoints written in the
#      background), then evaluate its best checkpoint; one epoch with --decoder gpu
#   4. DDP across processes: two processes on one GPU with Gloo (reductions of CUDA tensors), and two processes on two
#      GPUs with NCCL where this machine has them
#   5. the one-line refusals only a GPU can trigger: NCCL with more processes than GPUs, --deterministic with an op
#      that has no deterministic CUDA kernel (alexnet's adaptive average pool backward at 64 px; resnet50's pool to
#      1x1 takes the mean's deterministic path)
# Each check has a time limit, and all of them together at most DEADLINE seconds (7.5 min): a check that would
# start past it is skipped (and says so), so the script ends inside 8 minutes whatever hangs.
# Run from anywhere:  bash benchmarks/gpu_check.sh
# Writes every command's output to $OUT (if set; else a temporary folder) and appends a table to
# benchmarks/RESULTS.md with the GPU model and the date. Data: $WARMSTART_SHARED_DATA, ../shared/data or
# shared/data (imagenet-sample, imagenette-dev); without them, drawn images from `python -m warmstart.synthetic`.
# Installs nothing heavy: uses .venv/bin/python if present, else `python`; warmstart itself is installed
# (--no-deps, offline) only when it is not importable.
set -uo pipefail
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no CUDA GPU here (nvidia-smi is missing or sees no device); run this on a GPU machine" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
if ! "$PY" -c "import warmstart" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . || { echo "gpu_check: cannot install warmstart with $PY" >&2; exit 2; }
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: nvidia-smi sees a GPU but $PY's torch has no CUDA; use a CUDA build of torch" >&2
    exit 2
fi
RES=${OUT:-$(mktemp -d)}
mkdir -p "$RES"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
WORKERS=$(( $(nproc) > 1 ? $(nproc) - 1 : 1 ))  # train's default for one process: its CPUs minus one
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
SHARED=${WARMSTART_SHARED_DATA:-../shared/data}
[ -d "$SHARED" ] || SHARED=shared/data
START=$SECONDS
DEADLINE=450
echo "gpu_check: $GPU, $WORKERS data workers, results in $RES"

# the time a check may take: its own limit, or what is left of DEADLINE (0: skip it)
allowed() {
    local left=$((DEADLINE - (SECONDS - START)))
    if [ "$left" -lt 15 ]; then echo 0; elif [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}

# a command under its share of the deadline, output in $RES/NAME.out and .err; its exit status, or 200 when it was
# skipped for time (the status file then says so)
timed() {
    local name=$1 limit
    limit=$(allowed "$2")
    shift 2
    if [ "$limit" -eq 0 ]; then echo "$name skipped" >>"$RES/status"; echo "== $name: skipped (out of time)"; return 200; fi
    echo "== $name  [$((SECONDS - START)) s, at most ${limit} s]: $*"
    timeout -k 10 "$limit" "$@" >"$RES/$name.out" 2>"$RES/$name.err"
}

# a check: its name, a time limit in seconds, the command; passes when the command exits 0
check() {
    local name=$1 rc
    timed "$@"
    rc=$?
    [ $rc -eq 200 ] && return
    echo "$name $rc" >>"$RES/status"
    tail -n 2 "$RES/$name.out"
    [ $rc -eq 0 ] || { echo "   FAILED (exit $rc; 124 = over its time limit):"; tail -n 5 "$RES/$name.err"; }
}

# a refusal: its name, a time limit, the words its one-line error must hold, the command; passes (status 0) when the
# command fails (not by the time limit) saying the words, with no traceback through warmstart's code (torchrun adds
# its own report and traceback when a child fails: those frames are torch's)
refusal() {
    local name=$1 limit=$2 words=$3 rc
    shift 3
    timed "$name" "$limit" "$@"
    rc=$?
    [ $rc -eq 200 ] && return
    if [ $rc -ne 0 ] && [ $rc -ne 124 ] && grep -q -- "$words" "$RES/$name.err" \
        && ! grep -Eq 'File ".*(/src/warmstart/|site-packages/warmstart/)' "$RES/$name.err"; then
        echo "$name 0" >>"$RES/status"
        grep -- "$words" "$RES/$name.err" | head -n 1
    else
        echo "$name 1" >>"$RES/status"
        echo "   FAILED (exit $rc; expected a one-line refusal with: $words):"
        tail -n 5 "$RES/$name.err"
    fi
}

if [ -d "$SHARED/imagenet-sample" ] && [ -d "$SHARED/imagenette-dev" ]; then
    JPEGS=$SHARED/imagenet-sample
    TRAIN=$SHARED/imagenette-dev
    WHAT="imagenet-sample (1,000 real ImageNet JPEGs), imagenette-dev"
else  # no shared data on this machine: drawn shapes, 10 classes (JPEGs, but not photographs)
    "$PY" -m warmstart.synthetic --out "$RES/shapes" --classes 0-9 --train 150 --val 50 --size 320 >/dev/null
    JPEGS=$RES/shapes/train
    TRAIN=$RES/shapes
    WHAT="drawn shapes from warmstart.synthetic (no shared data here)"
fi

: >"$RES/status"
check train_bf16 90 "$PY" -m warmstart bench train --model resnet50 --synthetic --amp bf16 --channels-last --json
check train_bf16_compiled 300 "$PY" -m warmstart bench train --model resnet50 --synthetic --amp bf16 --channels-last \
    --compile --json
check data_cpu 45 "$PY" -m warmstart bench data --data "$JPEGS" --img-size 224 --workers "$WORKERS" -b 64 --json
check data_gpu 45 "$PY" -m warmstart bench data --data "$JPEGS" --img-size 224 --workers "$WORKERS" -b 64 \
    --decoder gpu --json
check train_2_epochs 90 "$PY" -m warmstart train --data "$TRAIN" --model resnet50 --epochs 2 --img-size 160 -b 64 \
    --ema --out "$RES/run"  # the default --amp auto: bf16 + channels_last expected on the GPU; default workers
check evaluate 30 "$PY" -m warmstart evaluate --checkpoint "$RES/run/checkpoints/best.pt" --data "$TRAIN" \
    -j "$WORKERS" --amp bf16 --json
check train_gpu_decoder 60 "$PY" -m warmstart train --data "$TRAIN" --model resnet18 --epochs 1 --img-size 160 \
    -b 64 --decoder gpu --out "$RES/gpu_decoder"
# DDP in two processes: on one GPU they share it (Gloo reduces CUDA tensors through the host); NCCL needs two GPUs
check ddp_gloo_2_on_1_gpu 90 env CUDA_VISIBLE_DEVICES=0 "$PY" -m torch.distributed.run --nproc-per-node 2 -m warmstart train --data "$TRAIN" \
    --model resnet18 --epochs 1 --img-size 64 -b 32 -j 2 --dist-backend gloo --ema --out "$RES/gloo"
if [ "$GPUS" -ge 2 ]; then
    check ddp_nccl_2_gpus 90 "$PY" -m torch.distributed.run --nproc-per-node 2 -m warmstart train --data "$TRAIN" \
        --model resnet18 --epochs 1 --img-size 64 -b 32 -j 2 --dist-backend nccl --ema --out "$RES/nccl"
else  # what NCCL cannot do here must be one line: two processes for one GPU
    refusal nccl_more_processes_than_gpus 60 "got the same GPU" "$PY" -m torch.distributed.run \
        --nproc-per-node 2 -m warmstart train --data "$TRAIN" --model resnet18 --epochs 1 --img-size 64 -b 32 -j 2 \
        --dist-backend nccl --out "$RES/nccl"
fi
refusal deterministic_refusal 60 "has no deterministic kernel" "$PY" -m warmstart train --data "$TRAIN" \
    --model alexnet --epochs 1 --img-size 64 -b 16 -j 2 --deterministic --out "$RES/deterministic"

# one table for benchmarks/RESULTS.md, from each check's last JSON line (or its exit status)
"$PY" - "$RES" "$GPU" "$WHAT" "$((SECONDS - START))" >"$RES/summary.md" <<'EOF'
import datetime, json, pathlib, sys
res, gpu, what, seconds = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
status = dict(line.split() for line in (res / "status").read_text().splitlines())

def row(name, what, fmt=None):
    """fmt(the check's JSON line), or without fmt its last line of output."""
    if status.get(name) == "skipped":
        return f"| {what} | skipped: the 7.5-minute deadline came first |"
    if status.get(name) != "0":
        return f"| {what} | FAILED (exit {status.get(name)}{', over its time limit' if status.get(name) == '124' else ''}) |"
    lines = (res / f"{name}.out").read_text().strip().splitlines() or ["(no output)"]
    return f"| {what} | {fmt(json.loads(lines[-1])) if fmt else lines[-1]} |"

def refused(name, what):
    """A refusal's row: the line it said (passed), or its status."""
    if status.get(name) == "skipped":
        return f"| {what} | skipped: the 7.5-minute deadline came first |"
    if status.get(name) != "0":
        return f"| {what} | FAILED (not refused in one line: see {name}.err) |"
    said = [l for l in (res / f"{name}.err").read_text().splitlines() if "error:" in l]
    return f"| {what} | `{(said or ['(refused)'])[0].strip()[:300]}` |"

def rounds(r, key_a, key_b):
    return ", ".join(f"{x[key_a]:.0f}/{x[key_b]:.0f}" for x in r["rounds"])

step = lambda r: (f"warmstart {r['warmstart_img_s']:.0f} img/s vs fp32 eager {r['baseline_img_s']:.0f} img/s: "
                  f"**{r['ratio']:.2f}x** (rounds: {rounds(r, 'warmstart', 'baseline')}; batch {r['batch_size']}, "
                  f"{r['img_size']} px)")
data = lambda r: (f"warmstart {r['warmstart_img_s']:.0f} img/s vs classic {r['baseline_img_s']:.0f} img/s: "
                  f"**{r['ratio']:.2f}x** (rounds: {rounds(r, 'warmstart', 'baseline')}; {r['images']} images, "
                  f"{r['workers']} workers)")
evaluate = lambda r: f"top-1 {r['top1']:.2f}%, top-5 {r['top5']:.2f}% on {r['count']} images"
print(f"\n## GPU check (`bash benchmarks/gpu_check.sh`): {gpu}, {datetime.date.today()}\n")
print(f"Data: {what}. {seconds} s in all.\n")
print("| check | result |\n|---|---|")
print(row("train_bf16", "bench train resnet50, bf16 + channels_last, eager", step))
print(row("train_bf16_compiled", "bench train resnet50, bf16 + channels_last, compiled", step))
print(row("data_cpu", "bench data, default CPU decoder, 224 px", data))
print(row("data_gpu", "bench data, --decoder gpu, 224 px", data))
print(row("train_2_epochs", "train resnet50 2 epochs, 160 px, --amp auto, --ema"))
print(row("evaluate", "evaluate its best.pt", evaluate))
print(row("train_gpu_decoder", "train resnet18 1 epoch, 160 px, --decoder gpu"))
print(row("ddp_gloo_2_on_1_gpu", "torchrun --nproc-per-node 2 on one GPU, --dist-backend gloo, DDP, 1 epoch"))
if "ddp_nccl_2_gpus" in status:
    print(row("ddp_nccl_2_gpus", "torchrun --nproc-per-node 2 on two GPUs, --dist-backend nccl, DDP, 1 epoch"))
if "nccl_more_processes_than_gpus" in status:
    print(refused("nccl_more_processes_than_gpus", "NCCL, 2 processes for 1 GPU: refused in one line"))
print(refused("deterministic_refusal", "train alexnet --deterministic: refused in one line"))
EOF
cat "$RES/summary.md"
cat "$RES/summary.md" >>benchmarks/RESULTS.md
echo "gpu_check: done in $((SECONDS - START)) s; appended to benchmarks/RESULTS.md; outputs in $RES"
! grep -v " skipped$" "$RES/status" | grep -qv " 0$"  # exit 1 when any check failed
