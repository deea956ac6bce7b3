"""Regenerate the ILSVRC2012 facts shipped in this folder (run from anywhere):

    python src/warmstart/prepare/meta/build_meta.py [ILSVRC2012_META_DIR]

The source folder holds val_labels.txt (50,000 lines `ILSVRC2012_val_XXXXXXXX.JPEG wnid`),
synsets.txt (`wnid names`, sorted-wnid order) and meta_clsloc.csv (devkit class-ID order with
per-class train counts). Default: $WARMSTART_SHARED_DATA/ilsvrc2012-meta, else
<repo>/../shared/data/ilsvrc2012-meta.
"""

import csv
import gzip
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(src: Path) -> None:
    synsets = [line.rstrip("\n").split(" ", 1) for line in open(src / "synsets.txt")]
    wnids = [w for w, _ in synsets]
    assert wnids == sorted(wnids) and len(wnids) == 1000
    index = {w: i for i, w in enumerate(wnids)}
    (HERE / "synsets.txt").write_text("".join(f"{w} {n}\n" for w, n in synsets))

    # devkit_classes.txt: line i is devkit ILSVRC2012_ID i+1: `wnid num_train_images`.
    rows = list(csv.DictReader(open(src / "meta_clsloc.csv")))
    assert [int(r["ILSVRC2015_CLSLOC_ID"]) for r in rows] == list(range(1, 1001))
    (HERE / "devkit_classes.txt").write_text("".join(f"{r['WNID']} {r['num_train_images']}\n" for r in rows))

    # val_labels.txt.gz: line i is the sorted-wnid class index of ILSVRC2012_val_{i+1:08d}.JPEG.
    labels = [line.split() for line in open(src / "val_labels.txt")]
    assert [name for name, _ in labels] == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 50001)]
    text = "".join(f"{index[w]}\n" for _, w in labels).encode()
    (HERE / "val_labels.txt.gz").write_bytes(gzip.compress(text, 9, mtime=0))


if __name__ == "__main__":
    default = Path(os.environ.get("WARMSTART_SHARED_DATA", HERE.parents[3].parent / "shared" / "data")) / "ilsvrc2012-meta"
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else default)
