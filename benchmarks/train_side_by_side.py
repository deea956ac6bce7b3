"""The README's TinyNet/Imagenette run, this tree against another revision, alternated in rounds: wall seconds of
the whole `warmstart train` command and the best validation top-1 of each, every round printed.

    python benchmarks/train_side_by_side.py --against 0b56aa5 [--data ../shared/data/imagenette-dev]
        [--epochs 40] [--rounds 2] [--json FILE] [-- extra train flags for both]

The other revision is checked out with `git worktree add` into a temporary folder and run with this venv's Python
on its own `src` (PYTHONPATH), so only the code differs. The order flips every round and each command starts after
a pause, as benchmarks/prepare.py does on this shared, noisy machine.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train(src: Path, data: str, epochs: int, out: Path, extra: list[str]) -> dict:
    """One run of `warmstart train` from the tree whose src/ is `src`: wall seconds, best top-1, the log's lines."""
    cmd = [sys.executable, "-m", "warmstart", "train", "--data", data, "--model",
           str(src.parent / "examples" / "tinynet.py") + ":TinyNet", "--img-size", "64", "--seed", "0",
           "--epochs", str(epochs), "--out", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": str(src)}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    best = re.search(r"best val top-1 ([\d.]+)%", done.stdout)
    said = [line for line in done.stdout.splitlines() if line.startswith(("precision:", "cpu threads:"))]
    return {"seconds": round(seconds, 1), "best_top1": float(best.group(1)) if best else None, "said": said}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", required=True, metavar="REV", help="the other revision (a commit, branch or tag)")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "imagenette-dev"))
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--settle", type=float, default=5.0, metavar="S", help="seconds of pause before each run")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write every round here")
    p.add_argument("extra", nargs="*", help="flags for both trains (after --)")
    args = p.parse_args()
    if not Path(args.data).is_dir():
        sys.exit(f"{args.data} does not exist: pass --data (an ImageFolder with train/ and val/)")
    with tempfile.TemporaryDirectory(prefix="side-by-side-") as tmp:
        other = Path(tmp) / "other"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(other), args.against], check=True,
                       capture_output=True)
        try:
            trees = {"this tree": REPO / "src", args.against: other / "src"}
            rounds = []
            for r in range(args.rounds):
                got = {}
                for name in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
                    time.sleep(args.settle)
                    got[name] = train(trees[name], args.data, args.epochs, Path(tmp) / f"run-{r}-{len(got)}",
                                      args.extra)
                    print(f"round {r + 1}/{args.rounds} {name}: {got[name]['seconds']:.0f} s, best top-1 "
                          f"{got[name]['best_top1']}% {got[name]['said']}", flush=True)
                ratio = got["this tree"]["seconds"] / got[args.against]["seconds"]
                print(f"round {r + 1}/{args.rounds}: this tree takes {ratio:.2f}x the time of {args.against}",
                      flush=True)
                rounds.append({**got, "ratio": round(ratio, 3), "order": list(got)})
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(other)], capture_output=True)
    ratios = sorted(r["ratio"] for r in rounds)
    print(f"time ratio (this tree / {args.against}) per round: {', '.join(f'{x:.2f}x' for x in ratios)}")
    if args.json:
        args.json.write_text(json.dumps({"against": args.against, "epochs": args.epochs, "rounds": rounds}, indent=1))


if __name__ == "__main__":
    main()
