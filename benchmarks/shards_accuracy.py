"""Does training from shards reach the accuracy of training from the folder? (issue 15's must-show)

    python benchmarks/shards_accuracy.py [--data ../shared/data/imagenette-dev] [--epochs 40] [--json F]

One `warmstart train` command (TinyNet, 64 px, seed 0, the train defaults) run three times on the same images:
from the folder, from `prepare --shards` of it on this disk, and from those shards uploaded to an S3 endpoint on
the loopback (tests/s3server.py: moto). Prints each run's best and last val top-1 and whether the final weights
are bitwise equal to the folder run's (warmstart reads shards by the same global index as files, so they should
be: same samples, same order, same augmentation draws).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import s3server  # noqa: E402  (tests/: the loopback endpoint the tests use too)


def train(data: str, run: Path, args, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "warmstart", "train", "--data", data, "--model",
           str(REPO / "examples" / "tinynet.py") + ":TinyNet", "--img-size", "64", "--seed", "0",
           "--epochs", str(args.epochs), "--out", str(run), *extra]
    t0 = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    top1 = [r["val_top1"] for r in rows if "val_top1" in r]
    print(f"{data}: best val top-1 {max(top1):.2f}%, last {top1[-1]:.2f}%, {time.time() - t0:.0f} s", flush=True)
    return {"data": data, "best_top1": max(top1), "last_top1": top1[-1], "wall_s": time.time() - t0,
            "val_count": rows[-1].get("val_count")}


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = (torch.load(r / "checkpoints" / "last.pt", weights_only=True)["model"] for r in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "imagenette-dev")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--json", type=Path, help="also write every figure here")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="warmstart-shards-accuracy-"))
    try:
        pack = work / "shards"
        subprocess.run([sys.executable, "-m", "warmstart", "prepare", "--from-folder", str(args.data), "--shards",
                        str(pack)], check=True, stdout=subprocess.DEVNULL)
        runs = {"folder": train(os.path.relpath(args.data), work / "folder", args),
                "shards": train(str(pack), work / "shards-run", args)}
        with s3server.serve():
            s3server.upload(pack, "acc", "imagenette")
            runs["s3"] = train("s3://acc/imagenette", work / "s3-run", args, "--cache-dir", str(work / "cache"))
        for name, run in (("shards", "shards-run"), ("s3", "s3-run")):
            runs[name]["weights_equal_folder"] = same_weights(work / "folder", work / run)
            runs[name]["top1_minus_folder"] = runs[name]["best_top1"] - runs["folder"]["best_top1"]
        print(json.dumps(runs, indent=1))
        if args.json:
            args.json.write_text(json.dumps({"epochs": args.epochs, "data": os.path.relpath(args.data), **runs}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
