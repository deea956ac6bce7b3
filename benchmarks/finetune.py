"""Does pretraining pay? Fine-tuning a pretrained TinyNet against training the same net from scratch.

    python benchmarks/finetune.py [--pretrain-epochs 16] [--epochs 16] [--width 32]

1. pretrain examples/tinynet.py on shared/data/tinyimagenet-100 (100 ImageNet classes, 12,000 images at 64 px,
   none of Imagenette's classes) with `warmstart train`;
2. on shared/data/imagenette-dev (10 classes, 1,500 train / 500 val), with the same architecture, resolution and
   number of epochs:
     scratch       `warmstart train` (its default recipe)
     finetune      `warmstart finetune --from PRETRAINED` (full fine-tuning, its default recipe)
     linear probe  `warmstart finetune --from PRETRAINED --linear-probe` (frozen backbone)
3. print every figure and the margins, write results.json and a plot of the three validation curves.
Everything goes through the CLI exactly as a user would run it. ~30-40 minutes on 2 CPU cores.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from warmstart.prepare.fixtures import shared_data

REPO = Path(__file__).resolve().parents[1]
WARMSTART = [sys.executable, "-m", "warmstart"]


def run(cmd: list[str], log: Path) -> float:
    print("$ warmstart " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        subprocess.run([*WARMSTART, *cmd], check=True, stdout=f, stderr=subprocess.STDOUT)
    return time.perf_counter() - t0


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=shared_data(), help="shared/data (default: found beside the repo)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "runs" / "finetune")
    p.add_argument("--pretrain-epochs", type=int, default=16)
    p.add_argument("--epochs", type=int, default=16, help="epochs on Imagenette, the same for all three")
    p.add_argument("--width", type=int, default=32, help="TinyNet width")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("-j", "--workers", type=int, default=2)
    p.add_argument("--plot", type=Path, default=REPO / "benchmarks" / "finetune_imagenette.png")
    args = p.parse_args()
    if args.data is None or not (args.data / "tinyimagenet-100").is_dir():
        sys.exit("needs shared/data/tinyimagenet-100 and imagenette-dev (pass --data DIR)")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model = ["--model", f"{REPO / 'examples' / 'tinynet.py'}:TinyNet", "--model-kwargs", json.dumps({"width": args.width})]
    common = ["--img-size", str(args.img_size), "-j", str(args.workers)]
    imagenette = str(args.data / "imagenette-dev")

    times = {}
    pre = out / "pretrain"
    if not (pre / "checkpoints" / "best.pt").is_file() or len(rows(pre)) < args.pretrain_epochs:
        # --resume auto: an interrupted benchmark continues its pretraining where it stopped (bitwise the same)
        times["pretrain"] = run(["train", "--data", str(args.data / "tinyimagenet-100"), *model, *common,
                                 "--epochs", str(args.pretrain_epochs), "--out", str(pre), "--resume", "auto"],
                                out / "pretrain.log")
    ckpt = str(pre / "checkpoints" / "best.pt")
    runs = {
        "scratch": ["train", "--data", imagenette, *model, *common],
        "finetune": ["finetune", "--from", ckpt, "--data", imagenette, "-j", str(args.workers)],
        "linear probe": ["finetune", "--from", ckpt, "--data", imagenette, "--linear-probe", "-j", str(args.workers)],
    }
    # alternate nothing here: each run is minutes long and compared by accuracy, not time
    for name, cmd in runs.items():
        times[name] = run([*cmd, "--epochs", str(args.epochs), "--out", str(out / name.replace(" ", "-"))],
                          out / f"{name.replace(' ', '-')}.log")

    results = {"pretrain": {"val_top1": max(r["val_top1"] for r in rows(pre)), "epochs": len(rows(pre)),
                            "seconds": times.get("pretrain")}}
    for name in runs:
        r = rows(out / name.replace(" ", "-"))
        results[name] = {"best_val_top1": max(x["val_top1"] for x in r), "last_val_top1": r[-1]["val_top1"],
                         "epochs": len(r), "seconds": times[name], "curve": [x["val_top1"] for x in r]}
    margin = results["finetune"]["best_val_top1"] - results["scratch"]["best_val_top1"]
    results["margin_points"] = margin
    (out / "results.json").write_text(json.dumps(results, indent=1))

    print(f"\npretrained TinyNet(width {args.width}) on tinyimagenet-100: best val top-1 "
          f"{results['pretrain']['val_top1']:.2f}% ({results['pretrain']['epochs']} epochs)")
    print(f"Imagenette, {args.epochs} epochs each, {args.img_size} px:")
    print("| run | best val top-1 | last val top-1 | minutes |\n|---|---|---|---|")
    for name in runs:
        r = results[name]
        print(f"| {name} | {r['best_val_top1']:.2f}% | {r['last_val_top1']:.2f}% | {r['seconds'] / 60:.1f} |")
    print(f"fine-tuning beats training from scratch by {margin:+.2f} points")
    plot(results, runs, args)


def plot(results: dict, runs: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in runs:
        curve = results[name]["curve"]
        ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3,
                label=f"{name} (best {results[name]['best_val_top1']:.1f}%)")
    ax.set_xlabel("epoch on Imagenette")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(f"TinyNet on Imagenette at {args.img_size} px: pretrained on tinyimagenet-100 vs scratch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=90)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
