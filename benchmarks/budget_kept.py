"""Budgets kept: `warmstart train --time-budget B` against a fixed-epoch run sized by hand to fit B, its plan, and a
run killed at half its budget and resumed.

    python benchmarks/budget_kept.py --data ../shared/data/imagenette-dev [--budgets 1m=4,2m=8,4m=16] [--plan 4m]
        [--resume 2m] [--stopped 2m] [--model resnet18 --img-size 64] [--out DIR] [--json]

For each B=E of --budgets, alternated (the budget run first in odd pairs): `train --time-budget B` and `train
--epochs E` (E: the epoch count a person would pick to fit B on this machine), each the whole command's wall time
and its final top-1 (metrics.jsonl). --plan B: `train --plan --time-budget B` (its "expected wall time" line) and,
for comparison, the same budget's real wall time from the first part. --resume B: `train --time-budget B` SIGKILLed
(data workers too) once its last.pt records half the budget's progress, then `--resume auto`: the training time it
accounted (the checkpoint's budget `used`: the two processes' time, the dead time between them excluded), whether
its LR ever rose (metrics.jsonl), and its top-1 against the uninterrupted run of the same budget. --stopped B: plain
`train` (the default 40-epoch schedule, evaluated every epoch) sent SIGTERM after B, as a job's time limit would:
the best top-1 it reached (its best.pt) against `--time-budget B`'s. Each command starts
after a sync and --settle seconds, the dataset read once before (benchmarks/prepare.py's settle_then_read).
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from warmstart.options import duration

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare import settle_then_read  # noqa: E402


def train(args, out: Path, *flags: str, kill_at: float | None = None, stop_after: float | None = None) -> dict:
    """One `warmstart train`; -> wall seconds, final and best top-1, LRs per epoch, the budget it recorded.
    stop_after: SIGTERM after that many seconds (the run saves and exits, as under a job's time limit)."""
    cmd = [sys.executable, "-m", "warmstart", "train", str(args.data), "-a", args.model, "--img-size",
           str(args.img_size), "--seed", "0", "--out", str(out), *flags]
    settle_then_read(args.settle, [p for p in args.data.rglob("*") if p.is_file()])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    if stop_after is not None:
        try:
            log = proc.communicate(timeout=stop_after)[0]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            log = proc.communicate()[0]
    elif kill_at is None:
        log = proc.communicate()[0]
    else:  # SIGKILL the whole process group once last.pt records `kill_at` of the budget's progress
        last, progress, seen = out / "checkpoints" / "last.pt", 0.0, None
        while proc.poll() is None and progress < kill_at:
            time.sleep(0.2)
            try:  # loaded only when rewritten: loading it every poll would slow the run it measures
                if last.stat().st_mtime_ns != seen:
                    seen = last.stat().st_mtime_ns
                    progress = torch.load(last, weights_only=True)["train_state"]["budget"]["progress"]
            except Exception:  # not written yet, or being replaced
                pass
        os.killpg(proc.pid, signal.SIGKILL)
        log = proc.communicate()[0]
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] \
        if (out / "metrics.jsonl").is_file() else []
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True) if (out / "checkpoints" / "last.pt").is_file() else None
    budget = (ckpt or {}).get("train_state", {}).get("budget") if ckpt else None
    scored = [r["val_top1"] for r in rows if r.get("val_top1") is not None]
    return {"flags": flags, "wall": wall, "top1": rows[-1].get("val_top1") if rows else None,
            "best_top1": max(scored) if scored else None,
            "lrs": [r.get("lr") for r in rows], "budget": budget, "log_tail": log.splitlines()[-3:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--budgets", default="1m=4,2m=8,4m=16", help="BUDGET=EPOCHS pairs: the fixed run's epochs")
    p.add_argument("--plan", default="4m", help="a budget to plan with --plan and compare ('' to skip)")
    p.add_argument("--resume", default="2m", help="a budget to kill at half and resume ('' to skip)")
    p.add_argument("--stopped", default="2m", help="the default schedule (40 epochs) stopped by SIGTERM after this "
                   "long, its best top-1 against the same --time-budget's ('' to skip)")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--settle", type=float, default=5.0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/runs") / time.strftime("budget-%Y%m%d-%H%M%S"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    args.out.mkdir(parents=True)
    results = {"budgets": {}, "plan": None, "resume": None}
    for i, pair in enumerate(x for x in args.budgets.split(",") if x):
        budget, epochs = pair.split("=")
        runs = [("budget", ["--time-budget", budget]), ("fixed", ["--epochs", epochs])]
        for name, flags in runs if i % 2 == 0 else runs[::-1]:
            r = train(args, args.out / f"{budget}-{name}", *flags)
            results["budgets"].setdefault(budget, {})[name] = r
            print(f"{budget} {name:>6} ({' '.join(flags)}): {r['wall']:.1f} s ({r['wall'] / duration(budget):.3f}x "
                  f"of {budget}), top-1 {r['top1']}", flush=True)
    if args.stopped:
        r = train(args, args.out / f"{args.stopped}-stopped", stop_after=duration(args.stopped))
        results["stopped"] = r
        own = results["budgets"].get(args.stopped, {}).get("budget", {}).get("top1")
        print(f"default schedule stopped at {args.stopped}: {r['wall']:.1f} s, best top-1 {r['best_top1']} (its "
              f"best.pt) against --time-budget {args.stopped}'s {own}", flush=True)
    if args.plan:
        out = subprocess.run([sys.executable, "-m", "warmstart", "train", str(args.data), "-a", args.model,
                              "--img-size", str(args.img_size), "--seed", "0", "--out", str(args.out / "plan"),
                              "--plan", "--time-budget", args.plan], capture_output=True, text=True).stdout
        line = next(x for x in out.splitlines() if "expected wall time" in x)
        predicted = float(line.split("= ")[1].split(" s")[0])
        real = results["budgets"].get(args.plan, {}).get("budget", {}).get("wall")
        results["plan"] = {"line": line, "predicted": predicted, "real": real}
        print(f"plan {args.plan}: {line.split(': ', 1)[1]}; the real run took {real and round(real, 1)} s "
              f"({predicted / real:.3f}x)" if real else f"plan {args.plan}: {line}", flush=True)
    if args.resume:
        amount = duration(args.resume)
        run = args.out / f"{args.resume}-resumed"
        first = train(args, run, "--time-budget", args.resume, kill_at=0.5)
        pause = time.time()
        second = train(args, run, "--time-budget", args.resume, "--resume", "auto")
        whole = results["budgets"].get(args.resume, {}).get("budget") or train(args, args.out / f"{args.resume}-whole",
                                                                              "--time-budget", args.resume)
        used = second["budget"]["used"] if second["budget"] else None
        lrs = [x for x in second["lrs"] if x is not None]
        rose = any(b > a + 1e-12 for a, b in zip(lrs[1:], lrs[2:]))  # after the first epoch's warmup
        results["resume"] = {"killed_after": first["wall"], "resumed": second["wall"], "used": used,
                             "dead": time.time() - pause - second["wall"], "lr_rose": rose,
                             "top1": second["top1"], "uninterrupted_top1": whole["top1"]}
        print(f"resume {args.resume}: killed after {first['wall']:.1f} s, resumed run {second['wall']:.1f} s; "
              f"training time accounted {used and round(used, 1)} s ({used / amount:.3f}x of {amount:.0f} s); "
              f"LR rose after warmup: {rose}; top-1 {second['top1']} vs {whole['top1']} uninterrupted", flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    if args.json:
        print(json.dumps(results, default=str))


if __name__ == "__main__":
    main()
