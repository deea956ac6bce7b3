"""img/s of warmstart's training loader (bench.warmstart_loader: what `train` builds for a GPU run), optionally
against another checkout's, alternated in rounds. A/B for input-pipeline changes: bench data compares with the
classic example, this compares two versions of warmstart.

    python benchmarks/loader_rate.py DIR [--img-size 224] [--workers 1] [--cpu-time] [--rounds 4] [--against SRC]

--cpu-time: images per CPU-second of this process (use with --workers 0: the work itself, less exposed to a noisy
machine than wall time). --against SRC: the `src` folder of another checkout (a `git worktree add /tmp/old REV`),
run in its own process before or after this tree's (the order flips every round).
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def rate(root: Path, size: int, workers: int, cpu_time: bool, images: int) -> float:
    from warmstart import options
    from warmstart.bench import list_images, warmstart_loader

    options.set_threads(max(1, workers))
    clock = time.process_time if cpu_time else time.perf_counter
    loader = warmstart_loader(root, list_images(root, images), size=size, batch_size=32, workers=workers,
                              min_scale=0.08)
    n, t0 = 0, None
    for i, (_, labels, _) in enumerate(loader):
        if i == 2:  # after the workers' start and a first batch each
            n, t0 = 0, clock()
        elif t0 is not None:
            n += len(labels)
    return n / (clock() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--cpu-time", action="store_true")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--against", type=Path, help="another checkout's src folder")
    p.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # internal: one measurement with this src
    args = p.parse_args()
    if args.one:
        print(rate(args.root, args.img_size, args.workers, args.cpu_time, args.images))
        return
    trees = {"this tree": SRC, **({"against": args.against} if args.against else {})}
    flags = [str(args.root), "--img-size", str(args.img_size), "--workers", str(args.workers), "--images",
             str(args.images)] + (["--cpu-time"] if args.cpu_time else [])
    unit = "img per CPU-s" if args.cpu_time else "img/s"
    for r in range(args.rounds):
        got = {}
        for name in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
            time.sleep(2)  # let the previous process's pages and workers go
            out = subprocess.run([sys.executable, __file__, *flags, "--one", str(trees[name])], check=True,
                                 capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(trees[name])})
            got[name] = float(out.stdout.split()[-1])
        ratio = f", ratio {got['this tree'] / got['against']:.2f}x" if args.against else ""
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.0f} {unit}" for k, v in got.items()) + ratio, flush=True)


if __name__ == "__main__":
    main()
