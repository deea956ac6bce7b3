#!/usr/bin/env bash
# `make demo`: the whole journey on an embedded default (no data to download, no network), in about 5 minutes
# on a 2-core laptop CPU:
#   1. mini ILSVRC2012 archives in the official structure (train tar of per-class tars, val tar, devkit); every
#      image is drawn on its own by warmstart.synthetic: class i is a kind of shape (circle, square, ...) in a
#      random colour, size, position and angle on a cluttered background, so a model has something to learn
#   2. warmstart prepare: archives -> verified train/ val/ folders (--partial: it is a subset)
#   3. warmstart train: pretrain the custom examples/tinynet.py on those 10 shape classes
#   4. warmstart finetune: from that checkpoint, on 5 *other* shape classes made by `python -m warmstart.synthetic`;
#      for comparison, the same schedule from random weights (warmstart train)
#   5. warmstart evaluate: the fine-tuned model with its own preprocessing -> metrics.json, per_class.csv, confusion.png
#   6. warmstart predict: top-3 classes of a few images
#   7. warmstart export: ONNX, checked against PyTorch, with a .json sidecar (preprocessing and class names)
set -euo pipefail
BIN=${1:-.venv/bin}
OUT=demo
WS="$BIN/warmstart"
# No OMP_NUM_THREADS here: training or evaluating on the CPU gives torch's math every CPU (the workers sleep while
# the step runs); --amp auto trains in bf16 where the CPU has AMX, fp32 elsewhere.
PRETRAIN_SHAPES=10  # shapes 0-9: circle square triangle star cross ring hexagon arrow crescent diamond
FINETUNE_SHAPES=pentagon,heart,l_shape,stripes,chevron
rm -rf "$OUT"
START=$SECONDS
step() { echo; echo "== $1  [$((SECONDS - START)) s]"; }

step "1/7 mini ILSVRC2012 archives: $PRETRAIN_SHAPES drawn shape classes, 200 train + 40 val images each"
"$BIN/python" -m warmstart.prepare.fixtures --out "$OUT/archives" --classes "$PRETRAIN_SHAPES" --per-class 200 \
    --val $((PRETRAIN_SHAPES * 40)) --drawn

step "2/7 warmstart prepare --partial -> $OUT/imagenet"
"$WS" prepare --archives "$OUT/archives" --out "$OUT/imagenet" --partial
# The WNIDs keep their ImageNet names in synsets.txt; give them the names of the shapes drawn for them instead.
"$BIN/python" - "$OUT/imagenet/synsets.txt" <<'EOF'
import sys
from warmstart.prepare.fixtures import drawn_names
path = sys.argv[1]
wnids = [line.split()[0] for line in open(path)]
open(path, "w").write("".join(f"{w} {name}\n" for w, name in drawn_names(wnids).items()))
EOF

step "3/7 warmstart train: pretrain examples/tinynet.py:TinyNet (width 16, 64 px, 6 epochs) -> $OUT/runs/pretrain"
# --no-zero-init-last: residual blocks that start as identity pay off over long schedules of deep nets; in these 6
# epochs of a 3-block net they cost 17 points (61% vs 78%, benchmarks/RESULTS.md), so the demo trains without
"$WS" train --data "$OUT/imagenet" --model examples/tinynet.py:TinyNet --model-kwargs '{"width": 16}' \
    --img-size 64 --epochs 6 --batch-size 32 --workers 1 --opt adamw --lr 0.003 --warmup-epochs 1 \
    --min-scale 0.35 --no-zero-init-last --out "$OUT/runs/pretrain"

step "4/7 warmstart finetune on 5 other shapes ($FINETUNE_SHAPES) -> $OUT/runs/finetune"
"$BIN/python" -m warmstart.synthetic --out "$OUT/shapes" --classes "$FINETUNE_SHAPES" --train 80 --val 40 --seed 1
"$WS" finetune --from "$OUT/runs/pretrain/checkpoints/best.pt" --data "$OUT/shapes" \
    --epochs 6 --batch-size 32 --workers 1 --opt adamw --lr 0.002 --warmup-epochs 1 --out "$OUT/runs/finetune"
BEST="$OUT/runs/finetune/checkpoints/best.pt"
echo "-- for comparison: the same data and schedule from random weights -> $OUT/runs/scratch"
"$WS" train --data "$OUT/shapes" --model examples/tinynet.py:TinyNet --model-kwargs '{"width": 16}' --img-size 64 \
    --epochs 6 --batch-size 32 --workers 1 --opt adamw --lr 0.002 --warmup-epochs 1 --min-scale 0.35 --wd 1e-4 \
    --no-zero-init-last --out "$OUT/runs/scratch"

step "5/7 warmstart evaluate -> $OUT/eval"
"$WS" evaluate --checkpoint "$BEST" --data "$OUT/shapes" --workers 1 --out "$OUT/eval"

step "6/7 warmstart predict (one validation image of each class)"
"$WS" predict --checkpoint "$BEST" --top-k 3 --workers 0 "$OUT"/shapes/val/*/*_00000.jpg

step "7/7 warmstart export --format onnx -> $OUT/export/shapes.onnx"
mkdir -p "$OUT/export"
"$WS" export --checkpoint "$BEST" --format onnx --out "$OUT/export/shapes.onnx"

best() {  # best validation top-1 of a run, from its metrics.csv
    "$BIN/python" -c "import csv, sys; print(max(float(r['val_top1']) for r in csv.DictReader(open(sys.argv[1]))))" "$1"
}
echo
echo "== done in $((SECONDS - START)) s"
echo "pretrain  ($PRETRAIN_SHAPES shapes, 200 images each): best val top-1 $(best "$OUT/runs/pretrain/metrics.csv")%"
echo "finetune  (5 other shapes, 80 images each): best val top-1 $(best "$OUT/runs/finetune/metrics.csv")%" \
     "(from random weights: $(best "$OUT/runs/scratch/metrics.csv")%)"
cat <<EOF
artifacts:
  archives        $OUT/archives/                  (official ILSVRC2012 layout, MD5SUMS)
  dataset         $OUT/imagenet/                  (train/ val/ synsets.txt prepared.json)
  pretrain run    $OUT/runs/pretrain/             (checkpoints/best.pt, metrics.csv, log.txt)
                  $OUT/runs/pretrain/curves.png
  fine-tune data  $OUT/shapes/                    (train/<shape>/ val/<shape>/)
  fine-tune run   $OUT/runs/finetune/             (checkpoints/best.pt, metrics.csv, log.txt)
                  $OUT/runs/finetune/curves.png
  baseline run    $OUT/runs/scratch/              (the same schedule from random weights; curves.png)
  evaluation      $OUT/eval/metrics.json  $OUT/eval/per_class.csv  $OUT/eval/confusion.png
  ONNX model      $OUT/export/shapes.onnx  $OUT/export/shapes.onnx.json  (preprocessing, class names)
EOF
