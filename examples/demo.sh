#!/usr/bin/env bash
# `make demo`: the whole journey on a small embedded default, in a few minutes on a laptop CPU.
#   1. write mini ILSVRC2012 archives in the official structure (train tar of per-class tars, val tar, devkit)
#   2. warmstart prepare: archives -> verified train/ val/ folders (--partial: it is a subset)
#   3. warmstart train: the custom examples/tinynet.py on them
#   4. warmstart evaluate: the best checkpoint, with its own preprocessing
set -euo pipefail
BIN=${1:-.venv/bin}
OUT=demo
rm -rf "$OUT"
echo "== 1/4 mini ILSVRC2012 archives (10 classes) -> $OUT/archives"
"$BIN/python" -m warmstart.prepare.fixtures --out "$OUT/archives" --classes 10 --per-class 40 --val 200
echo "== 2/4 warmstart prepare"
"$BIN/warmstart" prepare --archives "$OUT/archives" --out "$OUT/imagenet" --partial
echo "== 3/4 warmstart train (examples/tinynet.py:TinyNet, 64 px, 8 epochs)"
"$BIN/warmstart" train --data "$OUT/imagenet" --model examples/tinynet.py:TinyNet --img-size 64 --epochs 8 \
    --batch-size 32 --out "$OUT/runs/tinynet"
echo "== 4/4 warmstart evaluate"
"$BIN/warmstart" evaluate --checkpoint "$OUT/runs/tinynet/checkpoints/best.pt" --data "$OUT/imagenet"
echo "done: look at $OUT/runs/tinynet/curves.png and $OUT/imagenet/prepared.json"
echo "(each mini-archive class is variations of one photo, so a near-perfect score is expected here;"
echo " README.md shows a real run: TinyNet on Imagenette, 72.8% in under 10 CPU minutes)"
